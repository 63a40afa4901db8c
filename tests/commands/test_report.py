"""``lightning-paged report``: plots and summary from an event log, and clear failures on bad input."""

from __future__ import annotations

import sys

import pytest

from lightning_paged.commands.report import main
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.records import StepCounters
from lightning_paged.core.eviction.sources.base import EventSource

MIB = 1024 * 1024
RAMP = [128, 256, 512, 1024, 2048, 4096, 2048, 512, 256, 4096, 128, 1024]


class RampSource(EventSource):
    """Evicts in proportion to how far a step's length exceeds 1024 tokens."""

    name = "cupti"

    def __init__(self) -> None:
        self.lengths: list[int] = []

    def end_step(self, step: int) -> StepCounters:
        over = max(0, self.lengths[step] - 1024)
        return StepCounters(
            evicted_bytes=over * 64 * 1024, paged_in_bytes=over * 48 * 1024, gpu_page_faults=0
        )


def write_log(path, lengths=RAMP):
    source = RampSource()
    source.lengths = list(lengths)
    clock = {"t": 0.0}
    recorder = EvictionRecorder(
        source, path, long_sequence_threshold=2048, paged_bytes=lambda: 0, clock=lambda: clock["t"]
    )
    for n in lengths:
        recorder.begin_step(seq_len=n, tokens=n, longest_example=n)
        clock["t"] += 0.05 + n / 10_000
        recorder.begin_optimizer_step()
        clock["t"] += 0.02 + (max(0, n - 1024) / 20_000)
        recorder.end_step()
    recorder.close()
    return path


def test_report_writes_a_png_and_prints_the_summary(tmp_path, capsys):
    log = write_log(tmp_path / "eviction_events.jsonl")
    out = tmp_path / "report.png"
    assert main([str(log), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000  # three panels drawn, not an empty canvas
    printed = capsys.readouterr().out
    assert "Eviction summary, rank 0, source: cupti" in printed
    assert "long-sequence steps       4" in printed and "512.0 MiB (512.0 MiB on long" in printed
    assert "slowest steps" in printed and "   4096 " in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_report_html_is_one_self_contained_page(tmp_path):
    log = write_log(tmp_path / "events.jsonl")
    out = tmp_path / "report.html"
    assert main([str(log), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<img" in page and "data:image/png;base64," in page
    assert "Eviction summary" in page and "http" not in page.replace("<!DOCTYPE html>", "")


def test_missing_log_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "report.png"
    assert main([str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_a_file_that_is_not_an_event_log_is_refused(tmp_path, capsys):
    not_jsonl = tmp_path / "notes.txt"
    not_jsonl.write_text("step,seq_len\n0,128\n")
    out = tmp_path / "report.png"
    assert main([str(not_jsonl), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds no eviction records" in err and "line 1" in err
    assert not out.exists()

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main([str(binary)]) == 2
    assert "not a text file" in capsys.readouterr().err


def test_unknown_output_format_writes_nothing(tmp_path, capsys):
    log = write_log(tmp_path / "events.jsonl")
    out = tmp_path / "report.jpeg"
    assert main([str(log), "--out", str(out)]) == 2
    assert "--out must end with one of" in capsys.readouterr().err
    assert not out.exists()


def test_log_of_a_crashed_run_is_reported_with_the_unfinished_line(tmp_path, capsys):
    log = write_log(tmp_path / "events.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 12, "seq_len": 40')
    assert main([str(log)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 line(s)" in captured.err and "unfinished last line" in captured.err
    assert f"{len(RAMP)} steps" in captured.out


def test_runs_appended_to_one_log_are_told_apart(tmp_path, capsys):
    log = write_log(tmp_path / "events.jsonl", lengths=[100, 200, 300])
    write_log(log, lengths=[100] * 5)
    assert main([str(log), "--run", "0"]) == 0
    assert "(1 of 2), 3 steps" in capsys.readouterr().out
    assert main([str(log)]) == 0
    assert "(2 of 2), 5 steps" in capsys.readouterr().out
    assert main([str(log), "--run", "2"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_missing_matplotlib_says_what_to_install(tmp_path, capsys, monkeypatch):
    log = write_log(tmp_path / "events.jsonl")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "report.png"
    assert main([str(log), "--out", str(out)]) == 2
    assert "pip install lightning-paged[plot]" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".svg", ".pdf"])
def test_vector_formats(tmp_path, suffix):
    log = write_log(tmp_path / "events.jsonl")
    out = tmp_path / f"report{suffix}"
    assert main([str(log), "--out", str(out)]) == 0
    head = out.read_bytes()[:5]
    assert head == (b"%PDF-" if suffix == ".pdf" else b"<?xml")
