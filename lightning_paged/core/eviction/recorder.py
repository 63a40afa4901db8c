"""Turns a training loop's steps into :class:`StepRecord` lines. Framework-free.

The Lightning callback drives it from hooks; a hand-written, Fabric or Accelerate loop drives it
directly::

    recorder = EvictionRecorder.open("auto", device, "run/eviction_events.jsonl")
    for batch in loader:
        with recorder.step(batch):
            loss = model(**batch).loss
            loss.backward()
            with recorder.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
    print(recorder.close().render())
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_paged.core.eviction.log import JsonlWriter
from lightning_paged.core.eviction.paged import PagedBytes
from lightning_paged.core.eviction.records import RECORD_FIELDS, StepRecord
from lightning_paged.core.eviction.seqlen import (
    LongSequenceDetector,
    SeqLenFn,
    batch_length,
    batch_longest,
    resolve_tokens,
)
from lightning_paged.core.eviction.sources import MemoryProbe, open_source
from lightning_paged.core.eviction.sources.base import EventSource, Notify, OnceNotifier
from lightning_paged.core.eviction.summary import Summary, SummaryBuilder

log = logging.getLogger(__name__)

NO_PAGED_STATE = (
    "no paged tensors exist after the first optimizer step, so no optimizer state can be evicted: "
    "use a Paged* optimizer (bitsandbytes by itself pages only parameters of at least 100,000 elements; "
    "OptimizerConfig(page_adapters=True) pages the small adapter states too)"
)


def new_run_id() -> str:
    """Start time (UTC), process id and a random suffix: unique per recorder."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class EvictionRecorder:
    """Records one :class:`StepRecord` per training step from an event source.

    Args:
        source: a started event source (see :func:`open_source`, or use :meth:`open`).
        log_path: JSONL file to append records to; None keeps them in memory only (summary, last record).
        long_sequence_threshold: lengths at or above it count as long; None: above the running 90th percentile.
        seq_len_fn: reads ``seq_len`` (or ``(seq_len, tokens)``) from batches of another shape.
        rank: global rank written into each record.
        top_k: how many of the slowest steps the summary lists.
        paged_bytes: returns the bytes of state in paged tensors (its ``capacity()``, when it has one, the
            managed memory they take); by default :class:`PagedBytes` over bitsandbytes' list, sizes only.
        notify: where one-time notices go (default: this module's logger, as warnings).
    """

    def __init__(
        self,
        source: EventSource,
        log_path: str | os.PathLike[str] | None = None,
        *,
        long_sequence_threshold: int | None = None,
        seq_len_fn: SeqLenFn | None = None,
        rank: int = 0,
        top_k: int = 5,
        paged_bytes: Callable[[], int] | None = None,
        notify: Notify | OnceNotifier | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.source = source
        self.writer = JsonlWriter(log_path) if log_path is not None else None
        self.rank = rank
        self.run_id = new_run_id()
        self.last_record: StepRecord | None = None
        self._detector = LongSequenceDetector(long_sequence_threshold)
        self._seq_len_fn = seq_len_fn
        self._paged_bytes = paged_bytes or PagedBytes()
        self._notify = notify if isinstance(notify, OnceNotifier) else OnceNotifier(notify)
        self._clock = clock
        self._summary = SummaryBuilder(top_k)
        self._step = 0
        self._open = False
        self._closed = False
        self._seq_len: int | None = None
        self._tokens: Any = None
        self._longest: Any = None
        self._t0 = 0.0
        self._t_opt: float | None = None
        self._opt_s: float | None = None
        self._optimizer_seen = False

    @classmethod
    def open(
        cls,
        source: str = "auto",
        device: torch.device | str = "cpu",
        log_path: str | os.PathLike[str] | None = None,
        *,
        notify: Notify | OnceNotifier | None = None,
        probe: MemoryProbe | None = None,
        **kwargs: Any,
    ) -> EvictionRecorder:
        """Pick and start the source for ``device`` (see :func:`open_source`) and record from it.

        ``probe`` replaces the pressure source's CUDA memory reader; ``kwargs`` go to the recorder.
        """
        once = notify if isinstance(notify, OnceNotifier) else OnceNotifier(notify)
        dev = torch.device(device)
        kwargs.setdefault("paged_bytes", PagedBytes(dev.index if dev.type == "cuda" else None))
        return cls(open_source(source, dev, probe=probe, notify=once), log_path, notify=once, **kwargs)

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return self._step

    def begin_step(
        self,
        batch: Any = None,
        *,
        seq_len: int | None = None,
        tokens: int | None = None,
        longest_example: int | None = None,
        step: int | None = None,
    ) -> None:
        """Start a step. The lengths come from ``batch`` unless ``seq_len`` is given.

        ``step`` numbers it (a resumed run passes its global step); by default the step after the
        previous one, from 0.
        """
        if step is not None:
            self._step = step
        if self._open:
            log.debug("step %d was not ended; it is dropped", self._step)
        if seq_len is None and batch is not None:
            seq_len, tokens = batch_length(batch, self._seq_len_fn)
            if self._seq_len_fn is None:
                longest_example = batch_longest(batch)
        self._seq_len, self._tokens, self._longest = seq_len, tokens, longest_example
        self._t_opt = self._opt_s = None
        self._open = True
        self.source.begin_step(self._step)
        self._t0 = self._clock()

    def begin_optimizer_step(self) -> None:
        """Mark the start of ``optimizer.step()``: queued backward work is waited for first."""
        if not self._open:
            return
        self.source.synchronize()
        self.source.begin_optimizer_step()
        self._t_opt = self._clock()

    def end_optimizer_step(self) -> None:
        """Mark the end of ``optimizer.step()``; optional, :meth:`end_step` closes an open one."""
        if self._t_opt is None:
            return
        self.source.synchronize()
        self._opt_s = self._clock() - self._t_opt
        self._t_opt = None

    @contextmanager
    def optimizer_step(self) -> Iterator[None]:
        self.begin_optimizer_step()
        yield
        self.end_optimizer_step()

    def end_step(self) -> StepRecord:
        """Finish the step, write its line and return the record."""
        if not self._open:
            raise RuntimeError("end_step() without begin_step()")
        self.source.synchronize()
        t_end = self._clock()
        if self._t_opt is not None:
            self._opt_s = t_end - self._t_opt
            self._t_opt = None
        counters = self.source.end_step(self._step)
        paged_total = self._paged_bytes()
        if self._opt_s is not None and not self._optimizer_seen:
            self._optimizer_seen = True
            if paged_total == 0 and self.source.name != "none":
                self._notify(NO_PAGED_STATE)
        record = StepRecord(
            step=self._step,
            seq_len=self._seq_len,
            longest_example=resolve_tokens(self._longest),
            tokens=resolve_tokens(self._tokens),
            long_sequence=self._detector(self._seq_len),
            evicted_bytes=counters.evicted_bytes,
            paged_in_bytes=counters.paged_in_bytes,
            gpu_page_faults=counters.gpu_page_faults,
            thrashing_events=counters.thrashing_events,
            optimizer_step_s=self._opt_s,
            step_s=t_end - self._t0,
            device_free_bytes=counters.device_free_bytes,
            alloc_retries=counters.alloc_retries,
            ooms=counters.ooms,
            paged_bytes_total=paged_total,
            paged_capacity_bytes=self._paged_capacity(),
            source=self.source.name,
            estimated=counters.estimated,
            rank=self.rank,
            run=self.run_id,
        )
        if self.writer is not None:
            self.writer.write({name: getattr(record, name) for name in RECORD_FIELDS})
        self._summary.add(record)
        self.last_record = record
        self._open = False
        self._tokens = self._longest = None
        self._step += 1
        return record

    def _paged_capacity(self) -> int | None:
        capacity = getattr(self._paged_bytes, "capacity", None)
        return int(capacity()) if callable(capacity) else None

    @contextmanager
    def step(self, batch: Any = None, **kwargs: Any) -> Iterator[EvictionRecorder]:
        """``begin_step`` / ``end_step`` around a block; a step that raises is not recorded."""
        self.begin_step(batch, **kwargs)
        try:
            yield self
        except BaseException:
            self._open = False
            raise
        self.end_step()

    def summary(self) -> Summary:
        """The summary of the steps recorded so far."""
        return self._summary.result(self.source.unattributed())

    def close(self) -> Summary:
        """Stop the source, close the log and return the summary. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.source.stop()
            if self.writer is not None:
                self.writer.close()
        return self.summary()
