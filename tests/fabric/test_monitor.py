"""The eviction monitor of a hand-written Fabric loop: the same JSONL records and summary as the callback."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.fabric import Fabric

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.fabric import LoopEvictionMonitor, fabric_eviction_monitor
from lightning_paged.testing import MIB, FakeProbe


def make_fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


def test_loop_monitor_writes_the_event_log_and_summary(tmp_path):
    lengths = [8, 40, 12, 48, 10]
    probe = FakeProbe()
    fabric = make_fabric()
    monitor = fabric_eviction_monitor(
        fabric, tmp_path, source="pressure", probe=probe, long_sequence_threshold=32
    )
    for n in lengths:
        batch = {"input_ids": torch.zeros(2, n, dtype=torch.long), "attention_mask": torch.ones(2, n)}
        with monitor.step(batch):
            if n >= 32:  # a long batch's activations push optimizer state out
                probe.evict(96 * MIB)
            with monitor.optimizer_step():
                if n >= 32:  # the optimizer touches its state again
                    probe.page_in(96 * MIB)
        assert monitor.metrics()["eviction/seq_len"] == n
    text = monitor.close()

    records = read_jsonl(tmp_path / "eviction_events.jsonl").records
    assert [r["seq_len"] for r in records] == lengths
    assert [r["long_sequence"] for r in records] == [n >= 32 for n in lengths]
    assert [r["evicted_bytes"] for r in records] == [96 * MIB if n >= 32 else 0 for n in lengths]
    assert all(r["source"] == "pressure" and r["estimated"] for r in records)
    assert (tmp_path / "eviction_summary.txt").read_text() == text + "\n"
    assert re.search(r"long-sequence steps +2\n", text)


def test_loop_monitor_settings_are_checked_by_name(tmp_path):
    with pytest.raises(SettingError, match="^source must be one of auto, cupti, pressure, none"):
        LoopEvictionMonitor(tmp_path, source="nvml")
    with pytest.raises(SettingError, match="^long_sequence_threshold must be a positive integer"):
        LoopEvictionMonitor(tmp_path, long_sequence_threshold=0)
    with pytest.raises(SettingError, match="^summary_top_k must be an integer >= 0"):
        LoopEvictionMonitor(tmp_path, summary_top_k=-1)
