"""The recorder: one record per step from its source, into the log and the summary."""

from __future__ import annotations

import pytest
import torch

from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.core.eviction.recorder import NO_PAGED_STATE, EvictionRecorder
from lightning_paged.core.eviction.records import RECORD_FIELDS, StepCounters
from lightning_paged.core.eviction.sources import (
    EventSource,
)
from lightning_paged.testing import GIB, MIB


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


def test_no_paged_state_is_pointed_out_once_when_a_source_could_see_evictions():
    notes: list[str] = []
    recorder = EvictionRecorder(ScriptedSource({}), paged_bytes=lambda: 0, notify=notes.append)
    for _ in range(3):
        recorder.begin_step(seq_len=8)
        recorder.begin_optimizer_step()
        recorder.end_step()
    assert notes == [NO_PAGED_STATE]


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


def test_a_step_that_raises_is_not_recorded():
    recorder = EvictionRecorder(ScriptedSource({}), paged_bytes=lambda: 0)
    with pytest.raises(RuntimeError, match="boom"), recorder.step(seq_len=8):
        raise RuntimeError("boom")
    with recorder.step(seq_len=16):
        pass
    assert recorder.steps == 1 and recorder.last_record is not None and recorder.last_record.seq_len == 16
