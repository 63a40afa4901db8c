"""Byte counts for people: one formatter for every message and table, and the size parser of the CLI."""

from __future__ import annotations

import re

from lightning_paged.core.errors import SettingError


def format_bytes(n: float | None) -> str:
    """``n`` bytes in the largest binary unit up to GiB (``"12 B"``, ``"3.5 MiB"``); ``"n/a"`` for None."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", flags=re.IGNORECASE)
_POWERS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_POWERS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, setting: str = "--max-shard-size") -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a number of bytes; a bad size names ``setting``."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise SettingError(setting, text, "must be a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    size = int(number * _POWERS[unit])
    if size <= 0:
        raise SettingError(setting, text, "must be positive")
    return size
