"""Predicted eviction beside observed, per sequence length: the memory plan against the event log.

Before a run, the memory check writes the plan's eviction per sequence length next to the event
log (:data:`PREDICTION_NAME`). The end-of-fit summary and ``lightning-paged report`` then group the
logged steps by those lengths (a step goes to the shortest planned length at or above its own) and
show, for each group, the eviction the plan predicted for its longest step beside the mean and most
the driver evicted in a step of the group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_paged.core.atomic import atomic_write
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.units import format_bytes

PREDICTION_NAME = "eviction_plan.json"
"""The plan's eviction per sequence length, in the event log's directory."""


def write_prediction(directory: Path, points: Iterable[Mapping[str, Any]], device_memory: int | None) -> Path:
    """Write ``points`` (``seq_len``, ``peak_bytes``, ``evicted_bytes`` each) for the run logging into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PREDICTION_NAME
    data = {
        "device_memory": device_memory,
        "by_seq_len": [
            {key: int(point[key]) for key in ("seq_len", "peak_bytes", "evicted_bytes")} for point in points
        ],
    }
    payload = json.dumps(data, indent=2).encode("utf-8")
    atomic_write(path, lambda f: f.write(payload))
    return path


def read_prediction(log: Path) -> list[dict[str, int]] | None:
    """The prediction written beside the event log ``log``, sorted by length; None when there is none or it is unreadable."""
    path = log.with_name(PREDICTION_NAME)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        points = sorted(data["by_seq_len"], key=lambda p: p["seq_len"])
        return [{k: int(p[k]) for k in ("seq_len", "peak_bytes", "evicted_bytes")} for p in points]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class LengthGroup:
    """The steps of one planned length: up to ``seq_len`` tokens, longer than the planned length below."""

    seq_len: int
    predicted_bytes: int
    steps: int = 0
    measured_steps: int = 0
    observed_total: int = 0
    observed_most: int = 0

    @property
    def observed_mean(self) -> float | None:
        return self.observed_total / self.measured_steps if self.measured_steps else None


def compare(records: Iterable[StepRecord], points: list[dict[str, int]]) -> list[LengthGroup]:
    """Group ``records`` by the planned lengths of ``points`` and total what the driver evicted in each."""
    groups = [LengthGroup(p["seq_len"], p["evicted_bytes"]) for p in points]
    if not groups:
        return []
    for record in records:
        if record.seq_len is None:
            continue
        group = next((g for g in groups if record.seq_len <= g.seq_len), groups[-1])
        group.steps += 1
        if record.evicted_bytes is not None:
            group.measured_steps += 1
            group.observed_total += record.evicted_bytes
            group.observed_most = max(group.observed_most, record.evicted_bytes)
    return groups


def render_comparison(groups: list[LengthGroup], estimated: bool = False) -> str:
    """A table: planned length, steps, predicted eviction, observed mean and most per step."""
    how = " (observed: estimated from memory pressure)" if estimated else ""
    lines = [f"Eviction per step, predicted by the memory plan and observed{how}:"]
    lines.append(
        f"  {'seq_len <=':>10} {'steps':>6} {'predicted':>11} {'observed mean':>14} {'observed most':>14}"
    )
    for g in groups:
        mean = "n/a" if g.observed_mean is None else format_bytes(g.observed_mean)
        most = "n/a" if not g.measured_steps else format_bytes(g.observed_most)
        lines.append(
            f"  {g.seq_len:>10} {g.steps:>6} {format_bytes(g.predicted_bytes):>11} {mean:>14} {most:>14}"
        )
    return "\n".join(lines)


def comparison_for(log: Path, records: list[StepRecord] | None = None) -> str | None:
    """The comparison table for the event log ``log`` (its last run unless ``records`` are given); None without a prediction."""
    points = read_prediction(log)
    if not points:
        return None
    if records is None:
        records = _last_run(log)
    return render_comparison(compare(records, points), any(r.estimated for r in records))


def _last_run(log: Path) -> list[StepRecord]:
    from lightning_paged.core.eviction.log import read_jsonl

    try:
        content = read_jsonl(log)
    except (OSError, ValueError):
        return []
    records = []
    for data in content.records:
        try:
            records.append(StepRecord.from_dict(data))
        except (ValueError, TypeError):
            continue
    last = records[-1].run if records else None
    return [r for r in records if r.run == last]
