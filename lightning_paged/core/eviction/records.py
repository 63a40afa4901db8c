"""One record per training step: what the event log holds, line by line.

A field that the active source cannot measure is ``None`` (``null`` in the log), never a made-up zero:
the CPU source has no eviction figures, the pressure source no page-fault counts, and the CUPTI
source none while the PyTorch profiler holds CUPTI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class StepCounters:
    """What an event source measured over one step (``None``: not measured by this source)."""

    evicted_bytes: int | None = None
    """Bytes migrated device-to-host to make room on the GPU."""
    paged_in_bytes: int | None = None
    """Bytes migrated host-to-device."""
    gpu_page_faults: int | None = None
    """GPU page-fault groups on managed memory."""
    thrashing_events: int | None = None
    """Thrashing records reported by the driver."""
    device_free_bytes: int | None = None
    """Lowest free device memory seen during the step."""
    alloc_retries: int | None = None
    """Times the caching allocator freed its cache and retried a failed ``cudaMalloc``."""
    ooms: int | None = None
    """Out-of-memory errors raised by the caching allocator."""
    estimated: bool = False
    """True when the figures are inferred from memory pressure rather than counted by the driver."""


@dataclass
class StepRecord:
    """One line of the event log. Field order is the column order of the log."""

    step: int
    """Index of the training batch since the run started (0-based)."""
    seq_len: int | None
    """Padded sequence length of the batch (last dimension of ``input_ids``): for a packed batch the row
    length, which sets how large the step's activations are."""
    longest_example: int | None
    """Longest single example in the batch: ``position_ids.max() + 1`` of a packed batch, the longest
    ``attention_mask`` row of a padded one (None when unknown, and in logs older than this field)."""
    tokens: int | None
    """Real tokens in the batch: the sum of ``attention_mask``, a packed batch's ``num_tokens``, or every
    position without either."""
    long_sequence: bool
    """Whether ``seq_len`` counts as long (threshold setting, else above the running 90th percentile):
    the step's activations were large, whether one long example or several packed ones filled the row."""
    evicted_bytes: int | None
    """Bytes the driver evicted from the GPU to host memory during the step."""
    paged_in_bytes: int | None
    """Bytes migrated from host to GPU during the step."""
    gpu_page_faults: int | None
    """GPU page-fault groups on managed memory during the step."""
    thrashing_events: int | None
    """Thrashing records during the step."""
    optimizer_step_s: float | None
    """Wall time of ``optimizer.step()`` (None on a step without one, e.g. gradient accumulation)."""
    step_s: float
    """Wall time of the whole training step, from batch start to batch end."""
    device_free_bytes: int | None
    """Lowest free device memory seen during the step (managed pages resident on the GPU count as used)."""
    alloc_retries: int | None
    """Caching-allocator retries during the step (each one flushed the cache to satisfy an allocation)."""
    ooms: int | None
    """Out-of-memory errors raised during the step."""
    paged_bytes_total: int
    """Bytes of optimizer state in paged (managed-memory) tensors on this device; sizes only, never contents."""
    source: str
    """Which event source produced the counters: ``cupti``, ``pressure`` or ``none``."""
    estimated: bool
    """True when the eviction figures are estimates from memory pressure, not driver counts."""
    rank: int
    """Global rank of the process that recorded the step."""
    run: str
    """Identifies the run that wrote the line, so runs appended to one file can be told apart."""
    paged_capacity_bytes: int | None
    """Managed memory allocated for that state (paging-pool slabs counted whole); None in older logs."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepRecord:
        """Build a record from a log line; keys this version does not know are ignored."""
        names = {f.name for f in fields(cls)}
        data = {**dict.fromkeys(OPTIONAL_FIELDS), **data}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"log line lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StepRecord))
OPTIONAL_FIELDS: tuple[str, ...] = ("longest_example", "paged_capacity_bytes")
"""Fields added after the first logs were written: None when a line lacks them."""
