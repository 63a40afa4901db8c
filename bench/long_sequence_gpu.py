"""GPU only: peak device memory and tokens/s at long sequences, standard loss vs chunked, offload off vs on.

A ~1.2B-parameter Llama (hidden 2048, 16 blocks, 128,256-word vocabulary; built from a config, random
weights, bfloat16) is converted to NF4 QLoRA through the framework-free core (``convert_to_qlora``,
``build_paged_optimizer``) and trained at batch 1 with non-reentrant gradient checkpointing, four ways:

- ``standard``: the model's own loss (every logit, in float32 for the loss, and their gradient);
- ``chunked``: :func:`lightning_paged.causal_lm_loss`, 256 labelled tokens per chunk;
- ``standard+offload`` and ``chunked+offload``: the same with ``offload_activations`` (checkpointed
  layer inputs in pinned host memory between the forward and the backward pass).

Part ``throughput``: at 4,096 and 16,384 tokens, ``torch.cuda.max_memory_reserved`` and tokens/s
(median over the steps after the first); a variant that runs out of memory is recorded as such.
Part ``budget``: the longest sequence (a multiple of 1,024) whose steps train when only
``--budget-gib`` of device memory is left free after a short first step (a ballast tensor takes the
rest, as in ``gpu_tokens.py``), for ``standard`` and for ``chunked+offload``. Every measurement is a
fresh process. :func:`run` does both parts and returns the report, for a GPU validation to call.

    python bench/long_sequence_gpu.py                # both parts on one GPU
    python bench/long_sequence_gpu.py --quick        # smoke test on a GPU: a small model, short lengths
    python bench/long_sequence_gpu.py --plan         # what would run (works without a GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    emit_result,
    fmt_bytes,
    machine_info,
    markdown_table,
    median,
    run_worker,
    step_times,
    write_results,
)
from gpu_tokens import EXIT_NO_GPU, ballast_bytes, is_out_of_memory, longest_fitting

NAME = "long_sequence_gpu"
SCRIPT = Path(__file__).resolve()
VARIANTS = ("standard", "chunked", "standard+offload", "chunked+offload")
BUDGET_VARIANTS = ("standard", "chunked+offload")
GIB = 2**30


@dataclass
class Model:
    """The model, its QLoRA settings and the plan."""

    vocab_size: int = 128_256
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_layers: int = 16
    num_heads: int = 32
    num_kv_heads: int = 8
    lora_r: int = 16
    chunk_size: int = 256
    steps: int = 4
    lengths: tuple[int, ...] = (4096, 16384)
    budget_bytes: int = 8 * GIB
    search: tuple[int, int, int] = (1024, 131072, 1024)
    """Shortest, longest and step of the budget search."""
    device: str = "cuda"
    seed: int = 0


QUICK = Model(
    vocab_size=32_000,
    hidden_size=256,
    intermediate_size=688,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    steps=3,
    lengths=(512, 2048),
    budget_bytes=GIB,
    search=(512, 8192, 512),
)


def measure(model_settings: Model, variant: str, seq_len: int, budget: int | None = None) -> dict[str, Any]:
    """Train ``steps`` steps at ``seq_len`` one way; with ``budget``, after a ballast leaves only that free.

    Returns peak device memory (CUDA), tokens/s and losses; ``fits: False`` on running out of memory.
    Runs on a CPU too (no memory figures), which is how its code is kept from rotting.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_paged import OptimizerConfig, QLoRAConfig, causal_lm_loss, convert_to_qlora
    from lightning_paged.core.paged_optimizer import build_paged_optimizer

    m = model_settings
    device = torch.device(m.device)
    on_gpu = device.type == "cuda"
    torch.manual_seed(m.seed)
    config = LlamaConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16 if on_gpu else torch.float32)
    qlora = QLoRAConfig(
        compute_dtype="bfloat16" if on_gpu else "float32",
        lora_r=m.lora_r,
        lora_alpha=2 * m.lora_r,
        lora_dropout=0.0,
        offload_activations=variant.endswith("+offload"),
    )
    report = convert_to_qlora(model, qlora, device=device)
    model.to(device).train()
    optimizer, _ = build_paged_optimizer(model, OptimizerConfig(name="paged_adamw_8bit", lr=1e-4))
    chunked = variant.startswith("chunked")
    generator = torch.Generator().manual_seed(m.seed + seq_len)

    def step(length: int) -> float:
        ids = torch.randint(0, m.vocab_size, (1, length), generator=generator).to(device)
        inputs = {"input_ids": ids, "labels": ids}
        loss = causal_lm_loss(model, inputs, chunk_size=m.chunk_size) if chunked else model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return float(loss.detach())

    result: dict[str, Any] = {"variant": variant, "seq_len": seq_len, "budget_bytes": budget}
    ballast = None
    try:
        if budget is not None:
            step(min(seq_len, 512))  # the optimizer state exists and is resident before the ballast
            torch.cuda.empty_cache()
            ballast = torch.empty(
                ballast_bytes(torch.cuda.mem_get_info()[0], budget), dtype=torch.uint8, device=device
            )
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        losses, stamps = [], [time.perf_counter()]
        for _ in range(m.steps):
            losses.append(step(seq_len))
            stamps.append(time.perf_counter())
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        return {**result, "fits": False, "error": str(err).splitlines()[0]}
    finally:
        del ballast
    seconds = step_times(stamps, skip=1)
    result.update(
        fits=True,
        losses=losses,
        tokens_per_second=seq_len / median(seconds),
        offloaded_bytes=report.offload.offloaded_bytes if report.offload else None,
    )
    if on_gpu:
        result.update(
            max_memory_reserved=torch.cuda.max_memory_reserved(),
            max_memory_allocated=torch.cuda.max_memory_allocated(),
            device_name=torch.cuda.get_device_name(),
        )
    return result


def _measure_in_worker(model: Model, variant: str, seq_len: int, budget: int | None = None) -> dict[str, Any]:
    args = ["--model", json.dumps(asdict(model)), "--variant", variant, "--seq-len", str(seq_len)]
    if budget is not None:
        args += ["--budget-bytes", str(budget)]
    return run_worker(SCRIPT, args, threads=4, timeout=3600)


def run(model: Model | None = None, quick: bool = False) -> dict[str, Any]:
    """Both parts, every measurement in a fresh process; the report :func:`markdown` renders."""
    model = model or (QUICK if quick else Model())
    throughput = {v: [_measure_in_worker(model, v, n) for n in model.lengths] for v in VARIANTS}
    budget: dict[str, Any] = {}
    for variant in BUDGET_VARIANTS:
        longest, probes = longest_fitting(
            lambda n, v=variant: bool(_measure_in_worker(model, v, n, model.budget_bytes)["fits"]),
            *model.search,
        )
        budget[variant] = {"longest": longest, "probes": probes}
    a, b = (budget[v]["longest"] for v in BUDGET_VARIANTS)
    return {
        "what": "GPU: peak device memory and tokens/s, standard vs chunked loss, activation offloading off vs on",
        "command": "python bench/long_sequence_gpu.py" + (" --quick" if quick else ""),
        "machine": machine_info(device="cuda"),
        "settings": asdict(model),
        "throughput": throughput,
        "budget": budget,
        "longest_ratio": b / a if a and b else None,
    }


def markdown(rep: dict[str, Any]) -> str:
    s = rep["settings"]

    def cell(r: dict[str, Any]) -> str:
        if not r["fits"]:
            return "out of memory"
        return f"{fmt_bytes(r['max_memory_reserved'])}, {r['tokens_per_second']:.0f} tok/s"

    rows = [[v, *(cell(r) for r in runs)] for v, runs in rep["throughput"].items()]
    longest = ", ".join(f"{v}: {b['longest']}" for v, b in rep["budget"].items())
    return "\n".join(
        [
            f"## Long sequences on {rep['machine']['device']}",
            "",
            f"Llama, vocabulary {s['vocab_size']:,}, hidden {s['hidden_size']}, {s['num_layers']} blocks, NF4 QLoRA "
            f"r={s['lora_r']}, bfloat16, gradient checkpointing, batch 1; max_memory_reserved and tokens/s.",
            "",
            markdown_table(["variant", *(f"{n:,} tokens" for n in s["lengths"])], rows),
            "",
            f"Longest sequence with {fmt_bytes(s['budget_bytes'])} free: {longest} (ratio {rep['longest_ratio']}).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plan", action="store_true", help="print what would run and exit")
    parser.add_argument("--budget-gib", type=float)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        settings = json.loads(args.model)
        model = Model(
            **{**settings, "lengths": tuple(settings["lengths"]), "search": tuple(settings["search"])}
        )
        emit_result(measure(model, args.variant, args.seq_len, args.budget_bytes))
        return 0
    model = QUICK if args.quick else Model()
    if args.budget_gib is not None:
        model = replace(model, budget_bytes=int(args.budget_gib * GIB))
    if args.plan:
        print(
            json.dumps({"variants": VARIANTS, "budget_variants": BUDGET_VARIANTS, **asdict(model)}, indent=2)
        )
        return 0
    import torch

    if not torch.cuda.is_available():
        print(
            "long_sequence_gpu.py needs a CUDA GPU; none is visible here. Nothing was measured.",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    report = run(model, args.quick)
    write_results(NAME, report, markdown(report), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
