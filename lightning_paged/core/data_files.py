"""Reading instruction samples: a JSON or JSON Lines file, or a ``datasets`` ``save_to_disk`` directory.

Framework-free. Each sample comes with where it is in the file (``line 3``, ``item 2``, ``row 5``),
so a bad sample can be named; a file that is not valid JSON is refused with its line and column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_paged.core.errors import SettingError


def read_records(data_path: str) -> list[tuple[Any, str]]:
    """The samples of a JSON, JSON Lines or ``save_to_disk`` dataset, each with where it is (for messages).

    Raises :class:`SettingError` naming ``data_path`` with the line and column of a syntax error.
    """
    path = Path(data_path).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, data_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SettingError(
            "data_path", data_path, f"is not JSON or JSON Lines text (not UTF-8 at byte {err.start})"
        ) from err
    if not text.strip():
        raise SettingError("data_path", data_path, "is empty; it needs at least one sample")
    records: list[tuple[Any, str]]
    if path.suffix != ".jsonl":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            if not (err.msg == "Extra data" and text.lstrip().startswith("{")):
                raise _syntax_error(data_path, err.lineno, err.colno, err.msg) from err
        else:
            if isinstance(document, dict):
                document = [document]
            if not isinstance(document, list):
                raise SettingError(
                    "data_path", data_path, f"holds a JSON {type(document).__name__}, not a list of samples"
                )
            records = [(sample, f"item {i + 1}") for i, sample in enumerate(document)]
            if not records:
                raise SettingError(
                    "data_path", data_path, "holds an empty list; it needs at least one sample"
                )
            return records
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"line {lineno}"))
        except json.JSONDecodeError as err:
            raise _syntax_error(data_path, lineno, err.colno, err.msg) from err
    return records


def _syntax_error(data_path: str, line: int, column: int, message: str) -> SettingError:
    return SettingError(
        "data_path",
        data_path,
        f"is not valid JSON or JSON Lines: {message} at line {line}, column {column}",
    )


def _read_saved_dataset(path: Path, data_path: str) -> list[tuple[Any, str]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise SettingError(
            "data_path", data_path, "is a directory but not one written by datasets' save_to_disk"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SettingError("data_path", data_path, f"has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    records = [(row, f"row {i + 1}") for i, row in enumerate(loaded)]
    if not records:
        raise SettingError("data_path", data_path, "holds no samples")
    return records
