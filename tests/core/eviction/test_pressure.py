"""The pressure source: eviction estimated from resident memory, or read from PCIe counters."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.sources import (
    PressureSource,
    open_source,
)
from lightning_paged.core.eviction.sources.pressure import MemorySample, _nvml_pcie_bytes, counter_delta
from lightning_paged.testing import GIB, MIB, FakeProbe


def test_pressure_source_estimates_eviction_from_resident_memory():
    probe = FakeProbe()
    source = open_source("pressure", "cpu", probe=probe)
    assert isinstance(source, PressureSource)
    recorder = EvictionRecorder(source, paged_bytes=lambda: 6 * GIB)

    recorder.begin_step(seq_len=4096)
    probe.evict(512 * MIB)  # forward/backward of a long batch
    probe.retries += 1
    recorder.begin_optimizer_step()
    probe.page_in(384 * MIB)
    long_step = recorder.end_step()

    recorder.begin_step(seq_len=128)
    probe.evict(MIB)  # below the 2 MiB noise floor
    recorder.begin_optimizer_step()
    short_step = recorder.end_step()

    assert long_step.estimated and long_step.source == "pressure"
    assert (long_step.evicted_bytes, long_step.paged_in_bytes) == (512 * MIB, 384 * MIB)
    assert long_step.alloc_retries == 1 and long_step.ooms == 0
    assert long_step.device_free_bytes == 10 * GIB  # the allocator took what eviction freed
    assert (short_step.evicted_bytes, short_step.paged_in_bytes, short_step.alloc_retries) == (0, 0, 0)
    assert long_step.gpu_page_faults is None and long_step.thrashing_events is None
    assert probe.syncs >= 2  # waited for the device before each timing mark


def test_pressure_source_prefers_pcie_counters_when_nvml_has_them():
    probe = FakeProbe(pcie=True)
    source = open_source("pressure", "cpu", probe=probe)
    recorder = EvictionRecorder(source, paged_bytes=lambda: 0)
    recorder.begin_step(seq_len=10)
    probe.evict(64 * MIB)
    probe.page_in(64 * MIB)  # evicted and back within the step: invisible to resident samples
    record = recorder.end_step()
    assert (record.evicted_bytes, record.paged_in_bytes) == (64 * MIB, 64 * MIB)


def test_pcie_counter_deltas_survive_a_wrap():
    assert counter_delta(10, 25, 2**32) == 15
    assert counter_delta(2**32 - 5, 7, 2**32) == 12
    assert counter_delta(2**32 - 5, 7, None) == 0  # no known width: never a negative or made-up figure

    class WrappingProbe(FakeProbe):
        def sample(self) -> MemorySample:
            s = super().sample()
            return MemorySample(
                s.free, s.total, s.reserved, s.alloc_retries, s.ooms, s.pcie_rx, s.pcie_tx, 2**32
            )

    probe = WrappingProbe(pcie=True)
    probe.rx, probe.tx = 2**32 - 100, 2**32 - 1000
    source = PressureSource(probe=probe)
    source.start()
    source.begin_step(0)
    probe.rx, probe.tx = 50, 3000  # both wrapped during the step
    counters = source.end_step(0)
    assert (counters.paged_in_bytes, counters.evicted_bytes) == (150, 4000)


def test_nvml_field_values_are_read_by_their_value_type(monkeypatch):
    def field(value_type, **members):
        union = SimpleNamespace(
            **{"uiVal": 0, "ulVal": 0, "ullVal": 0xDEAD_0000_0000_0000, "usVal": 0, **members}
        )
        return SimpleNamespace(nvmlReturn=0, valueType=value_type, value=union)

    fake = SimpleNamespace(
        nvmlDeviceGetFieldValues=lambda handle, ids: [field(1, uiVal=7), field(1, uiVal=9)]
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert _nvml_pcie_bytes(object()) == (7, 9, 2**32)
    fake.nvmlDeviceGetFieldValues = lambda handle, ids: [
        field(3, ullVal=2**40),
        SimpleNamespace(nvmlReturn=3, valueType=3, value=None),
    ]
    assert _nvml_pcie_bytes(object()) == (2**40, None, 2**64)
