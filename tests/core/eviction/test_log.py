"""The JSONL event log stays readable after a crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lightning_paged.core.eviction.log import JsonlWriter, read_jsonl

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
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
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
