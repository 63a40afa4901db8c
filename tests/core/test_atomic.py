"""Files and directories that appear complete or not at all."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import failing_torch_save

from lightning_paged.core.atomic import read_checkpoint, save_checkpoint_file, staged_directory


def test_a_staged_directory_is_published_whole_and_a_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with staged_directory(out) as staging:
        (staging / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(RuntimeError), staged_directory(tmp_path / "failed") as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_directory_is_replaced_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), staged_directory(out):
        pass
    assert (out / "old.txt").exists()
    with staged_directory(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or replaced copy left


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    save_checkpoint_file({"step": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", failing_torch_save(torch.save))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint_file({"step": 2, "w": torch.zeros(1000)}, path)
    assert os.listdir(tmp_path) == ["model.ckpt"]  # no partial file left behind
    assert read_checkpoint(path)["step"] == 1
