"""The JSONL event log: one record per line, every complete line valid even after a crash.

Each record goes out as one ``write`` of the whole line, newline included, followed by a flush, so
a process killed at any moment leaves at most its last line unfinished. When a log is opened for
appending and its last line has no newline (an earlier run died mid-write), a newline is added
first, so the fragment stays on a line of its own instead of spoiling the next record. The reader
skips such fragments and reports them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class JsonlWriter:
    """Appends JSON objects to ``path``, one line each, flushed as written (``fsync=True`` also syncs)."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._file: IO[str] | None = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115
        self._repair_tail()

    def _repair_tail(self) -> None:
        f = self._file
        assert f is not None
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        with open(self.path, "rb") as raw:
            raw.seek(size - 1)
            last = raw.read(1)
        if last != b"\n":
            f.write("\n")
            f.flush()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        self._file.write(line)
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class JsonlContent:
    """What :func:`read_jsonl` found."""

    records: list[dict[str, Any]] = field(default_factory=list)
    """The valid lines, as dicts, in file order."""
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    """``(line number, problem)`` for each line that is not a JSON object (1-based)."""
    truncated_tail: bool = False
    """True when the last line is unfinished (no newline and not valid JSON): a writer was killed."""


def read_jsonl(path: str | os.PathLike[str]) -> JsonlContent:
    """Read an event log, skipping and reporting lines that are not complete JSON objects.

    Raises ``FileNotFoundError`` when the file is missing and ``ValueError`` when it is not text.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a text file ({err.reason} at byte {err.start})") from None
    content = JsonlContent()
    lines = text.split("\n")
    ends_open = not text.endswith("\n") and text != ""
    if not ends_open:
        lines = lines[:-1]  # the empty string after the final newline
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if ends_open and number == len(lines):
                content.truncated_tail = True
                content.bad_lines.append((number, "unfinished last line (the writer was stopped mid-line)"))
            else:
                content.bad_lines.append((number, f"not JSON ({err.msg})"))
            continue
        if not isinstance(value, dict):
            content.bad_lines.append((number, f"a JSON {type(value).__name__}, not an object"))
            continue
        content.records.append(value)
    return content
