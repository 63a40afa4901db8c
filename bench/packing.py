"""Packing: useful (non-padding) tokens per second, packed rows against padded batches.

Three ways to batch the same examples, trained the same way (``Trainer.fit`` with
``PagedQLoRAStrategy`` on the tiny Llama of ``workloads.py``, NF4 + LoRA, paged 8-bit AdamW):

- ``packed``: whole examples packed into rows of at most ``max_length`` tokens
  (``lightning_paged.core.packing``: first-fit decreasing over shuffled windows of 1,000), rows in a
  seeded random order, ``position_ids`` restarting per example and no attention mask;
- ``padded_grouped``: batches of similar-length examples (``LengthGroupedBatchSampler``), each padded
  to its longest;
- ``padded_random``: batches in a random order, each padded to its longest (the default).

Two data sets: the shipped instruction data (``examples/data/instructions.jsonl``, byte tokenizer,
``max_length`` 512, nothing cut) and a synthetic long-tailed one (lognormal lengths, median 150 and
99th percentile 1,500 tokens, cut at ``max_length`` 2,048). Padded batches hold ``batch_size``
examples; packed batches hold as many rows as carry about the same useful tokens, so the three do
similar work per step. Useful tokens/s is the real tokens of the measured steps over their time;
the headline is the ratio packed / padded_random, per round (the variants of a round run back to back
in one process, in a shuffled order) and its median. The script also checks that the first packed
batch's loss equals the loss of the same examples batched unpacked.

    python bench/packing.py            # both data sets, 3 rounds: a few minutes on 2 CPU cores
    python bench/packing.py --quick    # smoke test: fewer steps, one round

Goal: packed >= 1.5x padded_random useful tokens/s on the long-tailed set, with padding under 5 %.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    emit_result,
    interleaved,
    machine_info,
    markdown_table,
    median,
    run_worker,
    set_threads,
    write_results,
)
from workloads import TINY

NAME = "packing"
SCRIPT = Path(__file__).resolve()
VARIANTS = ("packed", "padded_grouped", "padded_random")
BASELINE = "padded_random"
GOAL_RATIO = 1.5
GOAL_PADDING = 0.05
SKIP_STEPS = 2
"""Warm-up steps left out of each run's throughput."""
PADDED_BATCH = 8
"""Examples per padded batch."""
MAX_LENGTH = {"shipped": 512, "long_tailed": 2048}
LONG_TAILED = {"examples": 1500, "median": 150, "p99": 1500}
MODEL = replace(TINY, vocab_size=320, seq_len=2048)
"""The tiny Llama (hidden 64, 2 blocks), with room for the byte tokenizer's 259 ids and 2,048 positions."""
WIDE = replace(MODEL, hidden_size=512, intermediate_size=1408, num_layers=1, num_heads=8, num_kv_heads=4)
"""One block as wide as the default workload's: the linear layers, not attention, dominate a step."""
MODELS = {"tiny": MODEL, "wide": WIDE}
CASES = (("shipped", "tiny"), ("long_tailed", "tiny"), ("long_tailed", "wide"))
"""(data set, model) pairs measured; each is one worker process."""


def long_tailed_examples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Lognormal lengths (median 150, 99th percentile 1,500): a third prompt, the rest response."""
    import random

    rng = random.Random(seed)
    sigma = math.log(LONG_TAILED["p99"] / LONG_TAILED["median"]) / 2.3263  # z of the 99th percentile
    out = []
    for _ in range(n):
        length = max(8, min(MAX_LENGTH["long_tailed"], round(rng.lognormvariate(math.log(150), sigma))))
        ids = [rng.randrange(259) for _ in range(length)]
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def shipped_examples() -> list[dict[str, list[int]]]:
    from lightning_paged.lightning.data import InstructionDataModule

    dm = InstructionDataModule(
        str(REPO / "examples" / "data" / "instructions.jsonl"), max_length=MAX_LENGTH["shipped"], val_split=0
    )
    dm.setup("fit")
    assert dm.train_data is not None and dm.num_truncated == 0
    return dm.train_data


def batches_of(variant: str, data: list[dict[str, list[int]]], max_length: int, steps: int) -> list[dict]:
    """The first ``steps`` batches of ``variant``'s loader over ``data`` (epoch 0, seed 0)."""
    from torch.utils.data import DataLoader

    from lightning_paged.core.packing import PackCollator, PackedDataset, PadCollator, model_inputs
    from lightning_paged.core.sampling import ResumableSampler
    from lightning_paged.lightning.data import LengthGroupedBatchSampler

    if variant == "packed":
        rows = PackedDataset(data, max_length, seed=0)
        mean_row = sum(rows.lengths) / len(rows)
        per_batch = max(1, round(PADDED_BATCH * sum(rows.lengths) / len(data) / mean_row))
        loader = DataLoader(
            rows, batch_size=per_batch, sampler=ResumableSampler(rows, seed=0), collate_fn=PackCollator(256)
        )
    elif variant == "padded_grouped":
        lengths = [len(e["input_ids"]) for e in data]
        sampler = LengthGroupedBatchSampler(
            ResumableSampler(data, seed=0), PADDED_BATCH, False, lengths=lengths
        )
        loader = DataLoader(data, batch_sampler=sampler, collate_fn=PadCollator(256))  # type: ignore[arg-type]
    else:
        loader = DataLoader(
            data,  # type: ignore[arg-type]
            batch_size=PADDED_BATCH,
            sampler=ResumableSampler(data, seed=0),
            collate_fn=PadCollator(256),
        )
    out = []
    for batch in loader:
        tokens = int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())
        out.append({"inputs": model_inputs(batch), "tokens": tokens, "positions": batch["input_ids"].numel()})
        if len(out) == steps:
            break
    return out


def first_step_loss(data: list[dict[str, list[int]]], max_length: int, model_name: str) -> dict[str, float]:
    """Loss of the first packed batch and of the same examples padded, on the same fp32 model."""
    import torch
    from workloads import build_model

    from lightning_paged.core.packing import PackCollator, PackedDataset, PadCollator, model_inputs

    model = build_model(MODELS[model_name]).eval()
    rows = PackedDataset(data, max_length, seed=0)
    first = [rows[i] for i in range(min(2, len(rows)))]
    with torch.no_grad():
        packed = model(**model_inputs(PackCollator(256)(first))).loss.item()
        padded = model(**model_inputs(PadCollator(256)([e for row in first for e in row]))).loss.item()
    return {"packed": packed, "padded": padded, "abs_difference": abs(packed - padded)}


def worker(dataset: str, model_name: str, rounds: int, steps: int, threads: int) -> None:
    set_threads(threads)
    from workloads import preload, run_lightning_paged

    preload("lightning_paged")
    data = shipped_examples() if dataset == "shipped" else long_tailed_examples(LONG_TAILED["examples"])
    max_length = MAX_LENGTH[dataset]
    prepared = {v: batches_of(v, data, max_length, steps + SKIP_STEPS) for v in VARIANTS}

    def run(variant: str, _round: int) -> dict[str, Any]:
        batches = prepared[variant]
        workload = replace(MODELS[model_name], steps=len(batches))
        stamps = run_lightning_paged(workload, batches=[b["inputs"] for b in batches])["stamps"]
        measured = batches[SKIP_STEPS:]
        seconds = stamps[-1] - stamps[SKIP_STEPS]
        tokens = sum(b["tokens"] for b in measured)
        positions = sum(b["positions"] for b in measured)
        return {
            "useful_tokens_per_s": tokens / seconds,
            "seconds": seconds,
            "useful_tokens": tokens,
            "positions": positions,
            "padding_fraction": 1 - tokens / positions,
            "steps": len(measured),
        }

    results = interleaved(VARIANTS, rounds, run, log=lambda m: print(m, file=sys.stderr))
    lengths = [len(e["input_ids"]) for e in data]
    from lightning_paged.core.packing import PackedDataset

    rows = PackedDataset(data, max_length, seed=0)
    emit_result(
        {
            "dataset": dataset,
            "model": model_name,
            "model_shape": {
                k: getattr(MODELS[model_name], k)
                for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "vocab_size")
            },
            "examples": len(data),
            "max_length": max_length,
            "lengths": {
                "median": sorted(lengths)[len(lengths) // 2],
                "p99": sorted(lengths)[int(0.99 * (len(lengths) - 1))],
                "max": max(lengths),
                "mean": sum(lengths) / len(lengths),
            },
            "packed_rows": len(rows),
            "packed_fill_rate": rows.fill_rate,
            "rows_per_packed_batch": prepared["packed"][0]["inputs"]["input_ids"].shape[0],
            "first_step_loss": first_step_loss(data, max_length, model_name),
            "runs": results,
            "threads": threads,
        }
    )


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    rates = {v: [r["useful_tokens_per_s"] for r in runs[v]] for v in VARIANTS}
    ratios = {v: [a / b for a, b in zip(rates[v], rates[BASELINE])] for v in VARIANTS}
    padding = {v: median(r["padding_fraction"] for r in runs[v]) for v in VARIANTS}
    return {
        "useful_tokens_per_s": {v: median(rates[v]) for v in VARIANTS},
        "ratio_to_padded_random": {v: median(ratios[v]) for v in VARIANTS},
        "ratio_per_round": {v: [round(x, 3) for x in ratios[v]] for v in VARIANTS},
        "padding_fraction": padding,
    }


def case_name(dataset: str, model_name: str) -> str:
    return f"{dataset}/{model_name}"


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        "# Packing: useful tokens per second",
        "",
        f"Command: `{report['command']}`. Machine: {machine['device']}, {machine['cpu_cores']} cores (shared), "
        f"{machine['threads_per_run']} thread. Training: NF4 + LoRA r={MODEL.lora_r}, paged 8-bit AdamW, "
        f"`Trainer.fit` with `PagedQLoRAStrategy`, sdpa attention; {report['rounds']} interleaved rounds "
        f"(the variants of a round run back to back in one process, in a shuffled order), {SKIP_STEPS} warm-up "
        "steps left out of each run.",
        "",
    ]
    for name, result in report["cases"].items():
        summary = report["summary"][name]
        lengths, loss, shape = result["lengths"], result["first_step_loss"], result["model_shape"]
        lines += [
            f"## {name}",
            "",
            f"{report['steps_per_run'][name]} measured steps per run.",
            "",
            f"Model: Llama, hidden {shape['hidden_size']}, {shape['num_layers']} block(s), vocabulary "
            f"{shape['vocab_size']}. Data: {result['examples']} examples, lengths median {lengths['median']}, "
            f"p99 {lengths['p99']}, max {lengths['max']}; max_length {result['max_length']}. Packed into "
            f"{result['packed_rows']} rows ({result['packed_fill_rate']:.1%} filled), "
            f"{result['rows_per_packed_batch']} row(s) per packed batch against {PADDED_BATCH} examples per "
            "padded batch.",
            "",
            markdown_table(
                [
                    "variant",
                    "useful tokens/s (median)",
                    "ratio to padded_random",
                    "ratio per round",
                    "padding",
                ],
                [
                    [
                        v,
                        f"{summary['useful_tokens_per_s'][v]:.0f}",
                        f"{summary['ratio_to_padded_random'][v]:.2f}",
                        ", ".join(f"{x:.2f}" for x in summary["ratio_per_round"][v]),
                        f"{summary['padding_fraction'][v]:.1%}",
                    ]
                    for v in VARIANTS
                ],
            ),
            "",
            f"First-step loss on the same examples: packed {loss['packed']:.7f}, unpacked {loss['padded']:.7f} "
            f"(difference {loss['abs_difference']:.1e}).",
            "",
        ]
    for name, summary in report["summary"].items():
        if name.startswith("long_tailed"):
            ratio, padding = (
                summary["ratio_to_padded_random"]["packed"],
                summary["padding_fraction"]["packed"],
            )
            met = ratio >= GOAL_RATIO and padding < GOAL_PADDING
            lines.append(
                f"- Goal on {name} (packed >= {GOAL_RATIO}x padded_random, padding < {GOAL_PADDING:.0%}): "
                f"{ratio:.2f}x, {padding:.1%} padding: {'met' if met else 'not met'}."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: two steps, one round, tiny model only"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, help="measured steps per run (default 10, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and Markdown go (default bench/results)")
    parser.add_argument("--worker", nargs=2, metavar=("DATASET", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 10)
    if args.worker:
        worker(args.worker[0], args.worker[1], rounds, steps, args.threads)
        return 0
    started = time.perf_counter()
    machine = machine_info(threads=args.threads)
    cases = {}
    for dataset, model_name in CASES:
        if args.quick and model_name != "tiny":
            continue
        # the wide model's steps take several times longer: half as many keep the run to minutes
        case_steps = steps if model_name == "tiny" else max(2, steps // 2)
        worker_args = [dataset, model_name, "--rounds", str(rounds), "--steps", str(case_steps)]
        cases[case_name(dataset, model_name)] = run_worker(SCRIPT, worker_args, args.threads)
    report = {
        "name": NAME,
        "command": "python bench/packing.py" + (" --quick" if args.quick else ""),
        "machine": machine,
        "rounds": rounds,
        "steps_per_run": {name: result["runs"]["packed"][0]["steps"] for name, result in cases.items()},
        "cases": cases,
        "summary": {name: summarize(result) for name, result in cases.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_results(NAME, report, markdown(report), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
