"""The framework-free eviction core: sources, attribution, long-sequence rule, the log, the summary."""

from __future__ import annotations

import enum
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.log import JsonlWriter, read_jsonl
from lightning_paged.core.eviction.paged import PagedBytes
from lightning_paged.core.eviction.recorder import NO_PAGED_STATE, EvictionRecorder
from lightning_paged.core.eviction.records import RECORD_FIELDS, StepCounters, StepRecord
from lightning_paged.core.eviction.seqlen import LongSequenceDetector, batch_length
from lightning_paged.core.eviction.sources import (
    CuptiSource,
    EventSource,
    MemorySample,
    NullSource,
    PressureSource,
    open_source,
)
from lightning_paged.core.eviction.sources.cupti import torch_profiler_active
from lightning_paged.core.eviction.summary import summarize

MIB = 1024 * 1024
GIB = 1024 * MIB


# --- fakes at the seams -------------------------------------------------------------------------


class ScriptedSource(EventSource):
    """A source that reports known counters for known steps."""

    name = "pressure"

    def __init__(self, script: dict[int, StepCounters]) -> None:
        self.script = script
        self.calls: list[str] = []

    def begin_step(self, step: int) -> None:
        self.calls.append(f"begin {step}")

    def begin_optimizer_step(self) -> None:
        self.calls.append("optimizer")

    def end_step(self, step: int) -> StepCounters:
        self.calls.append(f"end {step}")
        return self.script.get(step, StepCounters(evicted_bytes=0, paged_in_bytes=0, estimated=True))

    def stop(self) -> None:
        self.calls.append("stop")


class FakeProbe:
    """Device memory as a few numbers: managed pages resident, allocator reserve, PCIe counters."""

    def __init__(self, total: int = 16 * GIB, resident: int = 4 * GIB, pcie: bool = False) -> None:
        self.total, self.resident, self.reserved = total, resident, 2 * GIB
        self.retries = self.ooms = 0
        self.rx = self.tx = 0 if pcie else None
        self.samples = 0
        self.syncs = 0

    def sample(self) -> MemorySample:
        self.samples += 1
        free = self.total - self.resident - self.reserved
        return MemorySample(free, self.total, self.reserved, self.retries, self.ooms, self.rx, self.tx)

    def synchronize(self) -> None:
        self.syncs += 1

    def evict(self, n: int) -> None:  # an activation spike pushes managed pages out
        self.resident -= n
        self.reserved += n
        if self.tx is not None:
            self.tx += n

    def page_in(self, n: int) -> None:  # the optimizer touches its state again
        self.resident += n
        self.reserved -= n
        if self.rx is not None:
            self.rx += n


class Result(enum.IntEnum):  # values of CUptiResult (cupti_result.h), names as cupti.cupti.Result has them
    SUCCESS = 0
    ERROR_UM_PROFILING_NOT_SUPPORTED = 30
    ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE = 31


class FakeCupti:
    """Stands in for the ``cupti.cupti`` module: the names and call shapes of cupti-python 13.4.

    Records are delivered to the registered buffer-completed callback as attribute objects, as the
    bindings do, when ``activity_flush_all`` runs. ``now`` is the CUPTI clock in nanoseconds.
    """

    class cuptiError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"CUPTI error {status}")
            self.status = status

    Result = Result
    ActivityKind = SimpleNamespace(UNIFIED_MEMORY_COUNTER=25, MEMCPY=1)
    ActivityUnifiedMemoryCounterKind = SimpleNamespace(
        BYTES_TRANSFER_HTOD=1, BYTES_TRANSFER_DTOH=2, GPU_PAGE_FAULT=4, THRASHING=5
    )
    ActivityUnifiedMemoryCounterScope = SimpleNamespace(PROCESS_SINGLE_DEVICE=1)

    class _Config:
        """``ActivityUnifiedMemoryCounterConfig(count)``: array fields set on it, ``kind`` per element."""

        def __init__(self, count: int) -> None:
            self.items = [SimpleNamespace(kind=None) for _ in range(count)]
            self.scope = self.device_id = self.enable = None
            self.ptr = id(self)

        def __getitem__(self, i: int) -> SimpleNamespace:
            return self.items[i]

    def __init__(self, refuse: Result | None = None) -> None:
        self.refuse = refuse
        self.now = 0
        self.pending: list[SimpleNamespace] = []
        self.completed = None
        self.enabled: set[int] = set()
        self.configured: list[list[int]] = []
        self.flushes = 0
        self._configs: dict[int, FakeCupti._Config] = {}

    def ActivityUnifiedMemoryCounterConfig(self, count: int) -> _Config:
        config = self._Config(count)
        self._configs[config.ptr] = config
        return config

    def activity_configure_unified_memory_counter(self, ptr: int, count: int) -> None:
        if self.refuse is not None:
            raise self.cuptiError(self.refuse)
        config = self._configs[ptr]
        assert config.scope == 1 and config.enable == 1 and len(config.items) == count
        self.configured.append([item.kind for item in config.items])

    def activity_register_callbacks(self, requested, completed) -> None:
        size, max_records = requested()
        assert size > 0 and max_records == 0
        self.completed = completed

    def activity_enable(self, kind: int) -> None:
        self.enabled.add(kind)

    def activity_disable(self, kind: int) -> None:
        self.enabled.discard(kind)

    def activity_flush_all(self, flag: int) -> None:
        assert flag == 1
        self.flushes += 1
        records, self.pending = self.pending, []
        if self.completed is not None and records:
            self.completed(records)

    def get_timestamp(self) -> int:
        return self.now

    def emit(self, counter_kind: int, value: int, start: int, cause: int = 0) -> None:
        """A ``UNIFIED_MEMORY_COUNTER`` record with the fields of ``ActivityUnifiedMemoryCounter3``."""
        if 25 in self.enabled:
            self.pending.append(
                SimpleNamespace(
                    kind=25,
                    counter_kind=counter_kind,
                    value=value,
                    start=start,
                    end=start + 10,
                    address=0x7F0000000000,
                    src_id=0,
                    dst_id=0xFFFFFFFF,
                    flags_=cause,
                    process_id=os.getpid(),
                    stream_id=0,
                    pad=0,
                    processors=[0] * 5,
                )
            )


def fake_cupti(refuse: Result | None = None) -> FakeCupti:
    return FakeCupti(refuse)


HTOD, DTOH, FAULT, THRASH = 1, 2, 4, 5
EVICTION, USER = 4, 1


# --- CUPTI records, parsed and attributed by timestamp -------------------------------------------


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


def test_cupti_refusal_is_reported_once_and_the_pressure_source_takes_over():
    notes: list[str] = []
    cupti = fake_cupti(refuse=Result.ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE)
    source = open_source("auto", "cuda:0", cupti_binding=cupti, probe=FakeProbe(), notify=notes.append)
    assert isinstance(source, PressureSource)
    assert len(notes) == 1
    assert (
        "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE" in notes[0] and "not supported on this GPU" in notes[0]
    )


# --- pressure source with a fake probe -----------------------------------------------------------


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


# --- source selection and the CPU message --------------------------------------------------------


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


def test_no_paged_state_is_pointed_out_once_when_a_source_could_see_evictions():
    notes: list[str] = []
    recorder = EvictionRecorder(ScriptedSource({}), paged_bytes=lambda: 0, notify=notes.append)
    for _ in range(3):
        recorder.begin_step(seq_len=8)
        recorder.begin_optimizer_step()
        recorder.end_step()
    assert notes == [NO_PAGED_STATE]


# --- a fake source with known events, through the recorder into the log and summary --------------


def test_known_events_reach_the_log_and_the_summary(tmp_path):
    script = {
        1: StepCounters(evicted_bytes=300 * MIB, paged_in_bytes=300 * MIB, estimated=True),
        3: StepCounters(evicted_bytes=100 * MIB, paged_in_bytes=0, ooms=1, estimated=True),
    }
    source = ScriptedSource(script)
    ticks = iter(range(1000))
    recorder = EvictionRecorder(
        source,
        tmp_path / "events.jsonl",
        long_sequence_threshold=1024,
        rank=3,
        paged_bytes=lambda: GIB,
        clock=lambda: float(next(ticks)),
    )
    lengths = [256, 2048, 512, 1024]
    for n in lengths:
        mask = torch.zeros(2, n)
        mask[:, : n // 2] = 1
        batch = {"input_ids": torch.ones(2, n, dtype=torch.long), "attention_mask": mask}
        with recorder.step(batch), recorder.optimizer_step():
            pass
    summary = recorder.close()

    content = read_jsonl(tmp_path / "events.jsonl")
    assert content.bad_lines == [] and len(content.records) == 4
    assert all(list(r) == list(RECORD_FIELDS) for r in content.records)
    rows = content.records
    assert [r["seq_len"] for r in rows] == lengths
    assert [r["tokens"] for r in rows] == [n for n in lengths]  # half of 2 rows
    assert [r["long_sequence"] for r in rows] == [False, True, False, True]
    assert [r["evicted_bytes"] for r in rows] == [0, 300 * MIB, 0, 100 * MIB]
    assert {r["rank"] for r in rows} == {3} and {r["paged_bytes_total"] for r in rows} == {GIB}
    assert source.calls[:4] == ["begin 0", "optimizer", "end 0", "begin 1"] and source.calls[-1] == "stop"

    assert summary.steps == 4 and summary.long_steps == 2
    assert summary.evicted_bytes == 400 * MIB and summary.evicted_bytes_long == 400 * MIB
    assert summary.steps_with_eviction == 2 and summary.long_steps_with_eviction == 2
    assert summary.ooms == 1 and summary.estimated
    text = summary.render()
    assert "400.0 MiB (400.0 MiB on long-sequence steps)" in text and "estimated" in text


def test_summary_lists_the_slowest_steps_with_their_lengths():
    rows = [
        {**_row(step, seq_len=64 * (step + 1)), "step_s": s}
        for step, s in enumerate([0.1, 0.9, 0.2, 0.5, 0.3, 0.8])
    ]
    summary = summarize(rows, top_k=3)
    assert [(s.step, s.seq_len) for s in summary.slowest] == [(1, 128), (5, 384), (3, 256)]
    assert "slowest steps" in summary.render()


def _row(step: int, seq_len: int) -> dict:
    return {
        "step": step,
        "seq_len": seq_len,
        "tokens": seq_len,
        "long_sequence": False,
        "evicted_bytes": 0,
        "paged_in_bytes": 0,
        "gpu_page_faults": None,
        "thrashing_events": None,
        "optimizer_step_s": 0.01,
        "step_s": 0.1,
        "device_free_bytes": None,
        "alloc_retries": 0,
        "ooms": 0,
        "paged_bytes_total": 0,
        "source": "pressure",
        "estimated": True,
        "rank": 0,
        "run": "r",
    }


def test_a_step_that_raises_is_not_recorded():
    recorder = EvictionRecorder(ScriptedSource({}), paged_bytes=lambda: 0)
    with pytest.raises(RuntimeError, match="boom"), recorder.step(seq_len=8):
        raise RuntimeError("boom")
    with recorder.step(seq_len=16):
        pass
    assert recorder.steps == 1 and recorder.last_record is not None and recorder.last_record.seq_len == 16


# --- sequence length and the long-sequence rule --------------------------------------------------


def test_long_sequence_by_threshold():
    detect = LongSequenceDetector(threshold=2048)
    assert [detect(n) for n in (512, 2047, 2048, 4096, None)] == [False, False, True, True, False]


def test_long_sequence_by_running_90th_percentile():
    detect = LongSequenceDetector()
    history = [100, 120, 110, 130, 90, 100, 125, 105, 115, 500]
    assert [detect(n) for n in history] == [False] * 10  # too little history yet: nothing is flagged
    assert detect.cutoff() == 130  # nearest rank 9 of 10 sorted lengths
    assert detect(131)
    assert not detect(130)
    assert detect(600)


def test_batch_length_shapes():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    seq, tokens = batch_length({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask})
    assert seq == 4 and int(tokens) == 5
    assert batch_length({"attention_mask": mask})[0] == 4
    assert batch_length((torch.zeros(3, 7), torch.zeros(3)))[0] == 7
    assert batch_length({"pixels": torch.zeros(2, 3)}) == (None, None)
    assert batch_length({"x": [1, 2, 3]}, seq_len_fn=lambda b: (len(b["x"]), 2)) == (3, 2)


def test_paged_bytes_come_from_metadata_only():
    import bitsandbytes.functional as F

    paged = F.GlobalPageManager.get_instance().paged_tensors
    meta = torch.empty(1000, 100, device="meta")  # no storage: reading any element would fail
    meta.page_deviceid = 0
    paged.append(meta)
    try:
        assert PagedBytes(0)() == 400_000
        assert PagedBytes(1)() == 0
    finally:
        paged.remove(meta)


# --- the log stays readable after a crash --------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lightning_paged.core.eviction.recorder import EvictionRecorder
    recorder = EvictionRecorder.open("none", "cpu", sys.argv[1])
    n = 0
    while True:
        n = n % 4000 + 1
        with recorder.step({"input_ids": torch.ones(1, n, dtype=torch.long)}):
            pass
    """
)


def test_log_is_valid_after_the_writer_is_killed(tmp_path):
    log = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(log)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and log.stat().st_size > 200_000:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    content = read_jsonl(log)
    assert len(content.records) > 100
    assert content.bad_lines == []  # whole lines, one write each: nothing half-written
    assert [r["step"] for r in content.records] == list(range(len(content.records)))


def test_unfinished_last_line_is_reported_and_does_not_spoil_the_next_run(tmp_path):
    log = tmp_path / "events.jsonl"
    with JsonlWriter(log) as writer:
        writer.write({"step": 0})
        writer.write({"step": 1})
    with open(log, "a") as f:
        f.write('{"step": 2, "seq_l')  # a crash in the middle of a line
    content = read_jsonl(log)
    assert [r["step"] for r in content.records] == [0, 1]
    assert content.truncated_tail and "unfinished last line" in content.bad_lines[0][1]

    with JsonlWriter(log) as writer:  # a resumed run appends
        writer.write({"step": 0, "run": "second"})
    content = read_jsonl(log)
    assert [r["step"] for r in content.records] == [0, 1, 0]
    assert content.records[-1]["run"] == "second"
    assert not content.truncated_tail and content.bad_lines[0][0] == 3
    assert json.loads(log.read_text().splitlines()[-1]) == {"step": 0, "run": "second"}


# --- on a GPU ------------------------------------------------------------------------------------


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
