"""Reading samples: JSON, JSON Lines, CSV, Parquet, or a ``datasets`` ``save_to_disk`` directory.

Framework-free. Each sample comes with where it is in the file (``line 3``, ``item 2``, ``row 5``),
so a bad sample can be named. CSV (``.csv``, ``.tsv``), Parquet (``.parquet``) and ``save_to_disk``
directories are read through Hugging Face ``datasets`` (its packaged ``csv`` and ``parquet``
builders, into a temporary cache that is removed afterwards; nothing comes from a hub). JSON and
JSON Lines are parsed here, sample by sample: a syntax error is named by its line and column, and
samples of different formats can share one file, which ``datasets``' JSON builder (one Arrow
schema per file) refuses when a field is a string in one sample and a list in another.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lightning_paged.core.errors import SettingError

TABULAR = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
"""File suffixes read through a ``datasets`` builder, and the builder."""
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
"""The file kinds a data path may be (any other suffix is read as JSON, then as JSON Lines)."""


def read_records(data_path: str, setting: str = "data_path") -> list[tuple[Any, str]]:
    """The samples of a data file or ``save_to_disk`` directory, each with where it is (for messages).

    Raises :class:`SettingError` naming ``setting`` for a file that cannot be read, with the line
    and column of a JSON syntax error.
    """
    path = Path(data_path).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, data_path, setting)
    if path.suffix.lower() in TABULAR:
        return _read_tabular(path, data_path, setting)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SettingError(
            setting,
            data_path,
            f"is not JSON or JSON Lines text (not UTF-8 at byte {err.start}); CSV and Parquet files need "
            "a .csv, .tsv or .parquet suffix",
        ) from err
    if not text.strip():
        raise SettingError(setting, data_path, "is empty; it needs at least one sample")
    records: list[tuple[Any, str]]
    if path.suffix != ".jsonl":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            if not (err.msg == "Extra data" and text.lstrip().startswith("{")):
                raise _syntax_error(data_path, setting, err.lineno, err.colno, err.msg) from err
        else:
            if isinstance(document, dict):
                document = [document]
            if not isinstance(document, list):
                raise SettingError(
                    setting, data_path, f"holds a JSON {type(document).__name__}, not a list of samples"
                )
            records = [(sample, f"item {i + 1}") for i, sample in enumerate(document)]
            if not records:
                raise SettingError(setting, data_path, "holds an empty list; it needs at least one sample")
            return records
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"line {lineno}"))
        except json.JSONDecodeError as err:
            raise _syntax_error(data_path, setting, lineno, err.colno, err.msg) from err
    return records


def _syntax_error(data_path: str, setting: str, line: int, column: int, message: str) -> SettingError:
    return SettingError(
        setting,
        data_path,
        f"is not valid JSON or JSON Lines: {message} at line {line}, column {column} (CSV and Parquet "
        "files need a .csv, .tsv or .parquet suffix)",
    )


def _read_tabular(path: Path, data_path: str, setting: str) -> list[tuple[Any, str]]:
    """Rows of a CSV or Parquet file through ``datasets``' packaged builder (its first line: the column names)."""
    import datasets

    builder = TABULAR[path.suffix.lower()]
    options: dict[str, Any] = {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}
    if not path.is_file():
        raise SettingError(setting, data_path, "is not a file")
    from datasets.utils import logging as datasets_logging

    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its reader logs an error we tell in one line
    with tempfile.TemporaryDirectory(prefix="lightning-paged-data-") as cache:
        try:
            loaded = datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
                **options,
            )
        except Exception as err:  # pandas, pyarrow and datasets each raise their own kinds
            if "corresponds to no data" in str(err):  # datasets' word for a file of no rows
                raise SettingError(setting, data_path, "holds no rows; it needs at least one sample") from err
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            kind = "CSV" if builder == "csv" else "Parquet"
            raise SettingError(setting, data_path, f"cannot be read as {kind}: {reason}") from err
        finally:
            datasets_logging.set_verbosity(verbosity)
        records = [(row, f"row {i + 1}") for i, row in enumerate(loaded)]
    if not records:
        raise SettingError(setting, data_path, "holds no rows; it needs at least one sample")
    return records


def _read_saved_dataset(path: Path, data_path: str, setting: str) -> list[tuple[Any, str]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise SettingError(
            setting, data_path, "is a directory but not one written by datasets' save_to_disk"
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise SettingError(setting, data_path, f"has no 'train' split (splits: {', '.join(loaded)})")
        loaded = loaded["train"]
    records = [(row, f"row {i + 1}") for i, row in enumerate(loaded)]
    if not records:
        raise SettingError(setting, data_path, "holds no samples")
    return records
