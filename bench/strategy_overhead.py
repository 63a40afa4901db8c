"""Strategy overhead: lightning_paged ``Trainer.fit`` against a hand-written bitsandbytes + PEFT loop.

Both train the same Llama (built from a config with the same seed), quantized the same way (NF4,
double quantization), with the same LoRA adapters (same initial values), the same paged 8-bit AdamW
and the same batches in the same order; their losses agree to float precision, which the result
records as a check that both did the same work. What differs is only what runs around the model:
Lightning's loop, hooks and the strategy, against a bare ``for`` loop.

Every run is a fresh Python process (so its peak memory is its own), with the same number of
threads (one by default: where the cores are shared with other work, two threads per run make
OpenMP wait on descheduled threads and steps grow 10-30x slower and erratic); runs are interleaved (each round runs both, in a shuffled order) and compared by medians.

On a shared machine the end-to-end ratio carries the noise of everything else running, so each
worker then also trains a model with almost no compute (``MICRO``) both ways: the difference of
their CPU time per step is the loop's own cost, measured directly, and projected onto the full
model's step time.

    python bench/strategy_overhead.py            # 23M-parameter Llama, 8 rounds: 5-10 minutes on CPU
    python bench/strategy_overhead.py --quick    # smoke test: a tiny model, one round

Goal: step-time ratio (lightning_paged / hand-written) at most 1.02.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    compare_runs,
    emit_result,
    interleaved,
    machine_info,
    markdown_table,
    median,
    pair_rows,
    run_step_median,
    run_worker,
    set_threads,
    spread_note,
    write_results,
)
from workloads import TINY, Workload

NAME = "strategy_overhead"
SCRIPT = Path(__file__).resolve()
VARIANT, BASELINE = "lightning_paged", "hand_written"
GOAL = 1.02
SKIP_STEPS = 3
"""Warm-up steps left out of each run's median step time (first-step allocations, lazy optimizer state)."""

QUICK = TINY
FULL = Workload(num_layers=5, batch_size=2, seq_len=64, steps=16)
"""23M parameters (hidden 512, 5 blocks, vocabulary 8192); batch 2 x 64 tokens, 16 steps per run."""
MICRO = Workload(
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    vocab_size=64,
    batch_size=1,
    seq_len=8,
    steps=60,
)
"""A model with almost no compute: its step time is the loop's own cost, measured in the same worker."""


def worker(variant: str, workload: Workload, threads: int) -> None:
    set_threads(threads)
    from workloads import preload, run_hand_written, run_lightning_paged

    preload(variant)

    run = run_lightning_paged if variant == VARIANT else run_hand_written
    result = run(workload)
    micro = run(replace(MICRO, steps=min(MICRO.steps, 4 * workload.steps)))
    result["micro"] = {key: micro[key] for key in ("stamps", "cpu_stamps", "losses")}
    emit_result(result)


def fixed_cost(results: dict[str, list[dict[str, Any]]], comparison: dict[str, Any]) -> dict[str, Any]:
    """The per-step cost of Lightning's loop and the strategy, measured directly on the micro model.

    CPU time of a step with almost no compute, lightning_paged minus the hand-written loop, round by
    round; projected onto the full model's CPU step time as the ratio that cost alone would give.
    """
    per_round = [
        run_step_median(ours["micro"], SKIP_STEPS, "cpu_stamps")
        - run_step_median(theirs["micro"], SKIP_STEPS, "cpu_stamps")
        for ours, theirs in zip(results[VARIANT], results[BASELINE])
    ]
    cost = median(per_round)
    base = comparison["cpu_step_time_s"][BASELINE]["median"]
    return {
        "micro_workload": MICRO.__dict__,
        "extra_cpu_s_per_step": cost,
        "extra_cpu_s_per_step_per_round": [round(x, 6) for x in per_round],
        "micro_cpu_step_s": {
            name: median(run_step_median(r["micro"], SKIP_STEPS, "cpu_stamps") for r in results[name])
            for name in (VARIANT, BASELINE)
        },
        "projected_ratio": (base + cost) / base,
    }


def report(
    workload: Workload,
    results: dict[str, list[dict[str, Any]]],
    rounds: int,
    machine: dict[str, Any],
    quick: bool,
):
    comparison = compare_runs(results, VARIANT, BASELINE, SKIP_STEPS)
    fixed = fixed_cost(results, comparison)
    return {
        "what": "lightning_paged Trainer.fit vs a hand-written bitsandbytes + PEFT loop, same model/data/seed",
        "command": "python bench/strategy_overhead.py" + (" --quick" if quick else ""),
        "machine": machine,
        "settings": {
            "workload": workload.__dict__,
            "parameters": workload.parameter_count(),
            "rounds": rounds,
            "warmup_steps_skipped": SKIP_STEPS,
            "lightning_trainer": "logger, checkpointing, progress bar and model summary off",
        },
        "goal": {
            "step_time_ratio_max": GOAL,
            "met": comparison["step_time_ratio"] <= GOAL,
            "met_in_cpu_time": comparison["cpu_step_time_ratio"] <= GOAL,
            "met_by_fixed_cost": fixed["projected_ratio"] <= GOAL,
        },
        "comparison": comparison,
        "fixed_cost": fixed,
        "runs": results,
    }


def markdown(rep: dict[str, Any]) -> str:
    c = rep["comparison"]
    f = rep["fixed_cost"]
    w = rep["settings"]["workload"]
    rows = pair_rows(c, VARIANT, BASELINE)
    verdict = "met" if rep["goal"]["met"] else "missed"
    cpu_verdict = "met" if rep["goal"]["met_in_cpu_time"] else "missed"
    return "\n".join(
        [
            f"## Strategy overhead ({rep['machine']['device']}, {rep['machine']['threads_per_run']} threads)",
            "",
            f"Llama of {rep['settings']['parameters'] / 1e6:.1f}M parameters, batch {w['batch_size']} x "
            f"{w['seq_len']} tokens, {w['steps']} steps per run, {rep['settings']['rounds']} interleaved rounds, "
            f"each run in a fresh process.",
            "",
            markdown_table(["", "lightning_paged", "hand-written loop", "ratio"], rows),
            "",
            f"Step-time ratio per round, wall: {c['step_time_ratio_per_round']} (goal <= {GOAL}: {verdict}); "
            f"CPU time: {c['cpu_step_time_ratio_per_round']} (goal {cpu_verdict}). "
            f"Largest loss difference between the two: {c['loss_max_abs_difference']:.2e}.",
            "",
            spread_note(c, VARIANT, BASELINE),
            "",
            f"Measured directly (a model with almost no compute, same processes): Lightning's loop and the "
            f"strategy add {f['extra_cpu_s_per_step'] * 1e3:.2f} ms of CPU time per step "
            f"({f['micro_cpu_step_s'][VARIANT] * 1e3:.2f} ms against {f['micro_cpu_step_s'][BASELINE] * 1e3:.2f} ms), "
            f"which on this model's steps is a ratio of {f['projected_ratio']:.4f} "
            f"(goal {'met' if rep['goal']['met_by_fixed_cost'] else 'missed'}).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, one round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 8, 1 with --quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and Markdown go (default bench/results)")
    parser.add_argument("--worker", choices=[VARIANT, BASELINE], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Workload.from_json(args.workload), args.threads)
        return 0

    workload = replace(QUICK if args.quick else FULL, **({"steps": args.steps} if args.steps else {}))
    rounds = args.rounds or (1 if args.quick else 8)
    print(
        f"{NAME}: {workload.parameter_count() / 1e6:.1f}M parameters, {rounds} rounds, {args.threads} threads"
    )

    def run(variant: str, _round: int) -> dict[str, Any]:
        return run_worker(SCRIPT, [variant, "--workload", workload.to_json()], args.threads)

    machine = machine_info(args.threads)  # before the runs: the load they started under
    results = interleaved([VARIANT, BASELINE], rounds, run)
    rep = report(workload, results, rounds, machine, args.quick)
    write_results(NAME, rep, markdown(rep), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
