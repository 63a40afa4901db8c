"""CUPTI where cupti-python is installed but refuses: every call guarded, a real call probed, one fallback.

cupti-python is not a test dependency (NVIDIA licence; it pulls nvidia-cuda-cupti and cuda-bindings):
``UnusableCupti`` stands in for ``cupti.cupti`` on a machine without a driver, raising what
cupti-python 13.4 raises there (``NotSupportedError``, a ``RuntimeError``, with its message).
"""

from __future__ import annotations

import pytest

from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.sources import PressureSource, open_source
from lightning_paged.core.eviction.sources.cupti import CuptiSource
from lightning_paged.core.eviction.sources.cupti_setup import (
    configure_counters,
    cupti_available,
    cupti_unavailable_reason,
)
from lightning_paged.testing import NO_DRIVER, FakeCupti, FakeProbe, NotSupportedError, UnusableCupti

DTOH, EVICTION = 2, 4


def test_availability_probes_a_real_call():
    assert not cupti_available(UnusableCupti())
    assert (
        cupti_unavailable_reason(UnusableCupti())
        == f"CUPTI cannot be used here (NotSupportedError: {NO_DRIVER})"
    )
    assert cupti_available(FakeCupti())


def test_auto_falls_back_once_with_the_reason():
    notes: list[str] = []
    source = open_source(
        "auto", "cuda:0", cupti_binding=UnusableCupti(), probe=FakeProbe(), notify=notes.append
    )
    assert isinstance(source, PressureSource)
    assert notes == [
        f"the cupti event source cannot run: CUPTI cannot be used here (NotSupportedError: {NO_DRIVER}); falling back"
    ]


def test_a_refusal_in_the_middle_of_a_run_stops_counting_and_training_goes_on():
    cupti = UnusableCupti(fail_after=5)  # probe, configure, register, enable, first step's timestamp
    notes: list[str] = []
    source = CuptiSource(binding=cupti, profiler_active=lambda: False, sync=lambda: None, notify=notes.append)
    source.start()
    recorder = EvictionRecorder(source, paged_bytes=lambda: 0)
    recorder.begin_step(seq_len=8)
    cupti.emit(DTOH, 100, start=0, cause=EVICTION)
    refused = recorder.end_step()  # its timestamp refuses
    assert refused.evicted_bytes is None
    with recorder.step(seq_len=8):
        pass
    assert recorder.last_record is not None and recorder.last_record.evicted_bytes is None
    source.stop()  # refuses too, quietly
    assert sum("eviction counting stopped" in n and "NotSupportedError" in n for n in notes) == 1


def test_counters_configured_before_cuda_are_not_configured_again_at_start():
    cupti = FakeCupti()
    assert configure_counters(0, cupti) is None  # what the strategy's setup_environment triggers
    assert len(cupti.configured) == 1 and cupti.completed is None and not cupti.enabled
    source = CuptiSource(binding=cupti, profiler_active=lambda: False, sync=lambda: None)
    source.start()  # registers and enables after the early configuration, in the sample's order
    assert len(cupti.configured) == 1 and cupti.completed is not None and cupti.enabled == {25}
    assert configure_counters(1, cupti) is None and len(cupti.configured) == 2  # another device


def test_an_early_refusal_is_kept_and_makes_auto_fall_back():
    class ConfigurationRefused(FakeCupti):
        attempts = 0

        def activity_configure_unified_memory_counter(self, ptr: int, count: int) -> None:
            self.attempts += 1
            raise NotSupportedError("cuptiActivityConfigureUnifiedMemoryCounter is not found")

    cupti = ConfigurationRefused()
    notes: list[str] = []
    assert "is not found" in (configure_counters(0, cupti) or "")
    source = open_source("auto", "cuda:0", cupti_binding=cupti, probe=FakeProbe(), notify=notes.append)
    assert isinstance(source, PressureSource) and len(notes) == 1 and "is not found" in notes[0]
    assert cupti.attempts == 1  # the answer given before CUDA stands


@pytest.mark.requires_cuda
def test_cupti_on_this_gpu_is_available_or_says_why():
    reason = cupti_unavailable_reason()
    assert reason is None or reason
