"""lightning_paged against transformers ``Trainer`` + PEFT QLoRA with ``optim="paged_adamw_8bit"``.

The transformers side is the usual recipe: ``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)``,
``prepare_model_for_kbit_training``, ``get_peft_model`` and ``Trainer``. Both sides load the same
saved Llama (built from a config, written with ``save_pretrained``), put LoRA on the same layers with
the same initial values, train with a constant learning rate, no weight decay, no gradient clipping,
and see the same batches in the same order (``train_sampling_strategy="sequential"``).

Every run is a fresh Python process with the same number of threads (one by default, see
``strategy_overhead.py``); runs are interleaved and compared by medians. Besides the step-time and
peak-memory ratios, the result holds both loss curves side by side and their largest difference.

    python bench/vs_transformers_trainer.py            # 23M-parameter Llama, 6 rounds: 5-10 minutes
    python bench/vs_transformers_trainer.py --quick    # smoke test: a tiny model, one round
"""

from __future__ import annotations

import argparse
import sys
import tempfile
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
    matplotlib_available,
    pair_rows,
    result_paths,
    run_worker,
    set_threads,
    spread_note,
    write_results,
)
from workloads import TINY, Workload

NAME = "vs_transformers_trainer"
SCRIPT = Path(__file__).resolve()
VARIANT, BASELINE = "lightning_paged", "transformers_trainer"
SKIP_STEPS = 3
"""Warm-up steps left out of each run's median step time."""

QUICK = TINY
FULL = Workload(num_layers=5, batch_size=2, seq_len=64, steps=24)
"""23M parameters (hidden 512, 5 blocks, vocabulary 8192); batch 2 x 64 tokens, 24 steps per run."""


def worker(variant: str, workload: Workload, source: Path, threads: int) -> None:
    set_threads(threads)
    from workloads import preload, run_lightning_paged, run_transformers_trainer

    preload(variant)
    if variant == VARIANT:
        emit_result(run_lightning_paged(workload, source))
        return
    with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as output_dir:
        emit_result(run_transformers_trainer(workload, source, Path(output_dir)))


def loss_table(ours: list[float], theirs: list[float]) -> list[dict[str, float]]:
    return [
        {"step": i + 1, VARIANT: a, BASELINE: b, "difference": a - b}
        for i, (a, b) in enumerate(zip(ours, theirs))
    ]


def report(
    workload: Workload,
    results: dict[str, list[dict[str, Any]]],
    rounds: int,
    machine: dict[str, Any],
    quick: bool,
):
    comparison = compare_runs(results, VARIANT, BASELINE, SKIP_STEPS)
    curves = loss_table(results[VARIANT][0]["losses"], results[BASELINE][0]["losses"])
    return {
        "what": "lightning_paged Trainer.fit vs transformers Trainer + PEFT QLoRA (paged_adamw_8bit), same model/data/seed",
        "command": "python bench/vs_transformers_trainer.py" + (" --quick" if quick else ""),
        "machine": machine,
        "settings": {
            "workload": workload.__dict__,
            "parameters": workload.parameter_count(),
            "rounds": rounds,
            "warmup_steps_skipped": SKIP_STEPS,
            "transformers": "BitsAndBytesConfig nf4 + double quant, prepare_model_for_kbit_training, "
            "get_peft_model, Trainer(optim=paged_adamw_8bit, lr_scheduler_type=constant, max_grad_norm=0, "
            "train_sampling_strategy=sequential, logging off)",
            "lightning_paged": "PagedQLoRAStrategy + PagedOptimizerMixin(paged_adamw_8bit, constant); "
            "logger, checkpointing, progress bar off",
        },
        "comparison": comparison,
        "loss_curves": curves,
        "runs": results,
    }


def markdown(rep: dict[str, Any], plot: Path | None) -> str:
    c = rep["comparison"]
    w = rep["settings"]["workload"]
    rows = pair_rows(c, VARIANT, BASELINE)
    curves = rep["loss_curves"]
    shown = curves if len(curves) <= 12 else [*curves[:: max(1, len(curves) // 8)], curves[-1]]
    loss_rows = [
        [r["step"], f"{r[VARIANT]:.6f}", f"{r[BASELINE]:.6f}", f"{r['difference']:+.2e}"] for r in shown
    ]
    lines = [
        f"## lightning_paged vs transformers Trainer ({rep['machine']['device']}, "
        f"{rep['machine']['threads_per_run']} threads)",
        "",
        f"Llama of {rep['settings']['parameters'] / 1e6:.1f}M parameters, batch {w['batch_size']} x "
        f"{w['seq_len']} tokens, {w['steps']} steps per run, {rep['settings']['rounds']} interleaved rounds, "
        "each run in a fresh process.",
        "",
        markdown_table(["", "lightning_paged", "transformers Trainer", "ratio"], rows),
        "",
        f"Step-time ratio per round, wall: {c['step_time_ratio_per_round']}; "
        f"CPU time: {c['cpu_step_time_ratio_per_round']}. " + spread_note(c, VARIANT, BASELINE),
        "",
        f"Loss curves (first round; largest difference {c['loss_max_abs_difference']:.2e} over all rounds):",
        "",
        markdown_table(["step", "lightning_paged", "transformers Trainer", "difference"], loss_rows),
    ]
    if plot is not None:
        lines += ["", f"![loss curves]({plot.name})"]
    return "\n".join(lines)


def plot_losses(rep: dict[str, Any], path: Path) -> Path | None:
    """Both loss curves and their difference, as a PNG; None without matplotlib."""
    if not matplotlib_available():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = rep["loss_curves"]
    steps = [r["step"] for r in curves]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    top.plot(steps, [r[VARIANT] for r in curves], label="lightning_paged", linewidth=2)
    top.plot(steps, [r[BASELINE] for r in curves], label="transformers Trainer", linestyle="--")
    top.set_ylabel("training loss")
    top.legend()
    top.set_title("Same model, data and seed: loss per step")
    bottom.plot(steps, [r["difference"] for r in curves], color="black")
    bottom.set_ylabel("difference")
    bottom.set_xlabel("optimizer step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_source(workload: Workload, directory: Path) -> None:
    from workloads import save_model

    set_threads(1)
    save_model(workload, directory)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, one round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 6, 1 with --quick)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1)")
    parser.add_argument(
        "--out-dir", type=Path, help="where the JSON, Markdown and plot go (default bench/results)"
    )
    parser.add_argument("--worker", choices=[VARIANT, BASELINE], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Workload.from_json(args.workload), args.source, args.threads)
        return 0

    workload = replace(QUICK if args.quick else FULL, **({"steps": args.steps} if args.steps else {}))
    rounds = args.rounds or (1 if args.quick else 6)
    print(
        f"{NAME}: {workload.parameter_count() / 1e6:.1f}M parameters, {rounds} rounds, {args.threads} threads"
    )
    with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as tmp:
        source = Path(tmp) / "model"
        save_source(workload, source)

        def run(variant: str, _round: int) -> dict[str, Any]:
            worker_args = [variant, "--workload", workload.to_json(), "--source", str(source)]
            return run_worker(SCRIPT, worker_args, args.threads)

        machine = machine_info(args.threads)  # before the runs: the load they started under
        results = interleaved([VARIANT, BASELINE], rounds, run)
    rep = report(workload, results, rounds, machine, args.quick)
    json_path, _ = result_paths(NAME, args.quick, args.out_dir)
    plot = plot_losses(rep, json_path.with_name(json_path.stem + "_losses.png"))
    rep["plot"] = plot.name if plot else None
    write_results(NAME, rep, markdown(rep, plot), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
