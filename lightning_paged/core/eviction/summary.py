"""The end-of-run summary: totals, long- versus other steps, and the slowest steps with their lengths."""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.units import format_bytes


def _fmt_s(s: float | None) -> str:
    return "n/a" if s is None else f"{s:.3f} s"


@dataclass
class SlowStep:
    step: int
    seq_len: int | None
    long_sequence: bool
    step_s: float
    evicted_bytes: int | None
    longest_example: int | None = None


@dataclass
class Summary:
    """Figures over all recorded steps of one rank. Byte and count totals are None when never measured."""

    steps: int = 0
    long_steps: int = 0
    steps_with_eviction: int = 0
    long_steps_with_eviction: int = 0
    evicted_bytes: int | None = None
    evicted_bytes_long: int | None = None
    paged_in_bytes: int | None = None
    gpu_page_faults: int | None = None
    thrashing_events: int | None = None
    alloc_retries: int | None = None
    ooms: int | None = None
    step_s_total: float = 0.0
    step_s_long: float = 0.0
    slowest: list[SlowStep] = field(default_factory=list)
    source: str = "none"
    estimated: bool = False
    rank: int = 0
    unattributed: dict[str, int] = field(default_factory=dict)
    most_tokens: int | None = None
    """Real tokens of the step with the most of them."""
    memory: dict[str, Any] | None = None
    """A :class:`~lightning_paged.core.eviction.breakdown.MemoryBreakdown` (as a dict), when the run gave one."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        data = dict(data)
        data["slowest"] = [SlowStep(**s) for s in data.get("slowest", [])]
        return cls(**data)

    def render(self) -> str:
        """A plain-text table."""
        other = self.steps - self.long_steps
        mean = self.step_s_total / self.steps if self.steps else None
        mean_long = self.step_s_long / self.long_steps if self.long_steps else None
        mean_other = (self.step_s_total - self.step_s_long) / other if other else None
        how = " (estimated from memory pressure)" if self.estimated else ""
        evicted = format_bytes(self.evicted_bytes)
        if self.evicted_bytes is not None:
            evicted += f" ({format_bytes(self.evicted_bytes_long)} on long-sequence steps)"
        rows = [
            ("steps", str(self.steps)),
            ("long-sequence steps", str(self.long_steps)),
            (
                "steps with evictions",
                "n/a"
                if self.evicted_bytes is None
                else f"{self.steps_with_eviction} ({self.long_steps_with_eviction} long)",
            ),
            ("evicted to host" + how, evicted),
            ("paged in to GPU" + how, format_bytes(self.paged_in_bytes)),
            ("GPU page-fault groups", _count(self.gpu_page_faults)),
            ("thrashing events", _count(self.thrashing_events)),
            ("allocator retries / OOMs", f"{_count(self.alloc_retries)} / {_count(self.ooms)}"),
            ("mean step time", f"{_fmt_s(mean)} (long {_fmt_s(mean_long)}, other {_fmt_s(mean_other)})"),
        ]
        if self.unattributed.get("events"):
            rows.append(
                (
                    "events outside steps",
                    f"{self.unattributed['events']} ({format_bytes(self.unattributed.get('evicted_bytes', 0))}"
                    " evicted)",
                )
            )
        width = max(len(name) for name, _ in rows)
        lines = [f"Eviction summary, rank {self.rank}, source: {self.source}"]
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        if self.slowest:
            lines.append("  slowest steps:")
            lines.append(
                f"    {'step':>7} {'seq_len':>8} {'longest':>8} {'long':>5} {'step_s':>9} {'evicted':>11}"
            )
            for s in self.slowest:
                seq = "?" if s.seq_len is None else str(s.seq_len)
                longest = "?" if s.longest_example is None else str(s.longest_example)
                lines.append(
                    f"    {s.step:>7} {seq:>8} {longest:>8} {'yes' if s.long_sequence else 'no':>5} "
                    f"{s.step_s:>9.3f} {format_bytes(s.evicted_bytes):>11}"
                )
        if self.memory is not None and self.most_tokens:
            from lightning_paged.core.eviction.breakdown import MemoryBreakdown

            lines.append(MemoryBreakdown(**self.memory).render(self.most_tokens))
        return "\n".join(lines)


def _count(n: int | None) -> str:
    return "n/a" if n is None else str(n)


def _add(total: int | None, value: int | None) -> int | None:
    if value is None:
        return total
    return value if total is None else total + value


class SummaryBuilder:
    """Accumulates records into a :class:`Summary` in constant memory (keeps only the ``top_k`` slowest)."""

    def __init__(self, top_k: int = 5) -> None:
        self.top_k = top_k
        self._summary = Summary()
        self._heap: list[tuple[float, int, SlowStep]] = []

    def add(self, record: StepRecord | dict[str, Any]) -> None:
        r = record if isinstance(record, StepRecord) else StepRecord.from_dict(record)
        s = self._summary
        s.steps += 1
        s.rank, s.source = r.rank, r.source
        s.estimated = s.estimated or r.estimated
        s.step_s_total += r.step_s
        tokens = r.tokens if r.tokens is not None else r.seq_len
        if tokens is not None and (s.most_tokens is None or tokens > s.most_tokens):
            s.most_tokens = tokens
        if r.long_sequence:
            s.long_steps += 1
            s.step_s_long += r.step_s
        s.evicted_bytes = _add(s.evicted_bytes, r.evicted_bytes)
        if r.evicted_bytes is not None:
            s.evicted_bytes_long = _add(s.evicted_bytes_long, r.evicted_bytes if r.long_sequence else 0)
        if r.evicted_bytes:
            s.steps_with_eviction += 1
            s.long_steps_with_eviction += int(r.long_sequence)
        s.paged_in_bytes = _add(s.paged_in_bytes, r.paged_in_bytes)
        s.gpu_page_faults = _add(s.gpu_page_faults, r.gpu_page_faults)
        s.thrashing_events = _add(s.thrashing_events, r.thrashing_events)
        s.alloc_retries = _add(s.alloc_retries, r.alloc_retries)
        s.ooms = _add(s.ooms, r.ooms)
        if self.top_k > 0:
            item = (
                r.step_s,
                -r.step,
                SlowStep(r.step, r.seq_len, r.long_sequence, r.step_s, r.evicted_bytes, r.longest_example),
            )
            if len(self._heap) < self.top_k:
                heapq.heappush(self._heap, item)
            elif item[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, item)

    def result(self, unattributed: dict[str, int] | None = None) -> Summary:
        s = self._summary
        s.slowest = [item[2] for item in sorted(self._heap, key=lambda i: i[:2], reverse=True)]
        s.unattributed = dict(unattributed or {})
        return s


def summarize(records: list[dict[str, Any]] | list[StepRecord], top_k: int = 5) -> Summary:
    builder = SummaryBuilder(top_k)
    for record in records:
        builder.add(record)
    return builder.result()
