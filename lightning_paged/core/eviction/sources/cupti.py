"""Counts unified-memory migrations with CUPTI's ``UNIFIED_MEMORY_COUNTER`` activity records.

Bindings: the ``cupti-python`` package (optional extra ``cupti``), module ``cupti.cupti``. Every
name used here was checked against cupti-python 13.4.0's and 13.0.1's stub file ``cupti/cupti.pyi`` and the
samples ``cupti-python-samples/cupti_common.py`` (``configure_uvm_activity``, ``cupti_initialize``):

- ``activity_configure_unified_memory_counter(config_ptr, count)`` with
  ``ActivityUnifiedMemoryCounterConfig(count)``: fields ``scope``, ``device_id``, ``enable`` set on
  the array, ``kind`` per element (``config[i].kind``), passed as ``config.ptr``;
- ``ActivityUnifiedMemoryCounterScope.PROCESS_SINGLE_DEVICE``;
- ``ActivityUnifiedMemoryCounterKind.BYTES_TRANSFER_HTOD`` (1), ``BYTES_TRANSFER_DTOH`` (2),
  ``GPU_PAGE_FAULT`` (4), ``THRASHING`` (5);
- ``ActivityUnifiedMemoryMigrationCause.EVICTION`` (4), carried in the record's ``flags_`` attribute;
- ``activity_register_callbacks(buffer_requested, buffer_completed)``: ``buffer_requested()``
  returns ``(buffer_size, max_num_records)``, ``buffer_completed(activities: list)`` gets record
  objects (``ActivityUnifiedMemoryCounter3``: ``kind``, ``counter_kind``, ``value``, ``start``,
  ``end``, ``address``, ``src_id``, ``dst_id``, ``flags_``);
- ``activity_enable(kind)``, ``activity_disable(kind)``, ``ActivityKind.UNIFIED_MEMORY_COUNTER``;
- ``activity_flush_all(1)`` (1 = ``CUPTI_ACTIVITY_FLAG_FLUSH_FORCED``: also incomplete buffers);
- ``get_timestamp()``: nanoseconds on the same clock as the records' ``start``/``end``;
- failures raise ``cuptiError`` (an ``Exception``) whose ``status`` is a ``Result`` (e.g.
  ``ERROR_UM_PROFILING_NOT_SUPPORTED``, ``..._ON_DEVICE``, ``..._ON_NON_P2P_DEVICES``, ``..._WITH_MPS``);
- ``import cupti.cupti`` succeeds without a driver or libcupti: the library is loaded at the first
  real call, which then raises ``cupti._internal.utils.NotSupportedError`` ("CUDA driver is not
  found (libcuda.so.1: ...)") or ``FunctionNotFoundError``, both ``RuntimeError`` subclasses, or
  ``cuda.pathfinder``'s ``DynamicLibNotFoundError`` (a ``RuntimeError`` too) when libcupti is missing.
  Every call that reaches CUPTI is guarded against all of these (:func:`refusals`).

Order: NVIDIA's unified-memory sample (CUPTI ``samples/unified_memory``) calls ``cuInit``, then
registers the buffer callbacks, configures the counters and enables the activity kind, all before
its first allocation creates a context. :func:`configure_counters` is that configuration, callable
before torch creates its CUDA context (the strategies call it from ``setup_environment`` through
:meth:`EvictionMonitor.before_cuda_init <lightning_paged.lightning.monitor.EvictionMonitor>`); a
source started without it configures at its own start, as before, and a refusal either way makes
automatic selection fall back to the pressure source with the reason.

Record meaning (CUPTI documentation of ``CUpti_ActivityUnifiedMemoryCounter3``): ``value`` is bytes
for HTOD/DTOH/THRASHING, the number of fault groups for GPU_PAGE_FAULT; ``start`` is when the
transfer started on the GPU or the driver started handling the fault. An *eviction* is a DTOH record
whose cause is EVICTION; every HTOD record counts as paged in.

The records arrive in buffers on a CUPTI thread or inside ``activity_flush_all``. Each is copied into
a plain :class:`UmEvent` inside the callback (the buffer is reused afterwards) and attributed to the
step whose window ``[begin_step, end_step]`` holds its ``start`` timestamp.

The PyTorch profiler (Kineto) takes over the process-wide CUPTI callbacks when it starts. While it
runs, this source pauses (its steps report ``None``) and registers again once it has stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from lightning_paged.core.eviction.records import StepCounters
from lightning_paged.core.eviction.sources.base import EventSource, Notify, OnceNotifier, SourceUnavailable
from lightning_paged.core.eviction.sources.cupti_setup import (
    configure_counters,
    cupti_importable,
    cupti_unavailable_reason,
    refusals,
    unsupported_reason,
)

log = logging.getLogger(__name__)

# Values of CUpti_ActivityUnifiedMemoryCounterKind and CUpti_ActivityUnifiedMemoryMigrationCause
# (cupti_activity.h); the bindings' IntEnums compare equal to them.
HTOD = 1
DTOH = 2
GPU_PAGE_FAULT = 4
THRASHING = 5
CAUSE_EVICTION = 4

BUFFER_BYTES = 1024 * 1024
FLUSH_FORCED = 1


class UmEvent(NamedTuple):
    """The fields of one unified-memory counter record this source uses, copied out of CUPTI's buffer."""

    counter_kind: int
    value: int
    start: int
    flags: int


def parse_records(activities: Iterable[Any], um_kind: int) -> list[UmEvent]:
    """Unified-memory counter records among ``activities``, as :class:`UmEvent` (others are skipped)."""
    events = []
    for record in activities:
        if int(record.kind) != um_kind:
            continue
        events.append(
            UmEvent(int(record.counter_kind), int(record.value), int(record.start), int(record.flags_))
        )
    return events


def count_events(events: Iterable[UmEvent]) -> StepCounters:
    """Sum events into step counters (exact figures, ``estimated=False``)."""
    evicted = paged_in = faults = thrashing = 0
    for event in events:
        if event.counter_kind == DTOH and event.flags == CAUSE_EVICTION:
            evicted += event.value
        elif event.counter_kind == HTOD:
            paged_in += event.value
        elif event.counter_kind == GPU_PAGE_FAULT:
            faults += event.value
        elif event.counter_kind == THRASHING:
            thrashing += 1
    return StepCounters(
        evicted_bytes=evicted, paged_in_bytes=paged_in, gpu_page_faults=faults, thrashing_events=thrashing
    )


@dataclass
class _Window:
    step: int
    begin: int
    end: int | None = None


class StepAttributor:
    """Assigns events to step windows by their ``start`` timestamp.

    Events before the open window (between steps, or from a closed step delivered late) are added to
    :attr:`unattributed`; events after the window's end wait for the next window's turn.
    """

    def __init__(self) -> None:
        self._window: _Window | None = None
        self._waiting: list[UmEvent] = []
        self.unattributed: dict[str, int] = {"evicted_bytes": 0, "paged_in_bytes": 0, "events": 0}

    def open(self, step: int, begin_ns: int) -> None:
        self._window = _Window(step, begin_ns)

    def close(self, end_ns: int, events: list[UmEvent]) -> StepCounters:
        """Close the open window at ``end_ns`` and count the events that fall in it."""
        window = self._window
        if window is None:
            raise RuntimeError("close() without open()")
        window.end = end_ns
        inside, later = [], []
        for event in [*self._waiting, *events]:
            if event.start < window.begin:
                self._add_unattributed(event)
            elif event.start <= end_ns:
                inside.append(event)
            else:
                later.append(event)
        self._waiting = later
        self._window = None
        return count_events(inside)

    def drop(self, events: list[UmEvent]) -> None:
        """Abandon the open window; count its events and ``events`` as unattributed (pause, stop)."""
        for event in [*self._waiting, *events]:
            self._add_unattributed(event)
        self._waiting = []
        self._window = None

    def _add_unattributed(self, event: UmEvent) -> None:
        counted = count_events([event])
        self.unattributed["evicted_bytes"] += counted.evicted_bytes or 0
        self.unattributed["paged_in_bytes"] += counted.paged_in_bytes or 0
        self.unattributed["events"] += 1


def torch_profiler_active() -> bool:
    """True while a PyTorch (Kineto) profiler session is running in this process."""
    from lightning_paged.core.compat.torch import profiler_active

    return profiler_active()


class CuptiSource(EventSource):
    """Exact per-step eviction, page-in, page-fault and thrashing counts from CUPTI.

    ``binding`` is the ``cupti.cupti`` module (imported on ``start`` when not given);
    ``profiler_active`` tells whether the PyTorch profiler currently owns CUPTI;
    ``sync`` waits for the device (``torch.cuda.synchronize`` by default).
    """

    name = "cupti"

    def __init__(
        self,
        device_index: int = 0,
        binding: Any = None,
        profiler_active: Callable[[], bool] = torch_profiler_active,
        sync: Callable[[], None] | None = None,
        notify: Notify | OnceNotifier | None = None,
    ) -> None:
        self.device_index = device_index
        self._binding = binding
        self._profiler_active = profiler_active
        self._sync = sync
        self._notify = notify if isinstance(notify, OnceNotifier) else OnceNotifier(notify)
        self._lock = threading.Lock()
        self._incoming: list[UmEvent] = []
        self._attributor = StepAttributor()
        self._registered = False
        self._paused_step = False
        self._given_up = False
        self._um_kind = 0

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._binding is None:
            if not cupti_importable():
                raise SourceUnavailable(
                    "cupti-python is not installed (pip install lightning-paged[cupti])", expected=True
                )
            import cupti.cupti as binding

            self._binding = binding
        reason = cupti_unavailable_reason(self._binding)
        if reason is not None:
            raise SourceUnavailable(reason)
        if self._profiler_active():
            self._notify("the PyTorch profiler is running: eviction counting waits until it stops")
            return
        self._register()

    def _register(self, again: bool = False) -> None:
        b = self._binding
        self._um_kind = int(b.ActivityKind.UNIFIED_MEMORY_COUNTER)
        refused = configure_counters(self.device_index, b, again=again)  # at first, done before CUDA
        if refused is not None:
            raise SourceUnavailable(refused)
        try:
            b.activity_register_callbacks(self._buffer_requested, self._buffer_completed)
            b.activity_enable(b.ActivityKind.UNIFIED_MEMORY_COUNTER)
        except refusals(b) as err:
            raise SourceUnavailable(unsupported_reason(b, err)) from err
        self._registered = True

    def stop(self) -> None:
        if not self._registered:
            return
        b = self._binding
        try:
            b.activity_flush_all(FLUSH_FORCED)
            b.activity_disable(b.ActivityKind.UNIFIED_MEMORY_COUNTER)
        except refusals(b) as err:  # stopping must not fail a run that has finished
            log.debug("CUPTI stop: %s", err)
        self._registered = False
        self._attributor.drop(self._take())

    def _pause(self) -> None:
        b = self._binding
        try:
            b.activity_flush_all(FLUSH_FORCED)
            b.activity_disable(b.ActivityKind.UNIFIED_MEMORY_COUNTER)
        except refusals(b) as err:
            log.debug("CUPTI pause: %s", err)
        self._registered = False
        self._attributor.drop(self._take())
        self._notify("the PyTorch profiler took over CUPTI: eviction counts are paused while it runs")

    # CUPTI callbacks ---------------------------------------------------------------------------
    def _buffer_requested(self) -> tuple[int, int]:
        return BUFFER_BYTES, 0  # 0: as many records as fit

    def _buffer_completed(self, activities: list) -> None:
        events = parse_records(activities, self._um_kind)
        if events:
            with self._lock:
                self._incoming.extend(events)

    def _take(self) -> list[UmEvent]:
        with self._lock:
            events, self._incoming = self._incoming, []
        return events

    # steps -------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        profiling = self._profiler_active()
        if profiling and self._registered:
            self._pause()
        elif not profiling and not self._registered and not self._given_up:
            try:
                self._register(again=True)  # first step after the profiler stopped: take CUPTI back
            except SourceUnavailable as err:
                self._given_up = True
                self._notify(f"eviction counting stays off: CUPTI could not be taken back ({err})")
        self._paused_step = not self._registered
        if self._registered:
            try:
                self._attributor.open(step, int(self._binding.get_timestamp()))
            except refusals(self._binding) as err:
                self._fail(err)

    def synchronize(self) -> None:
        if self._sync is not None:
            self._sync()
            return
        import torch

        torch.cuda.synchronize(self.device_index)

    def end_step(self, step: int) -> StepCounters:
        if self._paused_step:
            return StepCounters()
        if self._profiler_active():  # started inside this step: its records went to Kineto
            self._pause()
            return StepCounters()
        b = self._binding
        try:
            end_ns = int(b.get_timestamp())
            b.activity_flush_all(FLUSH_FORCED)
        except refusals(b) as err:
            self._fail(err)
            return StepCounters()
        return self._attributor.close(end_ns, self._take())

    def _fail(self, err: BaseException) -> None:
        """CUPTI refused in the middle of a run: count nothing more, say why once, let training go on."""
        self._registered = False
        self._given_up = True
        self._paused_step = True
        self._attributor.drop(self._take())
        self._notify(f"eviction counting stopped: {unsupported_reason(self._binding, err)}")

    def unattributed(self) -> dict[str, int]:
        return dict(self._attributor.unattributed)
