"""The prepared GPU validation: its part runner, budgets and failure recording, run on a CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_validate  # noqa: E402


def test_dry_run_records_each_outcome_and_runs_every_part(tmp_path, capsys):
    assert gpu_validate.main(["--dry-run", "--out-dir", str(tmp_path)]) == 1  # not every part passed
    summary = json.loads((tmp_path / "summary.json").read_text())["parts"]
    assert [(p["part"], p["status"]) for p in summary] == [
        ("ok", "passed"),
        ("fails", "failed"),
        ("crashes", "crashed"),
        ("slow", "timed_out"),
    ]
    by_part = {p["part"]: p for p in summary}
    assert json.loads((tmp_path / "ok.json").read_text())["value"] == 4
    assert "this part fails on purpose" in by_part["fails"]["headline"]
    assert "Traceback" in json.loads((tmp_path / "fails.json").read_text())["error"]
    assert "invalid configuration argument" in by_part["crashes"]["log_tail"]  # the process's last words
    assert by_part["slow"]["elapsed_s"] < 20  # killed at its 5 s budget, not left to sleep for 60
    assert (tmp_path / "slow.progress.jsonl").read_text().count("\n") == 1  # what it finished is kept
    table = (tmp_path / "summary.md").read_text()
    assert "| crashes |" in table and "timed_out" in table
    assert "| slow | a part over its budget | timed_out |" in capsys.readouterr().out


def test_the_parts_fit_ten_minutes_and_a_subset_can_be_chosen(capsys):
    parts = gpu_validate.PARTS
    assert list(parts) == list("abcdefg")
    assert sum(p.budget_s for p in parts.values()) <= 540  # room for start-up and the wheel install
    assert gpu_validate.main(["--plan", "--parts", "b,c"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "total 115 s at most"
    with pytest.raises(SystemExit, match="no part z"):
        gpu_validate.main(["--plan", "--parts", "b,z"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path, capsys):
    assert gpu_validate.main(["--out-dir", str(tmp_path / "gpu")]) == gpu_validate.EXIT_NO_GPU
    assert "needs a CUDA GPU and none is available here" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()


def test_cupti_python_must_match_the_cupti_runtime_torch_brought():
    # torch 2.11 pins nvidia-cuda-cupti==13.0.85.* (cuda-toolkit[cupti]==13.0.2)
    newest = gpu_validate.cupti_agreement("13.0.85", "nvidia-cuda-cupti~=13.4", "13.4.0")
    assert newest["agree"] is False and "cupti-python==13.0.*" in newest["advice"]
    assert gpu_validate.cupti_agreement("13.0.85", "nvidia-cuda-cupti~=13.0", "13.0.1") == {"agree": True}
    assert gpu_validate.cupti_agreement(None, None, None)["agree"] is None


def test_calibration_separates_short_from_long_steps():
    gib = 2**30
    free, state = 60 * gib, gib
    target, problem = gpu_validate._calibrated_ballast(free, 8 * gib, 2 * gib, state)
    assert (target, problem) == (8 * gib - state // 2, "")
    target, problem = gpu_validate._calibrated_ballast(free, 3 * gib, 3 * gib, state)
    assert target is None and "cannot separate" in problem
