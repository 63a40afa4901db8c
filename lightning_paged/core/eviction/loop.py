"""The eviction monitor for a hand-written training loop (Fabric, Accelerate or plain PyTorch).

Framework-free: :func:`lightning_paged.fabric.fabric_eviction_monitor` and
:func:`lightning_paged.accelerate.accelerate_eviction_monitor` build it on their device and rank.
"""

from __future__ import annotations

import os
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.eviction.run import (
    check_monitor_settings,
    event_log_path,
    record_metrics,
    share_summary,
)
from lightning_paged.core.eviction.sources import MemoryProbe, SourceSetting
from lightning_paged.core.eviction.summary import Summary


class LoopEvictionMonitor:
    """The eviction monitor for a hand-written training loop: same JSONL records, same summary.

    What the Lightning ``EvictionMonitor`` callback does from hooks, done by two context managers
    around the loop body: :meth:`step` (the whole training step, given its batch for the sequence
    length) and :meth:`optimizer_step` (around ``optimizer.step()``). Each step becomes one line of
    ``<log_dir>/eviction_events.jsonl`` (``eviction_events.rank<N>.jsonl`` per rank when there are
    several); :meth:`close` (every rank must call it) prints the summary on rank zero and writes it
    to ``<log_dir>/eviction_summary.txt``. :meth:`metrics` gives the last step's figures under
    ``eviction/`` for ``fabric.log_dict`` or ``accelerator.log``.

    Args:
        log_dir: Directory of the event log and the summary.
        device: The training device (the source is chosen for it).
        rank: This process's global rank.
        world_size: Number of processes.
        source: ``"auto"``, ``"cupti"``, ``"pressure"`` or ``"none"``, as for the callback.
        log_path: The event log's path instead of ``<log_dir>/eviction_events.jsonl``.
        long_sequence_threshold: Lengths at or above it count as long; None: above the running 90th percentile.
        seq_len_fn: The batch's padded length, or ``(length, real_tokens)``, for batches of another shape.
        summary_top_k: How many of the slowest steps the summary lists.
        probe: Replaces the pressure source's CUDA memory reader (tests, other devices).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world_size: int = 1,
        source: SourceSetting = "auto",
        log_path: str | os.PathLike[str] | None = None,
        long_sequence_threshold: int | None = None,
        seq_len_fn: Any = None,
        summary_top_k: int = 5,
        probe: MemoryProbe | None = None,
    ) -> None:
        check_monitor_settings(source, long_sequence_threshold, summary_top_k)
        self.log_dir = Path(log_dir)
        self.rank = rank
        self.world_size = world_size
        self.path = event_log_path(self.log_dir, log_path, rank, world_size)
        self.summary: Summary | None = None
        """This rank's summary, once :meth:`close` ran."""
        self.recorder = EvictionRecorder.open(
            source,
            device,
            self.path,
            notify=self._warn,
            probe=probe,
            long_sequence_threshold=long_sequence_threshold,
            seq_len_fn=seq_len_fn,
            rank=rank,
            top_k=summary_top_k,
        )

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            warnings.warn(f"eviction monitor: {message}", UserWarning, stacklevel=2)

    def step(self, batch: Any = None, **kwargs: Any) -> AbstractContextManager[EvictionRecorder]:
        """Around one whole training step; ``batch`` gives its sequence length (or pass ``seq_len=``)."""
        return self.recorder.step(batch, **kwargs)

    def optimizer_step(self) -> AbstractContextManager[None]:
        """Around ``optimizer.step()`` inside :meth:`step`."""
        return self.recorder.optimizer_step()

    @property
    def last_record(self) -> StepRecord | None:
        """The record of the last finished step."""
        return self.recorder.last_record

    def metrics(self) -> dict[str, float]:
        """The last step's figures as ``eviction/<field>`` (unmeasured ones left out)."""
        record = self.recorder.last_record
        return record_metrics(record) if record is not None else {}

    def close(self) -> str:
        """Stop recording; on rank zero print and write every rank's summary. Returns the text on every rank."""
        if self.summary is None:
            self.summary = self.recorder.close()
        text = share_summary(self.summary, self.rank, self.world_size, self.log_dir)
        if self.rank == 0:
            print(text)
        return text

    def __enter__(self) -> LoopEvictionMonitor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.summary is not None:
            return
        if exc_type is None:
            self.close()
        else:  # no collective after a failure: other ranks may not get here
            self.summary = self.recorder.close()
