"""FSDP memory and speed: what each rank holds under paged_qlora_fsdp's core, and its step time against DDP.

1. Per-rank bytes at world size 1, 2 and 4 (CPU processes over gloo, one thread each): the packed
   4-bit base weights of the rank's shards, the quantization constants every rank keeps whole,
   the other weights (embeddings, norms, head) of its shards, its adapter shards and its optimizer
   state, counted from the tensors themselves; plus the process's anonymous host memory (``RssAnon``)
   above its imports after the steps, which is what the rank pays in all.
2. Step time of the same model and global batches at world size 2: FSDP2 (``fully_shard`` per block,
   the bitsandbytes optimizer stepping local shards) against DDP (whole 4-bit replica per rank), as the
   ratio of median step times over interleaved rounds.

Every rank builds the model from the same config and seed and converts it itself (the bytes of
the whole 16-bit model pass through each rank's host memory once before sharding).

    python bench/fsdp_memory.py            # a ~37M-parameter Llama, a few minutes on 2 cores
    python bench/fsdp_memory.py --quick    # smoke test: the tiny model, world sizes 1 and 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    RESULT_PREFIX,
    emit_result,
    fmt_bytes,
    interleaved,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    set_threads,
    spread,
    step_times,
    thread_env,
    write_results,
)
from workloads import TINY, Workload, build_model, make_batches

sys.path.insert(0, str(REPO))

NAME = "fsdp_memory"
FULL = Workload(num_layers=8, batch_size=4, seq_len=64, steps=8)
QUICK = replace(TINY, batch_size=4, steps=3)
WARMUP_STEPS = 2


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def worker(mode: str, workload: Workload, rank: int, world: int) -> dict[str, Any]:
    """One rank: convert, shard (FSDP) or replicate (DDP), train ``workload.steps`` steps, count bytes."""
    import bitsandbytes as bnb
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_paged.core.fsdp import local_tensor, shard_model
    from lightning_paged.core.fsdp_optimizer import shard_optimizer
    from lightning_paged.core.layers4bit import quantized_weight_bytes
    from lightning_paged.core.optimizers import build_optimizer
    from lightning_paged.core.paging import PagingPolicy
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

    dist.init_process_group("gloo", rank=rank, world_size=world)
    baseline = _rss_anon()
    model = build_model(workload)
    storage = workload.compute_dtype if mode == "fsdp" else "uint8"
    config = QLoRAConfig(
        compute_dtype=workload.compute_dtype,
        quant_storage=storage,  # type: ignore[arg-type]
        lora_r=workload.lora_r,
        lora_alpha=workload.lora_alpha,
        lora_dropout=0.0,
        gradient_checkpointing=workload.gradient_checkpointing,
    )
    convert_to_qlora(model, config, device="cpu")  # same seed on every rank: same weights and adapters
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    constants = sum(quantized_weight_bytes(layer) - _nbytes(layer.weight) for layer in layers)
    report = None
    if mode == "fsdp":
        report = shard_model(model, init_device_mesh("cpu", (world,)))
        trained: Any = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(
        workload.optimizer,
        [p for p in model.parameters() if p.requires_grad],
        paging=PagingPolicy(),
        lr=workload.lr,
    )
    if mode == "fsdp":
        shard_optimizer(optimizer)
    model.train()
    stamps = [time.perf_counter()]
    losses = []
    for batch in make_batches(workload):
        ids = batch["input_ids"][rank::world]
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
        stamps.append(time.perf_counter())

    packed = sum(_nbytes(local_tensor(layer.weight)) for layer in layers)
    quantized = {id(layer.weight) for layer in layers}
    adapters = sum(_nbytes(local_tensor(p)) for p in model.parameters() if p.requires_grad)
    other = sum(
        _nbytes(local_tensor(p)) for p in model.parameters() if not p.requires_grad and id(p) not in quantized
    )
    state = sum(
        _nbytes(value)
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor)
    )
    dist.destroy_process_group()
    return {
        "mode": mode,
        "world_size": world,
        "rank": rank,
        "base_packed_bytes": packed,
        "quant_constants_bytes": constants,
        "other_weights_bytes": other,
        "adapter_bytes": adapters,
        "optimizer_state_bytes": state,
        "rss_anon_above_imports_bytes": _rss_anon() - baseline,
        "blocks": report.blocks if report else None,
        "stamps": stamps,
        "losses": losses,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, workload: Workload, world: int, threads: int) -> list[dict[str, Any]]:
    """Start ``world`` rank processes and return each rank's result, rank order."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**thread_env(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        command = [sys.executable, __file__, "--worker", mode, "--workload", workload.to_json()]
        command += ["--rank", str(rank), "--world", str(world), "--threads", str(threads)]
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1800)
        lines = [line for line in out.decode().splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode or not lines:
            raise RuntimeError(f"{mode} rank {rank}/{world} failed:\n{err.decode()[-4000:]}")
        results.append(json.loads(lines[-1][len(RESULT_PREFIX) :]))
    return results


def memory_rows(runs: dict[int, list[dict[str, Any]]]) -> list[list[Any]]:
    rows = []
    for world, ranks in runs.items():
        r = ranks[0]
        rows.append(
            [
                world,
                fmt_bytes(r["base_packed_bytes"]),
                fmt_bytes(r["quant_constants_bytes"]),
                fmt_bytes(r["other_weights_bytes"]),
                fmt_bytes(r["adapter_bytes"]),
                fmt_bytes(r["optimizer_state_bytes"]),
                fmt_bytes(max(x["rss_anon_above_imports_bytes"] for x in ranks)),
                f"{r['base_packed_bytes'] / runs[min(runs)][0]['base_packed_bytes']:.3f}",
            ]
        )
    return rows


def markdown(rep: dict[str, Any]) -> str:
    runs = {int(k): v for k, v in rep["memory"].items()}
    speed = rep["speed"]
    lines = [
        "# FSDP memory per rank and step time against DDP",
        "",
        f"`{rep['command']}` on {rep['machine']['cpu']}, one thread per rank. Model: "
        f"{rep['settings']['workload']['num_layers']} layers of width {rep['settings']['workload']['hidden_size']}, "
        f"optimizer {rep['settings']['workload']['optimizer']}, global batch {rep['settings']['workload']['batch_size']}.",
        "",
        "## Bytes held by rank 0 (FSDP)",
        "",
        markdown_table(
            [
                "world size",
                "4-bit base (packed)",
                "quant. constants (whole)",
                "other weights",
                "adapters",
                "optimizer state",
                "RssAnon above imports (max rank)",
                "packed vs world 1",
            ],
            memory_rows(runs),
        ),
        "",
        "## Step time at world size 2",
        "",
        markdown_table(
            ["variant", "median step (s)", "IQR (s)"],
            [[v, speed[v]["median"], f"{speed[v]['q1']:.4g}-{speed[v]['q3']:.4g}"] for v in ("fsdp", "ddp")],
        ),
        "",
        f"FSDP / DDP step-time ratio (median of per-round ratios): **{rep['speed_ratio']:.3f}** "
        f"over {rep['settings']['rounds']} interleaved rounds.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: the tiny model, world sizes 1 and 2"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and Markdown go (default bench/results)")
    parser.add_argument("--worker", choices=("fsdp", "ddp"), help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        set_threads(args.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        emit_result(worker(args.worker, Workload.from_json(args.workload), args.rank, args.world))
        return 0

    workload = QUICK if args.quick else FULL
    worlds = (1, 2) if args.quick else (1, 2, 4)
    rounds = 1 if args.quick else 3
    memory = {world: launch("fsdp", workload, world, args.threads) for world in worlds}
    timed = interleaved(("fsdp", "ddp"), rounds, lambda mode, _: launch(mode, workload, 2, args.threads)[0])
    per_round = {
        mode: [median(step_times(run["stamps"], WARMUP_STEPS)) for run in runs]
        for mode, runs in timed.items()
    }
    rep = {
        "what": "per-rank bytes of base weights, adapters and optimizer state under FSDP at world sizes "
        + ", ".join(map(str, worlds))
        + "; FSDP vs DDP step time at world size 2",
        "command": "python bench/fsdp_memory.py" + (" --quick" if args.quick else ""),
        "machine": machine_info(args.threads),
        "settings": {
            "workload": json.loads(workload.to_json()),
            "rounds": rounds,
            "warmup_steps": WARMUP_STEPS,
        },
        "memory": {
            str(w): [{k: v for k, v in r.items() if k != "stamps"} for r in ranks]
            for w, ranks in memory.items()
        },
        "speed": {mode: spread(times) for mode, times in per_round.items()},
        "speed_ratio": median(paired_ratios(per_round["fsdp"], per_round["ddp"])),
        "losses": {mode: runs[0]["losses"] for mode, runs in timed.items()},
    }
    write_results(NAME, rep, markdown(rep), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
