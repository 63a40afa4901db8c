"""Which event source runs: the fallback chain, its one-time notices, and the setting's check."""

from __future__ import annotations

import pytest
import torch

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.sources import (
    NullSource,
    PressureSource,
    open_source,
)
from lightning_paged.testing import CuptiResult, FakeProbe, fake_cupti


def test_cupti_refusal_is_reported_once_and_the_pressure_source_takes_over():
    notes: list[str] = []
    cupti = fake_cupti(refuse=CuptiResult.ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE)
    source = open_source("auto", "cuda:0", cupti_binding=cupti, probe=FakeProbe(), notify=notes.append)
    assert isinstance(source, PressureSource)
    assert len(notes) == 1
    assert (
        "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE" in notes[0] and "not supported on this GPU" in notes[0]
    )


def test_on_cpu_the_reason_for_no_events_is_given_once_and_lengths_are_still_recorded(tmp_path):
    notes: list[str] = []
    recorder = EvictionRecorder.open("auto", "cpu", tmp_path / "log.jsonl", notify=notes.append)
    for n in (16, 32, 48, 64, 80):
        with recorder.step({"input_ids": torch.ones(2, n, dtype=torch.long)}), recorder.optimizer_step():
            pass
    recorder.close()
    assert len(notes) == 1
    assert "No unified-memory eviction events" in notes[0] and "not on a CUDA GPU" in notes[0]
    records = read_jsonl(tmp_path / "log.jsonl").records
    assert [r["seq_len"] for r in records] == [16, 32, 48, 64, 80]
    assert all(r["evicted_bytes"] is None and r["source"] == "none" for r in records)
    assert all(r["optimizer_step_s"] is not None and r["step_s"] >= r["optimizer_step_s"] for r in records)


def test_forced_source_that_cannot_run_says_why_and_falls_back():
    notes: list[str] = []
    source = open_source("cupti", "cpu", notify=notes.append)
    assert isinstance(source, NullSource)
    assert notes[0].startswith("the cupti event source cannot run: training runs on cpu")
    assert isinstance(open_source("none", "cpu", probe=FakeProbe(), notify=notes.append), NullSource)


def test_unknown_source_setting_names_the_setting():
    with pytest.raises(SettingError, match=r"source must be one of auto, cupti, pressure, none; got 'nvml'"):
        open_source("nvml", "cpu")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("setting", ["pressure", "auto"])
def test_sources_read_a_real_device(setting, tmp_path):
    notes: list[str] = []
    recorder = EvictionRecorder.open(setting, "cuda", tmp_path / "log.jsonl", notify=notes.append)
    x = torch.randn(2048, 2048, device="cuda")
    for n in (128, 256):
        with recorder.step({"input_ids": torch.ones(2, n, dtype=torch.long, device="cuda")}):
            y = x @ x
            with recorder.optimizer_step():
                y.sum()
    recorder.close()
    record = recorder.last_record
    assert record is not None and record.source in ("cupti", "pressure")
    assert record.tokens == 512 and record.evicted_bytes is not None
    if record.source == "pressure":
        total = torch.cuda.mem_get_info()[1]
        assert 0 < record.device_free_bytes <= total and record.alloc_retries == 0
