"""Data files: JSON, JSON Lines, CSV, TSV, Parquet and save_to_disk directories, each sample with its place."""

from __future__ import annotations

import json

import pytest

from lightning_paged.core.data_files import read_records
from lightning_paged.core.errors import SettingError

ROWS = [
    {"instruction": "Reverse: abc", "input": "", "output": "cba"},
    {"instruction": "Uppercase, please", "input": "x, y", "output": "X, Y\nDONE"},
]


def plain(records) -> list:
    return [({k: v or "" for k, v in row.items()}, where) for row, where in records]


def test_every_file_kind_reads_the_same_samples(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_list(ROWS)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    dataset.to_csv(str(tmp_path / "d.tsv"), index=False, sep="\t")
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "splits"))
    expected = {"jsonl": "line", "json": "item", "csv": "row", "tsv": "row", "parquet": "row"}
    for suffix, unit in expected.items():
        records = read_records(str(tmp_path / f"d.{suffix}"))
        assert plain(records) == [(ROWS[0], f"{unit} 1"), (ROWS[1], f"{unit} 2")], suffix
    for name in ("saved", "splits"):
        assert plain(read_records(str(tmp_path / name))) == [(ROWS[0], "row 1"), (ROWS[1], "row 2")]


def test_parquet_keeps_nested_conversations(tmp_path):
    import datasets

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    assert read_records(str(tmp_path / "chat.parquet")) == [(rows[0], "row 1")]


def test_unreadable_files_are_one_line_errors_naming_the_setting(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SettingError) as info:
        read_records(str(tmp_path / "bad.parquet"), "val_path")
    assert str(info.value).startswith("val_path cannot be read as Parquet: ") and "\n" not in str(info.value)
    (tmp_path / "empty.csv").write_text("instruction,output\n")
    with pytest.raises(SettingError, match=r"^data_path holds no rows"):
        read_records(str(tmp_path / "empty.csv"))
    (tmp_path / "data.bin").write_bytes(b"\x80\x81")
    with pytest.raises(SettingError, match=r"not UTF-8 at byte 0\); CSV and Parquet files need a .csv"):
        read_records(str(tmp_path / "data.bin"))
    (tmp_path / "notsaved").mkdir()
    with pytest.raises(SettingError, match=r"is a directory but not one written by datasets' save_to_disk"):
        read_records(str(tmp_path / "notsaved"))
