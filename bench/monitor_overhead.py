"""Overhead of the eviction recorder, as a ratio against the same training loop without it.

Variants, each with the sources this machine has:

- ``baseline``: the loop alone;
- ``none``: the recorder with the null source (what a CPU run uses), JSONL log included;
- ``pressure-fake-probe``: the pressure source reading a fake probe (the source's own Python
  work, without the cost of ``cudaMemGetInfo`` and allocator statistics);
- ``pressure`` and ``cupti``: the real sources, when a CUDA device (and cupti-python) is present.

Runs are interleaved (every round runs every variant once, in a shuffled order) and compared by
medians. Two figures per variant: the ratio of median step times against the baseline (noisy on a
shared machine), and the recorder's own cost per step measured directly (its calls with no training
work in between) as a share of the baseline's median step time. The goal is under 1%.

    python bench/monitor_overhead.py            # full run, about a minute on an idle CPU
    python bench/monitor_overhead.py --quick    # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.sources import open_source
from lightning_paged.core.eviction.sources.cupti_setup import cupti_available
from lightning_paged.testing import FakeProbe

GIB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results" / "monitor_overhead.json"


def build(device: torch.device, width: int, layers: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(nn.Embedding(256, width), *blocks, nn.Linear(width, 256)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def batches(device: torch.device, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.choice([32, 48, 64, 96, 128])
        ids = torch.randint(0, 256, (4, n), device=device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def train_steps(model, optimizer, data, recorder: EvictionRecorder | None, device) -> list[float]:
    """Per-step wall times of the loop (including the recorder's calls when there is one)."""
    times = []
    for batch in data:
        t0 = time.perf_counter()
        if recorder is not None:
            recorder.begin_step(batch)
        logits = model(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"].flatten())
        loss.backward()
        if recorder is not None:
            recorder.begin_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recorder is not None:
            recorder.end_step()
        elif device.type == "cuda":
            torch.cuda.synchronize(device)  # the recorder synchronises; so must the baseline
        times.append(time.perf_counter() - t0)
    return times


def make_recorder(variant: str, device: torch.device, log: Path) -> EvictionRecorder | None:
    if variant == "baseline":
        return None
    quiet = lambda message: None  # noqa: E731
    if variant == "pressure-fake-probe":
        source = open_source(
            "pressure", "cpu", probe=FakeProbe(resident=6 * GIB), notify=quiet
        )  # 8 of 16 GiB free, constant
    else:
        source = open_source(variant, device, notify=quiet)
    return EvictionRecorder(source, log, long_sequence_threshold=96, notify=quiet)


def recorder_cost(variant: str, device: torch.device, log: Path, batch: dict, steps: int) -> float:
    """Median seconds per step of the recorder's own calls, with no training work between them."""
    recorder = make_recorder(variant, device, log)
    assert recorder is not None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        recorder.begin_step(batch)
        recorder.begin_optimizer_step()
        recorder.end_step()
        times.append(time.perf_counter() - t0)
    recorder.close()
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"cpu: {platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test of a few seconds")
    parser.add_argument("--out", type=Path, help=f"result file (default {RESULTS.name}, or *_quick.json)")
    args = parser.parse_args(argv)
    out = args.out or (RESULTS.with_name(RESULTS.stem + "_quick.json") if args.quick else RESULTS)
    rounds, steps, width, layers = (3, 10, 256, 2) if args.quick else (15, 30, 256, 2)
    torch.set_num_threads(1)  # steadier timings on a shared machine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = ["baseline", "none", "pressure-fake-probe"]
    if device.type == "cuda":
        variants.append("pressure")
        if cupti_available():
            variants.append("cupti")

    model, optimizer = build(device, width, layers)
    warm = batches(device, 5, seed=-1)
    train_steps(model, optimizer, warm, None, device)
    medians: dict[str, list[float]] = {v: [] for v in variants}
    order_rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            data = batches(device, steps, seed=r)  # the same batches for every variant of a round
            for variant in order_rng.sample(variants, len(variants)):
                recorder = make_recorder(variant, device, Path(tmp) / f"{variant}.jsonl")
                times = train_steps(model, optimizer, data, recorder, device)
                if recorder is not None:
                    recorder.close()
                medians[variant].append(statistics.median(times))
        base = statistics.median(medians["baseline"])
        cost_steps = 200 if args.quick else 2000
        results: dict[str, Any] = {}
        for variant in variants[1:]:
            ratios = [m / b for m, b in zip(medians[variant], medians["baseline"])]
            own = recorder_cost(variant, device, Path(tmp) / f"cost-{variant}.jsonl", warm[0], cost_steps)
            results[variant] = {
                "median_step_ratio_vs_baseline": round(statistics.median(ratios), 4),
                "ratio_per_round": [round(x, 4) for x in ratios],
                "recorder_cost_us_per_step": round(own * 1e6, 1),
                "recorder_cost_pct_of_step": round(100 * own / base, 3),
            }

    report = {
        "what": "eviction recorder overhead vs the same loop without it (interleaved rounds, medians)",
        "command": "python bench/monitor_overhead.py" + (" --quick" if args.quick else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {"width": width, "layers": layers, "batch": 4, "seq_len": [32, 128]},
        "rounds": rounds,
        "steps_per_run": steps,
        "baseline_median_step_ms": round(base * 1e3, 3),
        "goal_pct": 1.0,
        "variants": results,
        "note": "pressure-fake-probe excludes the CUDA queries a real pressure source makes;"
        " on CPU the ratios carry the noise of a shared machine, the direct cost does not",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
