"""The weight files of a model directory, read from their headers: which tensor lives where.

Only safetensors are read (single file or sharded with ``model.safetensors.index.json``). Every file
is opened once, up front, so a missing shard or a truncated file is reported before anything is
placed on a device. Tensors are then read one at a time from the memory-mapped files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHOWN = 5
"""How many names an error lists before it says how many more there are."""

_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


class WeightLoadError(ValueError):
    """A model directory's weights cannot be loaded: the message names the file and tensor and what to do."""


def listing(names: Sequence[str]) -> str:
    """Up to :data:`SHOWN` names, and how many more."""
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def convert_command(directory: Path) -> str:
    """A one-line command that rewrites a ``.bin`` model directory as safetensors next to it."""
    out = directory.with_name(directory.name + "-safetensors")
    return (
        'python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; '
        f"M.from_pretrained('{directory}').save_pretrained('{out}'); "
        f"T.from_pretrained('{directory}').save_pretrained('{out}')\""
    )


def find_weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of ``directory``, checked to exist; a clear error otherwise."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise WeightLoadError(
                f"{index} is not a safetensors index (a JSON object with a 'weight_map'): {err}. "
                "Save the model again with save_pretrained"
            ) from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            first = sorted(k for k, v in weight_map.items() if v == missing[0])
            raise WeightLoadError(
                f"{index} lists shards that are not in {directory}: {listing(missing)} "
                f"({missing[0]} holds {listing(first)}). Copy or download the missing shards again"
            )
        return [directory / n for n in names]
    if (directory / SINGLE_NAME).is_file():
        return [directory / SINGLE_NAME]
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if files:
        return files
    pickled = sorted(p.name for p in directory.glob("*.bin") if p.name != "training_args.bin")
    if pickled:
        raise WeightLoadError(
            f"{directory} holds PyTorch .bin weights only ({listing(pickled)}); weights are streamed from "
            f"safetensors files. Convert them once: {convert_command(directory)}"
        )
    raise WeightLoadError(
        f"{directory} holds no model weights (*.safetensors); give the directory of a saved transformers model"
    )


@dataclass(frozen=True)
class Entry:
    """One tensor of a weight file, from its header."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class WeightFiles:
    """The tensors of a model directory's safetensors files, by key; read one at a time.

    Use as a context manager: the files stay open (memory-mapped: their pages are the page cache's,
    not this process's anonymous memory) until it exits.
    """

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.directory = Path(directory)
        self.files = find_weight_files(self.directory)
        self.entries: dict[str, Entry] = {}
        self._handles: dict[Path, Any] = {}
        for path in self.files:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
                self.close()
                raise WeightLoadError(
                    f"{path} cannot be read as safetensors ({err}); it is truncated or damaged: "
                    "copy or download it again"
                ) from None
            self._handles[path] = handle
            for key in handle.keys():  # noqa: SIM118  (safe_open is not iterable)
                piece = handle.get_slice(key)
                dtype = _DTYPES.get(piece.get_dtype())
                if dtype is None:
                    self.close()
                    raise WeightLoadError(
                        f"{path}: tensor {key} has dtype {piece.get_dtype()}, which cannot be loaded "
                        f"(supported: {', '.join(_DTYPES)})"
                    )
                self.entries[key] = Entry(key, path, tuple(piece.get_shape()), dtype)
        self.metadata = {path: self._handles[path].metadata() or {} for path in self.files}

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` from its file, on the host."""
        entry = self.entries[key]
        try:
            return self._handles[entry.file].get_tensor(key)
        except Exception as err:
            raise WeightLoadError(f"{entry.file}: tensor {key} cannot be read ({err})") from None

    def where(self, key: str) -> str:
        """``<file name>: tensor <key>``, for messages."""
        entry = self.entries.get(key)
        return f"{entry.file.name}: tensor {key}" if entry is not None else f"tensor {key}"


def file_key_for(name: str, file_keys: Iterable[str] | set[str], prefix: str) -> str | None:
    """The checkpoint key of the model's ``name``: as it is, without ``prefix.`` or with it; None if absent.

    transformers saves a causal LM's keys with its base model's prefix (``model.layers.0...``); a
    checkpoint of the bare base model has none (``layers.0...``).
    """
    keys = file_keys if isinstance(file_keys, set) else set(file_keys)
    candidates = [name]
    if prefix:
        if name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        else:
            candidates.append(f"{prefix}.{name}")
    return next((c for c in candidates if c in keys), None)


def ignored(name: str, patterns: Iterable[str] | None) -> bool:
    """Whether ``name`` matches one of a transformers model's ``_keys_to_ignore_on_load_*`` patterns."""
    return any(re.search(p, name) for p in patterns or ())
