"""GPU tokens/s and memory: lightning_paged against transformers Trainer, and what paging buys under a budget.

Needs a CUDA GPU; on a machine without one it says so and exits with status 2, measuring nothing.

Part ``throughput``: a ~1.1B-parameter Llama (TinyLlama's shape, built from a config, random weights,
saved once with ``save_pretrained`` in bfloat16) trained as NF4 QLoRA with ``paged_adamw_8bit``, batch
1, bfloat16 compute, non-reentrant gradient checkpointing, at sequence lengths 512 to 4096: tokens/s
(median over the steps after warm-up) and peak device memory (the allocator's peak reservation plus the
optimizer state in managed memory, which ``max_memory_allocated`` never sees: ``workloads.gpu_memory``;
both load the weights in bfloat16 and quantize them from it), lightning_paged
against transformers ``Trainer`` + PEFT (the usual recipe: ``BitsAndBytesConfig``,
``prepare_model_for_kbit_training``, ``get_peft_model``). Each run is a fresh process; rounds are
interleaved.

Part ``budget``: the longest sequence that trains when only ``--budget-gib`` of device memory is left
free, with a paged (``paged_adamw_8bit``) and a non-paged (``adamw_8bit``) optimizer. A run takes one
short step (so the optimizer state exists and is resident), then allocates a ballast tensor that
leaves the budget free (``../shared`` notes: ``set_per_process_memory_fraction`` cannot create this
pressure; a real allocation can), then trains ``--budget-steps`` steps at the probed length. A binary
search over lengths (multiples of ``--seq-step``) finds the longest that trains; every probe is a
fresh process. The tokens/s of both optimizers at the longest length both reach is what paging
costs. Paging helps by the size of the optimizer state the driver can evict: with LoRA r=16 on a 1B
model that state is about 25 MB, so expect a small gain; raise ``--lora-r`` to see it grow.

    python bench/gpu_tokens.py                      # both parts, 20-30 minutes on one GPU
    python bench/gpu_tokens.py --part throughput    # or --part budget
    python bench/gpu_tokens.py --quick              # smoke test on a GPU: small model, short lengths
    python bench/gpu_tokens.py --plan               # print what would run (works without a GPU)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    emit_result,
    fmt_bytes,
    interleaved,
    machine_info,
    markdown_table,
    median,
    run_worker,
    set_threads,
    step_times,
    write_results,
)
from workloads import Workload

NAME = "gpu_tokens"
SCRIPT = Path(__file__).resolve()
EXIT_NO_GPU = 2
VARIANTS = ("lightning_paged", "transformers_trainer")
OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit")
"""Paged and non-paged 8-bit AdamW: the same algorithm and state size, only the memory kind differs."""
SKIP_STEPS = 2
"""Warm-up steps left out of each run's median step time."""
GIB = 2**30

MODEL = Workload(
    hidden_size=2048,
    intermediate_size=5632,
    num_layers=22,
    num_heads=32,
    num_kv_heads=4,
    vocab_size=32000,
    batch_size=1,
    seq_len=512,
    steps=10,
    lr=2e-4,
    compute_dtype="bfloat16",
    gradient_checkpointing=True,
    device="cuda:0",
)
"""1.1B parameters (TinyLlama's shape)."""
QUICK_MODEL = replace(
    MODEL,
    hidden_size=256,
    intermediate_size=688,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=1024,
    steps=5,
)


# --- the pieces that need no GPU ----------------------------------------------------------------------


def longest_fitting(
    fits: Callable[[int], bool], low: int, high: int, step: int
) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest multiple of ``step`` in ``[low, high]`` for which ``fits`` is true, by binary search.

    Assumes fitting is monotone: a length that trains means every shorter one does. Returns the
    length (None when even the shortest does not fit) and every probe in the order made.
    """
    candidates = list(range(-(-low // step) * step, high + 1, step)) if low > 0 and step > 0 else []
    if not candidates:
        raise ValueError(f"no multiple of {step} in [{low}, {high}]")
    probes: list[tuple[int, bool]] = []

    def probe(index: int) -> bool:
        ok = bool(fits(candidates[index]))
        probes.append((candidates[index], ok))
        return ok

    if not probe(0):
        return None, probes
    good, bad = 0, len(candidates)  # candidates[good] fits; none from index bad on is known to fit
    while bad - good > 1:
        middle = (good + bad) // 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return candidates[good], probes


def ballast_bytes(free: int, budget: int, granularity: int = 2 * 2**20) -> int:
    """Bytes of ballast that leave ``budget`` bytes of ``free`` device memory free.

    Rounded down to the allocator's 2 MiB granularity, so at least ``budget`` stays free. Refuses a
    budget at or above what is free: there would be no pressure to measure.
    """
    if budget <= 0:
        raise ValueError(f"--budget-gib must be positive; got {budget / GIB:.3f} GiB")
    if budget >= free:
        raise ValueError(
            f"--budget-gib {budget / GIB:.2f} is not below the {free / GIB:.2f} GiB free after the first step; "
            "lower it to put the run under pressure"
        )
    return (free - budget) // granularity * granularity


def tokens_per_second(run: dict[str, Any], tokens_per_step: int, skip: int = SKIP_STEPS) -> float:
    """Tokens per second of a run: tokens per step over the median step time after warm-up."""
    return tokens_per_step / median(step_times(run["stamps"], skip))


def paging_cost(paged_tps: float, unpaged_tps: float) -> float:
    """Fraction of tokens/s that the paged optimizer loses against the non-paged one (negative: gains)."""
    return 1.0 - paged_tps / unpaged_tps


def budget_workload(model: Workload, optimizer: str, seq_len: int, steps: int) -> Workload:
    return replace(model, optimizer=optimizer, seq_len=seq_len, steps=steps)


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What a run with these arguments measures, without running anything."""
    model = QUICK_MODEL if args.quick else MODEL
    model = replace(model, lora_r=args.lora_r)
    seq_lens = args.seq_lens or ([128, 256] if args.quick else [512, 1024, 2048, 4096])
    parts = ["throughput", "budget"] if args.part == "all" else [args.part]
    out: dict[str, Any] = {"model": asdict(model), "parameters": model.parameter_count(), "parts": parts}
    if "throughput" in parts:
        out["throughput"] = {"variants": list(VARIANTS), "seq_lens": seq_lens, "rounds": args.rounds}
    if "budget" in parts:
        out["budget"] = {
            "optimizers": list(OPTIMIZERS),
            "budget_bytes": int(args.budget_gib * GIB),
            "search": {"low": args.seq_step, "high": args.max_seq, "step": args.seq_step},
            "warm_seq_len": args.seq_step,
            "steps_at_probed_length": args.budget_steps,
        }
    return out


def throughput_summary(
    results: dict[str, dict[int, list[dict[str, Any]]]], batch: int
) -> list[dict[str, Any]]:
    """One row per sequence length: tokens/s and peak GPU memory of each variant, and their ratios."""
    rows = []
    lengths = sorted({n for by_len in results.values() for n in by_len})
    for seq_len in lengths:
        row: dict[str, Any] = {"seq_len": seq_len}
        for variant, by_len in results.items():
            runs = by_len.get(seq_len, [])
            ok = [r for r in runs if r.get("error") is None]
            row[variant] = {
                "tokens_per_s": median(tokens_per_second(r, batch * seq_len) for r in ok) if ok else None,
                "peak_device_bytes": median(r["gpu_memory"]["peak_device_bytes"] for r in ok)
                if ok and all(r.get("gpu_memory") for r in ok)
                else None,  # a CPU run (the validation's dry run) has no device memory
                "errors": [r["error"] for r in runs if r.get("error")],
            }
        a, b = (row[v] for v in VARIANTS)
        row["tokens_per_s_ratio"] = (
            a["tokens_per_s"] / b["tokens_per_s"] if a["tokens_per_s"] and b["tokens_per_s"] else None
        )
        row["memory_ratio"] = (
            a["peak_device_bytes"] / b["peak_device_bytes"]
            if a["peak_device_bytes"] and b["peak_device_bytes"]
            else None
        )
        rows.append(row)
    return rows


def markdown(rep: dict[str, Any]) -> str:
    lines = [f"## GPU tokens/s and memory ({rep['machine']['device']})", ""]
    p = rep["plan"]
    lines.append(
        f"Llama of {p['parameters'] / 1e9:.2f}B parameters, NF4 QLoRA r={p['model']['lora_r']}, batch "
        f"{p['model']['batch_size']}, bfloat16 compute, gradient checkpointing."
    )
    if "throughput" in rep:
        rows = []
        for r in rep["throughput"]:
            ours, theirs = r["lightning_paged"], r["transformers_trainer"]
            rows.append(
                [
                    r["seq_len"],
                    _num(ours["tokens_per_s"]),
                    _num(theirs["tokens_per_s"]),
                    _num(r["tokens_per_s_ratio"], 3),
                    fmt_bytes(ours["peak_device_bytes"]),
                    fmt_bytes(theirs["peak_device_bytes"]),
                    _num(r["memory_ratio"], 3),
                ]
            )
        headers = ["seq", "ours tok/s", "Trainer tok/s", "ratio", "ours peak", "Trainer peak", "ratio"]
        lines += ["", markdown_table(headers, rows)]
    if "budget" in rep:
        b = rep["budget"]
        rows = [
            [
                name,
                entry["longest_seq_len"],
                _num(entry.get("tokens_per_s_at_common")),
                " ".join(f"{n}{'+' if ok else '-'}" for n, ok in entry["probes"]),
            ]
            for name, entry in b["optimizers"].items()
        ]
        lines += [
            "",
            f"Under a {fmt_bytes(b['budget_bytes'])} free-memory budget (ballast after the first step); tokens/s "
            f"at {b['common_seq_len']} tokens, the longest both train:",
            "",
            markdown_table(["optimizer", "longest seq", "tok/s at common", "probes (+ trains, - OOM)"], rows),
            "",
            f"Paging costs {_num(None if b['paging_cost'] is None else 100 * b['paging_cost'], 3)}% of tokens/s "
            f"and buys {b['extra_tokens']} tokens of sequence length.",
        ]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def no_gpu_message(
    script: str = "gpu_tokens.py",
    instead: str = "nothing was measured. The CPU benchmarks are strategy_overhead.py, vs_transformers_trainer.py "
    "and memory_truth.py; `--plan` prints what this script would run.",
) -> str | None:
    """None when a CUDA GPU is usable, else why not: ``script`` needs one, and what to do ``instead``."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"{script} needs a CUDA GPU and none is available here (torch {torch.__version__}, {build}); {instead}"


# --- workers (on the GPU) -----------------------------------------------------------------------------


def _ballast_callback(budget: int) -> Any:
    import lightning.pytorch as pl
    import torch

    class Ballast(pl.Callback):
        """After the first optimizer step, allocate what leaves only ``budget`` bytes free."""

        def __init__(self) -> None:
            self.tensor: torch.Tensor | None = None
            self.info: dict[str, Any] = {}

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if self.tensor is not None or self.info:
                return
            if pl_module.device.type != "cuda":  # a CPU run (the validation's dry run) has no device memory
                self.info = {"skipped": f"no device memory to fill on {pl_module.device.type}"}
                return
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # cached blocks would be room the budget does not count
            free, total = torch.cuda.mem_get_info()
            size = ballast_bytes(free, budget)
            self.tensor = torch.empty(size, dtype=torch.uint8, device=pl_module.device)
            self.info = {
                "free_before": free,
                "total": total,
                "ballast": size,
                "free_after": torch.cuda.mem_get_info()[0],
            }

    return Ballast()


def is_out_of_memory(err: BaseException) -> bool:
    """True for the caching allocator's error and for a CUDA kernel's own "out of memory"."""
    return type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower()


def _evicted_bytes(log: Path) -> int | None:
    if not log.is_file():
        return None
    values = [json.loads(line).get("evicted_bytes") for line in log.read_text().splitlines() if line.strip()]
    known = [v for v in values if isinstance(v, int)]
    return sum(known) if known else None


def budget_worker(
    workload: Workload, budget: int, warm_len: int, source: Path | None = None
) -> dict[str, Any]:
    """One probe: a short step, the ballast, then ``workload.steps`` steps at ``workload.seq_len``.

    ``source``: a saved model directory to load instead of building the model from its config.
    """
    import torch
    from workloads import make_batches, run_lightning_paged

    from lightning_paged.lightning.monitor import EvictionMonitor

    batches = make_batches(replace(workload, seq_len=warm_len, steps=1)) + make_batches(workload)
    ballast = _ballast_callback(budget)
    with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as tmp:
        log = Path(tmp) / "eviction.jsonl"
        monitor = EvictionMonitor(source="auto", log_path=str(log), log_metrics=False)
        try:
            run = run_lightning_paged(
                workload, source, callbacks=[ballast, monitor], batches=batches, root_dir=tmp
            )
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            return {"fits": False, "error": str(err).splitlines()[0], "ballast": ballast.info}
        run.update(fits=True, ballast=ballast.info, evicted_bytes=_evicted_bytes(log))
    run["stamps"], run["cpu_stamps"] = run["stamps"][1:], run["cpu_stamps"][1:]  # the warm step was shorter
    return run


def worker(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    from workloads import preload, run_lightning_paged, run_transformers_trainer

    workload = Workload.from_json(args.workload)
    preload("lightning_paged" if args.worker != "transformers_trainer" else "transformers_trainer")
    import torch

    if args.worker == "budget":
        emit_result(budget_worker(workload, int(args.budget_gib * GIB), args.seq_step, args.source))
        return
    try:
        if args.worker == "lightning_paged":
            result = run_lightning_paged(workload, args.source)
        else:
            with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as output_dir:
                result = run_transformers_trainer(workload, args.source, Path(output_dir))
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        result = {"variant": args.worker, "error": "out of memory: " + str(err).splitlines()[0]}
    emit_result(result)


def save_source(workload: Workload, directory: Path) -> None:
    import torch
    from workloads import build_model

    build_model(workload).to(torch.bfloat16).save_pretrained(str(directory))


# --- parts --------------------------------------------------------------------------------------------


def run_throughput(args: argparse.Namespace, model: Workload, seq_lens: Sequence[int], source: Path) -> Any:
    results: dict[str, dict[int, list[dict[str, Any]]]] = {v: {} for v in VARIANTS}

    def run(variant: str, index: int) -> dict[str, Any]:
        seq_len = seq_lens[index % len(seq_lens)]
        workload = replace(model, seq_len=seq_len)
        worker_args = [variant, "--workload", workload.to_json(), "--source", str(source)]
        result = run_worker(SCRIPT, worker_args, args.threads)
        results[variant].setdefault(seq_len, []).append(result)
        return result

    interleaved(VARIANTS, args.rounds * len(seq_lens), run)
    return throughput_summary(results, model.batch_size), results


def run_budget(args: argparse.Namespace, model: Workload) -> dict[str, Any]:
    budget = int(args.budget_gib * GIB)
    out: dict[str, Any] = {"budget_bytes": budget, "optimizers": {}}
    runs: dict[tuple[str, int], dict[str, Any]] = {}

    def fits(optimizer: str, seq_len: int) -> bool:
        workload = budget_workload(model, optimizer, seq_len, args.budget_steps)
        extra = ["--budget-gib", str(args.budget_gib), "--seq-step", str(args.seq_step)]
        if getattr(args, "source", None):
            extra += ["--source", str(args.source)]
        result = run_worker(SCRIPT, ["budget", "--workload", workload.to_json(), *extra], args.threads)
        runs[(optimizer, seq_len)] = result
        print(f"budget {optimizer} seq {seq_len}: {'trains' if result['fits'] else 'out of memory'}")
        return bool(result["fits"])

    for optimizer in OPTIMIZERS:
        longest, probes = longest_fitting(
            functools.partial(fits, optimizer), args.seq_step, args.max_seq, args.seq_step
        )
        out["optimizers"][optimizer] = {"longest_seq_len": longest, "probes": probes}
    lengths = [e["longest_seq_len"] for e in out["optimizers"].values()]
    common = min(lengths) if all(lengths) else None
    out["common_seq_len"] = common
    if common:
        for optimizer in OPTIMIZERS:  # the search may not have tried the common length with both
            if (optimizer, common) not in runs:
                fits(optimizer, common)
    for optimizer, entry in out["optimizers"].items():
        run = runs.get((optimizer, common)) if common else None
        entry["tokens_per_s_at_common"] = (
            tokens_per_second(run, model.batch_size * common, skip=1) if run and run.get("fits") else None
        )
        entry["evicted_bytes_at_longest"] = runs.get((optimizer, entry["longest_seq_len"]), {}).get(
            "evicted_bytes"
        )
    paged, unpaged = (out["optimizers"][o]["tokens_per_s_at_common"] for o in OPTIMIZERS)
    out["paging_cost"] = paging_cost(paged, unpaged) if paged and unpaged else None
    longest_paged, longest_unpaged = (out["optimizers"][o]["longest_seq_len"] or 0 for o in OPTIMIZERS)
    out["extra_tokens"] = longest_paged - longest_unpaged
    out["runs"] = {f"{o}@{n}": r for (o, n), r in runs.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test on a GPU: a small model, short lengths"
    )
    parser.add_argument("--part", choices=["all", "throughput", "budget"], default="all")
    parser.add_argument(
        "--seq-lens", type=int, nargs="+", help="throughput lengths (default 512 1024 2048 4096)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per length (default 2)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--budget-gib", type=float, default=2.0, help="device memory left free (default 2)")
    parser.add_argument("--budget-steps", type=int, default=4, help="steps at each probed length (default 4)")
    parser.add_argument("--seq-step", type=int, default=256, help="length granularity of the search (256)")
    parser.add_argument("--max-seq", type=int, default=16384, help="longest length tried (default 16384)")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads per run (default 4)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and Markdown go (default bench/results)")
    parser.add_argument("--plan", action="store_true", help="print what would run, as JSON, and exit")
    parser.add_argument("--worker", choices=[*VARIANTS, "budget"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    the_plan = plan(args)
    if args.plan:
        print(json.dumps(the_plan, indent=2))
        return 0
    problem = no_gpu_message()
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_NO_GPU

    import torch

    model = Workload(**the_plan["model"])
    device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.mem_get_info()[1] / GIB:.0f} GiB, CUDA {torch.version.cuda})"
    rep: dict[str, Any] = {
        "what": "GPU tokens/s and peak memory vs transformers Trainer; longest sequence under a memory budget, "
        "paged vs non-paged optimizer",
        "command": "python bench/gpu_tokens.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(args.threads, device=device),
        "plan": the_plan,
    }
    if "throughput" in the_plan["parts"]:
        with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as tmp:
            source = Path(tmp) / "model"
            save_source(model, source)
            summary, raw = run_throughput(args, model, the_plan["throughput"]["seq_lens"], source)
        rep["throughput"], rep["throughput_runs"] = summary, raw
    if "budget" in the_plan["parts"]:
        rep["budget"] = run_budget(args, model)
    write_results(NAME, rep, markdown(rep), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
