"""Event sources where the libraries refuse: cupti-python installed but unusable, NVML counters that wrap.

cupti-python 13.4 is not a test dependency (NVIDIA licence; it pulls nvidia-cuda-cupti and
cuda-bindings). ``UnusableCupti`` stands in for ``cupti.cupti`` on a machine without a driver: its
structs build, and every call that reaches the library raises what cupti-python 13.4 raises there,
``cupti._internal.utils.NotSupportedError`` (a ``RuntimeError``, not ``cuptiError``) with its message.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import quiet_trainer
from test_eviction import DTOH, EVICTION, FakeCupti, FakeProbe

from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.sources import PressureSource, open_source
from lightning_paged.core.eviction.sources.cupti import (
    CuptiSource,
    configure_counters,
    cupti_available,
    cupti_unavailable_reason,
)
from lightning_paged.core.eviction.sources.pressure import (
    MemorySample,
    _nvml_pcie_bytes,
    counter_delta,
)

NO_DRIVER = (
    "CUDA driver is not found (libcuda.so.1: cannot open shared object file: No such file or directory)"
)


class NotSupportedError(RuntimeError):
    """Same name and base as ``cupti._internal.utils.NotSupportedError``."""


class UnusableCupti(FakeCupti):
    """``cupti.cupti`` imported on a machine where the library cannot run: each real call refuses."""

    def __init__(self, fail_after: int = 0) -> None:
        super().__init__()
        self.calls = 0
        self.fail_after = fail_after  # real calls that still work (a driver lost mid-run)

    def _call(self) -> None:
        self.calls += 1
        if self.calls > self.fail_after:
            raise NotSupportedError(NO_DRIVER)

    def get_timestamp(self) -> int:
        self._call()
        return super().get_timestamp()

    def activity_configure_unified_memory_counter(self, ptr: int, count: int) -> None:
        self._call()
        super().activity_configure_unified_memory_counter(ptr, count)

    def activity_register_callbacks(self, requested, completed) -> None:
        self._call()
        super().activity_register_callbacks(requested, completed)

    def activity_enable(self, kind: int) -> None:
        self._call()
        super().activity_enable(kind)

    def activity_flush_all(self, flag: int) -> None:
        self._call()
        super().activity_flush_all(flag)

    def activity_disable(self, kind: int) -> None:
        self._call()
        super().activity_disable(kind)


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


def test_the_strategy_lets_callbacks_prepare_before_its_device_set_up(tiny_llama):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_paged import PagedQLoRAStrategy
    from lightning_paged.lightning.mixin import PagedOptimizerMixin

    order: list[str] = []

    class Recorder(pl.Callback):
        def before_cuda_init(self, device: torch.device) -> None:
            order.append(f"before_cuda_init {device.type}")

        def setup(self, trainer, pl_module, stage):
            order.append("setup")

    class Module(PagedOptimizerMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

    strategy = PagedQLoRAStrategy(lora_r=2, compute_dtype="float32", gradient_checkpointing=False)
    trainer = quiet_trainer(strategy=strategy, max_steps=1, callbacks=[Recorder()])
    trainer.fit(Module(), DataLoader([torch.randint(0, 128, (8,))], batch_size=1))
    assert order[:2] == ["before_cuda_init cpu", "setup"]  # setup_environment comes before every setup hook


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


@pytest.mark.requires_cuda
def test_cupti_on_this_gpu_is_available_or_says_why():
    reason = cupti_unavailable_reason()
    assert reason is None or reason
