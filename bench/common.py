"""What every benchmark script shares: the machine, interleaved runs in fresh processes, medians, peak
host memory, and the JSON + Markdown result files.

Nothing here imports torch: a script's parent process stays light and only its workers (one fresh
process per measured run) pay for the heavy imports, so a run's memory is its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from lightning_paged.core.units import format_bytes as fmt_bytes

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULT_PREFIX = "BENCH-RESULT "
"""A worker prints its result as one line starting with this; everything else it prints is log."""
PACKAGES = ("torch", "lightning", "bitsandbytes", "peft", "transformers", "accelerate")


# --- the machine -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(threads: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The machine a result was measured on: CPU, cores, memory, load, versions, and the device used."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        total = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        total = None
    return {
        "device": device or f"cpu: {cpu_model()}",
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "threads_per_run": threads,
        "memory_bytes": total,
        "load_average_at_start": load_average(),
        "platform": platform.platform(),
        "versions": versions(),
        "git_commit": git_commit(),
    }


# --- peak host memory ----------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss() -> int:
    """Resident set size of this process, in bytes (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes, since it started or since :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (Linux ``clear_refs``); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryWindow:
    """Peak host memory of one phase of a worker: the RSS at its start and the peak above it."""

    def __init__(self) -> None:
        self.resettable = reset_peak_rss()
        self.start_rss = current_rss()

    def result(self) -> dict[str, Any]:
        peak = peak_rss()
        return {
            "process_peak_rss_bytes": peak,
            "start_rss_bytes": self.start_rss,
            "peak_above_start_bytes": peak - self.start_rss if self.resettable else None,
            "peak_resettable": self.resettable,
        }


# --- workers: one fresh process per measured run --------------------------------------------------------


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_worker(script: Path, args: Sequence[str], threads: int, timeout: float = 1800) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh Python and return the result it printed."""
    command = [sys.executable, str(script), "--worker", *args, "--threads", str(threads)]
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO, env=thread_env(threads), capture_output=True, text=True, timeout=timeout
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["process_wall_s"] = round(time.perf_counter() - started, 3)
            return result
    tail = (done.stdout + done.stderr)[-4000:]
    raise RuntimeError(f"worker {' '.join(command[1:4])} failed (exit {done.returncode}):\n{tail}")


def emit_result(result: dict[str, Any]) -> None:
    """What a worker calls last: its result as one line the parent picks out of the output."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def set_threads(threads: int) -> None:
    """Pin torch to ``threads`` intra-op and one inter-op thread, the same in every worker."""
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set in this process: harmless
        torch.set_num_interop_threads(1)


def interleaved(
    variants: Sequence[str],
    rounds: int,
    run: Callable[[str, int], dict[str, Any]],
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Run every variant once per round, in a shuffled order each round, so drift in the machine's
    load spreads over all variants instead of favouring the one that ran first."""
    order_rng = random.Random(seed)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in order_rng.sample(list(variants), len(variants)):
            t0 = time.perf_counter()
            results[variant].append(run(variant, r))
            log(f"round {r + 1}/{rounds} {variant}: {time.perf_counter() - t0:.1f} s")
    return results


# --- statistics ---------------------------------------------------------------------------------------


def step_times(stamps: Sequence[float], skip: int) -> list[float]:
    """Seconds per step from the end-of-step timestamps, dropping the first ``skip`` (warm-up) steps."""
    deltas = [b - a for a, b in itertools.pairwise(stamps)]
    return deltas[skip:] if len(deltas) > skip else deltas


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and interquartile range of ``values``."""
    ordered = sorted(values)
    if len(ordered) >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4)
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {"median": median(ordered), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3}


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round-by-round ratios of two variants measured side by side."""
    return [a / b for a, b in zip(numerator, denominator)]


# --- result files ---------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def result_paths(name: str, quick: bool, out_dir: Path | None) -> tuple[Path, Path]:
    stem = f"{name}_quick" if quick else name
    folder = out_dir or RESULTS_DIR
    return folder / f"{stem}.json", folder / f"{stem}.md"


def write_results(
    name: str, report: dict[str, Any], markdown: str, quick: bool, out_dir: Path | None = None
) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (``<name>_quick.*`` for --quick) and return the JSON path."""
    json_path, md_path = result_paths(name, quick, out_dir)
    if isinstance(report.get("machine"), dict):
        report["machine"]["load_average_at_end"] = load_average()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nresults: {json_path.relative_to(REPO) if json_path.is_relative_to(REPO) else json_path}")
    return json_path


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --- comparing two training runs ----------------------------------------------------------------------


def run_step_median(run: dict[str, Any], skip: int, key: str = "stamps") -> float:
    return median(step_times(run[key], skip))


def compare_runs(
    results: dict[str, list[dict[str, Any]]], variant: str, baseline: str, skip: int
) -> dict[str, Any]:
    """Step time, peak memory and loss agreement of ``variant`` against ``baseline``, over interleaved rounds.

    Step time per run is the median over its steps after the first ``skip``; the headline ratio is
    the median of the round-by-round ratios (the two runs of a round ran back to back, so load drift
    mostly cancels). The same figures in CPU time (``cpu_*``) are what a single-threaded run costs
    whatever else the machine runs. Memory ratios are of the medians over runs.
    """
    ours, theirs = results[variant], results[baseline]
    out: dict[str, Any] = {}
    for prefix, key in (("", "stamps"), ("cpu_", "cpu_stamps")):
        if not all(key in r for r in ours + theirs):
            continue
        ours_steps = [run_step_median(r, skip, key) for r in ours]
        theirs_steps = [run_step_median(r, skip, key) for r in theirs]
        ratios = paired_ratios(ours_steps, theirs_steps)
        out[f"{prefix}step_time_s"] = {variant: spread(ours_steps), baseline: spread(theirs_steps)}
        out[f"{prefix}step_time_ratio"] = median(ratios)
        out[f"{prefix}step_time_ratio_per_round"] = [round(x, 4) for x in ratios]
        out[f"{prefix}step_time_ratio_of_medians"] = median(ours_steps) / median(theirs_steps)
    out["setup_s"] = {
        variant: median(r["setup_s"] for r in ours),
        baseline: median(r["setup_s"] for r in theirs),
    }

    def memory(runs: list[dict[str, Any]], key: str) -> float | None:
        values = [r["memory"][key] for r in runs if r["memory"][key] is not None]
        return median(values) if values else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for key in ("process_peak_rss_bytes", "peak_above_start_bytes"):
        a, b = memory(ours, key), memory(theirs, key)
        out[key] = {variant: a, baseline: b, "ratio": ratio(a, b)}
    if all(r.get("gpu_memory") for r in ours + theirs):
        a, b = (median(r["gpu_memory"]["peak_device_bytes"] for r in runs) for runs in (ours, theirs))
        out["gpu_peak_device_bytes"] = {variant: a, baseline: b, "ratio": ratio(a, b)}
    differences = [max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) for a, b in zip(ours, theirs)]
    out["loss_max_abs_difference"] = max(differences)
    return out


def pair_rows(c: dict[str, Any], variant: str, baseline: str) -> list[list[str]]:
    """Markdown rows of a :func:`compare_runs` result: step time (wall, CPU), memory, set-up."""

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f} ms"

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    rows = [
        [
            "step time (wall, median)",
            ms(c["step_time_s"][variant]["median"]),
            ms(c["step_time_s"][baseline]["median"]),
            ratio(c["step_time_ratio"]),
        ]
    ]
    if "cpu_step_time_s" in c:
        rows.append(
            [
                "step time (CPU, median)",
                ms(c["cpu_step_time_s"][variant]["median"]),
                ms(c["cpu_step_time_s"][baseline]["median"]),
                ratio(c["cpu_step_time_ratio"]),
            ]
        )
    for key, label in (
        ("process_peak_rss_bytes", "peak host memory (process)"),
        ("peak_above_start_bytes", "peak host memory above imports"),
        ("gpu_peak_device_bytes", "peak device memory (allocator peak + paged state)"),
    ):
        if key in c:
            rows.append(
                [label, fmt_bytes(c[key][variant]), fmt_bytes(c[key][baseline]), ratio(c[key]["ratio"])]
            )
    setup = c["setup_s"]
    rows.append(
        [
            "set-up before the first step",
            f"{setup[variant]:.2f} s",
            f"{setup[baseline]:.2f} s",
            ratio(setup[variant] / setup[baseline] if setup[baseline] else None),
        ]
    )
    return rows


def spread_note(c: dict[str, Any], variant: str, baseline: str) -> str:
    """One sentence on how far the same work varied from process to process."""
    key = "cpu_step_time_s" if "cpu_step_time_s" in c else "step_time_s"
    kind = "CPU" if key.startswith("cpu") else "wall"
    parts = [
        f"{c[key][v]['min'] * 1e3:.0f}-{c[key][v]['max'] * 1e3:.0f} ms ({v})" for v in (variant, baseline)
    ]
    widest = max((c[key][v]["max"] / c[key][v]["min"] - 1) for v in (variant, baseline))
    return (
        f"Median {kind} step time per run ranged {parts[0]} and {parts[1]}: the same work varies by up to "
        f"{100 * widest:.0f}% from one process to the next here."
    )
