"""FSDP memory and speed: what each rank holds under paged_qlora_fsdp's core, and its step time against DDP.

1. The load: the per-rank peak of anonymous host memory (``RssAnon``, sampled every millisecond,
   above the level after the imports) while a saved model directory is loaded by
   ``convert_and_shard`` (each rank reads and quantizes one layer at a time and keeps only its
   shard of each block), at world size 1, 2 and 4, as a ratio to world size 1. The model is a Llama
   of 96 blocks of width 1024 with a 2,048-token vocabulary, so its blocks are 98 % of its weights.
   Goals: at most 0.6x of world size 1 at 2, at most 0.35x at 4.
2. Per-rank bytes at world size 1, 2 and 4 (CPU processes over gloo, one thread each) after training
   steps: the packed 4-bit base weights of the rank's shards, the quantization constants every rank
   keeps whole, the other weights (embeddings, norms, head) of its shards, its adapter shards and its
   optimizer state, counted from the tensors themselves; plus the process's anonymous host memory
   above its imports after the steps.
3. Step time of the same model and global batches at world size 2: FSDP2 (``fully_shard`` per block,
   the bitsandbytes optimizer stepping local shards) against DDP (whole 4-bit replica per rank), as the
   ratio of median step times over interleaved rounds.

In 2 and 3 every rank builds the model from the same config and seed; FSDP converts and shards it
block by block (``convert_and_shard``), DDP converts it whole.

    python bench/fsdp_memory.py            # about 15 minutes on 2 cores (the 2.3 GB load model is generated once)
    python bench/fsdp_memory.py --quick    # smoke test: small models, world sizes 1 and 2
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
from load_memory import AnonPeak, generate
from workloads import TINY, Workload, build_model, make_batches

sys.path.insert(0, str(REPO))

NAME = "fsdp_memory"
FULL = Workload(num_layers=8, batch_size=4, seq_len=64, steps=8)
QUICK = replace(TINY, batch_size=4, steps=3)
WARMUP_STEPS = 2
LOAD_MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=96, vocab_size=2048)
LOAD_MODEL_QUICK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=512)
LOAD_GOALS = {2: 0.6, 4: 0.35}
"""Per-rank load peak at each world size, as a fraction of world size 1's, at most."""


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

    from lightning_paged.core.fsdp import local_tensor
    from lightning_paged.core.fsdp_load import convert_and_shard
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
    report = None
    if mode == "fsdp":  # same seed on every rank: same weights and adapters
        _, report = convert_and_shard(model, config, torch.device("cpu"), init_device_mesh("cpu", (world,)))
        trained: Any = model
    else:
        convert_to_qlora(model, config, device="cpu")
        trained = torch.nn.parallel.DistributedDataParallel(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    constants = (
        report.quant_state_bytes
        if report
        else sum(quantized_weight_bytes(la) - _nbytes(la.weight) for la in layers)
    )
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


def load_worker(directory: Path, rank: int, world: int) -> dict[str, Any]:
    """One rank of the sharded load: its peak ``RssAnon`` above the imports, and the bytes it keeps."""
    import bitsandbytes as bnb
    import peft  # noqa: F401
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from lightning_paged.core.fsdp_load import convert_and_shard
    from lightning_paged.core.loading import empty_model
    from lightning_paged.core.qlora import QLoRAConfig

    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    bnb.functional.quantize_4bit(torch.randn(64, 64))  # bitsandbytes' CPU library loaded before the window
    config = QLoRAConfig(quant_storage="bfloat16", lora_dropout=0.0, gradient_checkpointing=False)
    baseline = _rss_anon()
    started = time.perf_counter()
    with AnonPeak() as peak:
        model = empty_model(directory)
        report, shard = convert_and_shard(model, config, torch.device("cpu"), mesh)
    seconds = time.perf_counter() - started
    largest = max(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    dist.barrier()
    dist.destroy_process_group()
    return {
        "world_size": world,
        "rank": rank,
        "peak_above_imports_bytes": peak.peak - baseline,
        "local_packed_bytes": shard.local_packed_bytes,
        "total_packed_bytes": shard.total_packed_bytes,
        "quant_constants_bytes": shard.quant_state_bytes,
        "largest_layer_16bit_bytes": largest * 2,
        "parameters": report.total_params,
        "seconds": round(seconds, 2),
    }


def launch_load(directory: Path, world: int, threads: int) -> list[dict[str, Any]]:
    """``world`` ranks loading ``directory`` sharded; each rank's result, rank order."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**thread_env(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        command = [sys.executable, __file__, "--worker", "load", "--dir", str(directory)]
        command += ["--rank", str(rank), "--world", str(world), "--threads", str(threads)]
        procs.append(
            subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    return [_result(proc, f"load rank {rank}/{world}") for rank, proc in enumerate(procs)]


def _result(proc: subprocess.Popen, what: str) -> dict[str, Any]:
    out, err = proc.communicate(timeout=1800)
    lines = [line for line in out.decode().splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{what} failed:\n{err.decode()[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def load_rows(loads: dict[int, list[dict[str, Any]]]) -> list[list[Any]]:
    base = max(r["peak_above_imports_bytes"] for r in loads[min(loads)])
    rows = []
    for world, ranks in loads.items():
        peak = max(r["peak_above_imports_bytes"] for r in ranks)
        goal = LOAD_GOALS.get(world)
        rows.append(
            [
                world,
                fmt_bytes(ranks[0]["local_packed_bytes"]),
                fmt_bytes(ranks[0]["quant_constants_bytes"]),
                fmt_bytes(peak),
                f"{peak / base:.3f}",
                f"<= {goal}" if goal else "",
            ]
        )
    return rows


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
    return [_result(proc, f"{mode} rank {rank}/{world}") for rank, proc in enumerate(procs)]


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
    load = rep["load"]
    loads = {int(k): v for k, v in load["runs"].items()}
    lines = [
        "# FSDP memory per rank and step time against DDP",
        "",
        "## Peak host memory per rank while loading (sharded load)",
        "",
        f"`{rep['command']}`: a Llama of {load['model']['num_hidden_layers']} blocks of width "
        f"{load['model']['hidden_size']}, vocabulary {load['model']['vocab_size']} "
        f"({load['parameters']:,} parameters before LoRA), saved in bfloat16; NF4, bfloat16 compute and storage.",
        "",
        markdown_table(
            [
                "world size",
                "packed 4-bit kept (rank 0)",
                "quant. constants (whole)",
                "peak RssAnon above imports (max rank)",
                "vs world 1",
                "goal",
            ],
            load_rows(loads),
        ),
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
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/lightning_paged_bench"))
    parser.add_argument("--worker", choices=("fsdp", "ddp", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        set_threads(args.threads)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if args.worker == "load":
            emit_result(load_worker(args.dir, args.rank, args.world))
        else:
            emit_result(worker(args.worker, Workload.from_json(args.workload), args.rank, args.world))
        return 0

    workload = QUICK if args.quick else FULL
    worlds = (1, 2) if args.quick else (1, 2, 4)
    rounds = 1 if args.quick else 3
    load_model = LOAD_MODEL_QUICK if args.quick else LOAD_MODEL
    directory = args.cache_dir / (
        "fsdp-load-{hidden_size}x{num_hidden_layers}-v{vocab_size}".format(**load_model)
    )
    generate(directory, load_model, shard_mb=100)
    loads = {world: launch_load(directory, world, args.threads) for world in worlds}
    base = max(r["peak_above_imports_bytes"] for r in loads[1])
    load_ratios = {w: max(r["peak_above_imports_bytes"] for r in ranks) / base for w, ranks in loads.items()}
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
        "load": {
            "model": load_model,
            "parameters": loads[1][0]["parameters"],
            "runs": {str(w): ranks for w, ranks in loads.items()},
            "ratio_to_world_1": {str(w): round(r, 4) for w, r in load_ratios.items()},
            "goals_met": {str(w): load_ratios[w] <= g for w, g in LOAD_GOALS.items() if w in load_ratios},
        },
        "speed": {mode: spread(times) for mode, times in per_round.items()},
        "speed_ratio": median(paired_ratios(per_round["fsdp"], per_round["ddp"])),
        "losses": {mode: runs[0]["losses"] for mode, runs in timed.items()},
    }
    write_results(NAME, rep, markdown(rep), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
