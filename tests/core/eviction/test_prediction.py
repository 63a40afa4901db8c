"""Predicted eviction beside observed, per planned sequence length, in the summary and the report."""

from __future__ import annotations

from lightning_paged.commands.report import main as report_main
from lightning_paged.core.eviction.log import JsonlWriter
from lightning_paged.core.eviction.prediction import (
    PREDICTION_NAME,
    compare,
    comparison_for,
    read_prediction,
    write_prediction,
)
from lightning_paged.core.eviction.records import RECORD_FIELDS, StepRecord

MIB = 1 << 20
POINTS = [
    {"seq_len": 512, "peak_bytes": 10 * MIB, "evicted_bytes": 0},
    {"seq_len": 1024, "peak_bytes": 20 * MIB, "evicted_bytes": 4 * MIB},
    {"seq_len": 2048, "peak_bytes": 40 * MIB, "evicted_bytes": 24 * MIB},
]


def record(step: int, seq_len: int, evicted: int | None, run: str = "r1") -> StepRecord:
    return StepRecord(
        step=step,
        seq_len=seq_len,
        longest_example=None,
        tokens=seq_len,
        long_sequence=seq_len > 1024,
        evicted_bytes=evicted,
        paged_in_bytes=evicted,
        gpu_page_faults=None,
        thrashing_events=None,
        optimizer_step_s=0.1,
        step_s=0.2,
        device_free_bytes=None,
        alloc_retries=0,
        ooms=0,
        paged_bytes_total=30 * MIB,
        source="cupti",
        estimated=False,
        rank=0,
        run=run,
        paged_capacity_bytes=None,
    )


STEPS = [
    record(0, 300, 0),
    record(1, 512, 0),
    record(2, 900, 2 * MIB),
    record(3, 2000, 20 * MIB),
    record(4, 1900, 22 * MIB),
]


def test_steps_go_to_the_shortest_planned_length_at_or_above_their_own():
    groups = compare(STEPS, POINTS)
    assert [(g.seq_len, g.steps, g.predicted_bytes) for g in groups] == [
        (512, 2, 0),
        (1024, 1, 4 * MIB),
        (2048, 2, 24 * MIB),
    ]
    assert groups[2].observed_mean == 21 * MIB and groups[2].observed_most == 22 * MIB
    unmeasured = compare([record(0, 600, None)], POINTS)
    assert unmeasured[1].steps == 1 and unmeasured[1].observed_mean is None


def test_the_report_shows_the_prediction_written_beside_its_log(tmp_path, capsys):
    log = tmp_path / "eviction_events.jsonl"
    writer = JsonlWriter(log)
    for r in [record(9, 100, 0, run="old"), *STEPS]:
        writer.write({name: getattr(r, name) for name in RECORD_FIELDS})
    writer.close()
    assert comparison_for(log) is None  # no plan written for this run
    write_prediction(tmp_path, POINTS, 64 * MIB)
    assert (tmp_path / PREDICTION_NAME).is_file() and read_prediction(log) == POINTS
    table = comparison_for(log)
    assert table is not None and "predicted by the memory plan" in table
    assert report_main([str(log)]) == 0
    out = capsys.readouterr().out
    assert "seq_len <=" in out and "24.0 MiB" in out and "21.0 MiB" in out
