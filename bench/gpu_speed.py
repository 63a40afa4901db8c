"""Call 2 of the GPU validation, speed and memory: parts f and g (``bench/gpu_tokens.py``'s two parts, cut to fit).

f. tokens/s and peak device memory against transformers' ``Trainer`` + PEFT with ``paged_adamw_8bit``
   on a 1.1B Llama (TinyLlama's shape), at 1024 and 4096 tokens, one round;
g. the longest sequence that trains with 2 GiB of device memory left free by a ballast, paged
   (``paged_adamw_8bit``) against non-paged (``adamw_8bit``), LoRA r=64, in steps of 4096 tokens.

Every measured run is a fresh process (``gpu_tokens.py --worker``), each logged to the part's
progress file as it finishes. The models are built once from their config on the device and saved
in bfloat16 to the run's scratch folder; every run loads that directory. The CPU path (``--dry-run``)
runs the same workers on a small model at 32 tokens (no device memory, so no ballast).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from gpu_registry import Context, part, shared_model


def _log_runs(ctx: Context) -> None:
    """Route gpu_tokens' workers through one that logs each finished run: kept if time runs out."""
    import common
    import gpu_tokens

    def run(script: Any, args: list[str], threads: int, timeout: float = 600) -> dict[str, Any]:
        result = common.run_worker(script, args, threads, timeout)
        workload = json.loads(args[args.index("--workload") + 1]) if "--workload" in args else {}
        ctx.progress(
            {
                "worker": args[0],
                "seq_len": workload.get("seq_len"),
                "optimizer": workload.get("optimizer"),
                "result": result,
            }
        )
        return result

    gpu_tokens.run_worker = run  # type: ignore[assignment]


def _on_cpu(workload: Any) -> Any:
    return replace(workload, device="cpu", compute_dtype="float32", gradient_checkpointing=False)


@part("f", "tokens/s and peak device memory vs Trainer", budget_s=60)
def part_throughput(ctx: Context) -> dict[str, Any]:
    import gpu_tokens

    _log_runs(ctx)
    if ctx.dry_run:
        model, seq_lens, name = _on_cpu(replace(gpu_tokens.QUICK_MODEL, steps=3)), [32], "llama-quick"
    else:
        model, seq_lens, name = replace(gpu_tokens.MODEL, steps=5), [1024, 4096], "llama-1.1b"
    source = shared_model(ctx, name, replace(model, seq_len=max(seq_lens)).llama_config(), model.seed)
    args = argparse.Namespace(threads=ctx.threads, rounds=1)
    rows, raw = gpu_tokens.run_throughput(args, model, seq_lens, source)
    wanted = ("tokens_per_s_ratio",) if ctx.dry_run else ("tokens_per_s_ratio", "memory_ratio")
    ok = all(r[k] for r in rows for k in wanted)
    cells = ", ".join(
        f"{r['seq_len']}: {r['tokens_per_s_ratio'] or 0:.2f}x tok/s, "
        + ("no device memory" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x peak memory")
        for r in rows
    )
    return {
        "status": "passed" if ok else "failed",
        "headline": f"ours / Trainer at {cells}",
        "rows": rows,
        "runs": raw,
    }


@part("g", "longest sequence under a ballast, paged vs not", budget_s=65)
def part_budget(ctx: Context) -> dict[str, Any]:
    import gpu_tokens

    _log_runs(ctx)
    if ctx.dry_run:
        model = _on_cpu(replace(gpu_tokens.QUICK_MODEL, lora_r=8))
        args = argparse.Namespace(
            threads=ctx.threads, budget_gib=2.0, seq_step=32, max_seq=32, budget_steps=1
        )
        name = "llama-quick"
    else:
        model = replace(gpu_tokens.MODEL, num_layers=8, lora_r=64)
        args = argparse.Namespace(
            threads=ctx.threads, budget_gib=2.0, seq_step=4096, max_seq=16384, budget_steps=3
        )
        name = "llama-8-layers"
    args.source = shared_model(ctx, name, replace(model, seq_len=args.max_seq).llama_config(), model.seed)
    report = gpu_tokens.run_budget(args, model)
    longest = {k: v["longest_seq_len"] for k, v in report["optimizers"].items()}
    cost = "n/a" if report["paging_cost"] is None else f"{100 * report['paging_cost']:.1f}%"
    return {
        "status": "passed" if all(longest.values()) else "failed",
        "headline": f"longest: {longest}, paging buys {report['extra_tokens']} tokens, costs {cost} tok/s"
        + (" (dry run: no ballast on a CPU)" if ctx.dry_run else ""),
        "report": report,
    }
