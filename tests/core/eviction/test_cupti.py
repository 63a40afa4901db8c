"""The CUPTI source: unified-memory counter records parsed and attributed to steps by timestamp, and the profiler handover."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.eviction.sources import (
    CuptiSource,
)
from lightning_paged.core.eviction.sources.cupti import torch_profiler_active
from lightning_paged.testing import GIB, MIB, fake_cupti

HTOD, DTOH, FAULT, THRASH = 1, 2, 4, 5


EVICTION, USER = 4, 1


def test_cupti_records_are_attributed_to_the_step_whose_window_holds_them(tmp_path):
    cupti = fake_cupti()
    profiling = {"on": False}
    source = CuptiSource(binding=cupti, profiler_active=lambda: profiling["on"], sync=lambda: None)
    source.start()
    assert cupti.configured == [[1, 2, 4, 5]] and 25 in cupti.enabled
    recorder = EvictionRecorder(source, tmp_path / "log.jsonl", paged_bytes=lambda: 3 * GIB)

    cupti.now = 100
    recorder.begin_step(seq_len=128)
    cupti.emit(DTOH, 4096, start=150, cause=EVICTION)
    cupti.emit(DTOH, 1000, start=155, cause=USER)  # a prefetch back to host is not an eviction
    cupti.emit(HTOD, 2048, start=160, cause=3)
    cupti.emit(FAULT, 3, start=170)
    cupti.emit(THRASH, 65536, start=180)
    cupti.pending.append(SimpleNamespace(kind=1, start=175))  # another activity kind: skipped
    cupti.now = 200
    first = recorder.end_step()

    cupti.emit(DTOH, 999, start=250, cause=EVICTION)  # between steps
    cupti.now = 300
    recorder.begin_step(seq_len=2048)
    cupti.emit(DTOH, 8192, start=350, cause=EVICTION)
    cupti.emit(DTOH, 1 * MIB, start=360, cause=EVICTION)
    cupti.now = 400
    second = recorder.end_step()

    cupti.emit(DTOH, 77, start=390, cause=EVICTION)  # belongs to step 1 but arrives late
    cupti.now = 500
    recorder.begin_step(seq_len=64)
    cupti.now = 600
    third = recorder.end_step()
    summary = recorder.close()

    assert (first.evicted_bytes, first.paged_in_bytes, first.gpu_page_faults, first.thrashing_events) == (
        4096,
        2048,
        3,
        1,
    )
    assert (second.evicted_bytes, second.paged_in_bytes, second.gpu_page_faults) == (8192 + MIB, 0, 0)
    assert third.evicted_bytes == 0
    assert not first.estimated and first.source == "cupti" and first.paged_bytes_total == 3 * GIB
    assert summary.unattributed == {"evicted_bytes": 999 + 77, "paged_in_bytes": 0, "events": 2}
    assert summary.evicted_bytes == 4096 + 8192 + MIB
    assert 25 not in cupti.enabled  # stopped


def test_cupti_pauses_while_the_torch_profiler_runs_and_takes_cupti_back_after():
    cupti = fake_cupti()
    profiling = {"on": False}
    notes: list[str] = []
    source = CuptiSource(
        binding=cupti, profiler_active=lambda: profiling["on"], sync=lambda: None, notify=notes.append
    )
    source.start()
    recorder = EvictionRecorder(source, paged_bytes=lambda: 0)

    def step(t0: int, evicted: int) -> StepRecord:
        cupti.now = t0
        recorder.begin_step(seq_len=10)
        cupti.emit(DTOH, evicted, start=t0 + 5, cause=EVICTION)
        cupti.now = t0 + 10
        return recorder.end_step()

    assert step(0, 100).evicted_bytes == 100
    profiling["on"] = True
    paused = step(100, 200)
    assert paused.evicted_bytes is None and paused.gpu_page_faults is None  # not measured, not zero
    assert 25 not in cupti.enabled
    profiling["on"] = False
    assert step(200, 300).evicted_bytes == 300
    assert len(cupti.configured) == 2  # configured again after the profiler stopped
    assert sum("profiler" in n for n in notes) == 1


def test_torch_profiler_is_detected_while_it_runs():
    assert not torch_profiler_active()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert torch_profiler_active()
    assert not torch_profiler_active()
