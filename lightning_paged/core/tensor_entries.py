"""The tensors of a merge's input, read from their files' headers: where each is and what it is written as.

:mod:`~lightning_paged.core.export` merges onto them; :mod:`~lightning_paged.core.export_4bit` gives
a pre-quantized base's packed weights as entries that dequantize when read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TensorEntry:
    """One tensor of a merge's input, from its file's header: where it is and what it will be written as."""

    name: str
    shard: Path
    dtype: str
    """Its safetensors dtype name (``BF16``)."""
    shape: list[int]
    nbytes: int
    read: Callable[[], torch.Tensor] | None = None
    """How to read it when it is not stored as it is written (a dequantized 4-bit weight)."""


def tensor_entries(shard: Path) -> list[TensorEntry]:
    """Every tensor of a safetensors file, from its header, by name."""
    with open(shard, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    entries = [
        TensorEntry(
            name, shard, info["dtype"], list(info["shape"]), info["data_offsets"][1] - info["data_offsets"][0]
        )
        for name, info in header.items()
    ]
    return sorted(entries, key=lambda e: e.name)
