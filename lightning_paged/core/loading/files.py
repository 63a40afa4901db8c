"""The weight files of a model directory, read from their headers: which tensor lives where.

safetensors files (single or sharded with ``model.safetensors.index.json``) are read; without them,
PyTorch ``.bin`` files (``pytorch_model.bin``, or sharded with ``pytorch_model.bin.index.json``) in
the zip format torch has written since 1.6, opened with ``torch.load(mmap=True, weights_only=True)``:
their tensors are mapped, not read, and each is read from the file when it is used, as a
safetensors tensor is. Only the legacy pre-zip ``.bin`` format, which cannot be mapped, is refused
with a command that converts it. Every file is opened once, up front, so a missing shard or a
truncated file is reported before anything is placed on a device.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_paged.core.errors import BadInput

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
NOT_WEIGHTS = ("training_args.bin",)
"""``.bin`` files transformers writes beside a model that hold no weights."""
SHOWN = 5
"""How many names an error lists before it says how many more there are."""

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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


class WeightLoadError(BadInput, ValueError):
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
    """The weight files of ``directory`` (safetensors, else PyTorch ``.bin``), checked to exist."""
    directory = Path(directory)
    for index_name, single_name, pattern in (
        (INDEX_NAME, SINGLE_NAME, "*.safetensors"),
        (BIN_INDEX_NAME, BIN_SINGLE_NAME, "*.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            return _indexed_files(directory, index)
        if (directory / single_name).is_file():
            return [directory / single_name]
        files = sorted(p for p in directory.glob(pattern) if p.is_file() and p.name not in NOT_WEIGHTS)
        if files:
            return files
    raise WeightLoadError(
        f"{directory} holds no model weights (*.safetensors or *.bin); give the directory of a saved "
        "transformers model"
    )


def _indexed_files(directory: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightLoadError(
            f"{index} is not a weight index (a JSON object with a 'weight_map'): {err}. "
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


@dataclass(frozen=True)
class Entry:
    """One tensor of a weight file, from its header."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class WeightFiles:
    """The tensors of a model directory's weight files, by key; read one at a time.

    Use as a context manager: the files stay open (memory-mapped: their pages are the page cache's,
    not this process's anonymous memory) until it exits.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files = find_weight_files(self.directory)
        self.entries: dict[str, Entry] = {}
        self._handles: dict[Path, Any] = {}
        try:
            for path in self.files:
                self._handles[path] = handle = (
                    _open_bin(path) if path.suffix == ".bin" else _open_safetensors(path)
                )
                for key, (shape, dtype) in handle.headers().items():
                    if not isinstance(dtype, torch.dtype) or dtype not in SAFETENSORS_DTYPES.values():
                        raise WeightLoadError(
                            f"{path}: tensor {key} has dtype {dtype}, which cannot be loaded "
                            f"(supported: {', '.join(str(d).removeprefix('torch.') for d in SAFETENSORS_DTYPES.values())})"
                        )
                    self.entries[key] = Entry(key, path, shape, dtype)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WeightFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` from its file, on the host.

        A ``.bin`` file's tensor is returned as mapped (its pages are the file's until copied or cast),
        which keeps a ``.bin`` load's anonymous memory within that of the same model's safetensors.
        """
        entry = self.entries[key]
        try:
            return self._handles[entry.file].get_tensor(key)
        except Exception as err:
            raise WeightLoadError(f"{entry.file}: tensor {key} cannot be read ({err})") from None

    def read_slice(self, key: str, index: int) -> torch.Tensor:
        """``tensor[index]`` of the tensor ``key`` (one expert of a stacked tensor), reading only that part."""
        entry = self.entries[key]
        try:
            return self._handles[entry.file].get_row(key, index)
        except Exception as err:
            raise WeightLoadError(f"{entry.file}: tensor {key}[{index}] cannot be read ({err})") from None

    def where(self, key: str) -> str:
        """``<file name>: tensor <key>``, for messages."""
        entry = self.entries.get(key)
        return f"{entry.file.name}: tensor {key}" if entry is not None else f"tensor {key}"


class _Safetensors:
    """One safetensors file, open and mapped."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def headers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        result: dict[str, tuple[tuple[int, ...], torch.dtype | str]] = {}
        for key in self.handle.keys():  # noqa: SIM118  (safe_open is not iterable)
            piece = self.handle.get_slice(key)
            result[key] = (
                tuple(piece.get_shape()),
                SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype()),
            )
        return result

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        return self.handle.get_slice(key)[index]


def _open_safetensors(path: Path) -> _Safetensors:
    from safetensors import safe_open

    try:
        return _Safetensors(safe_open(str(path), framework="pt"))
    except Exception as err:  # safetensors raises its own SafetensorError (an Exception)
        raise WeightLoadError(
            f"{path} cannot be read as safetensors ({err}); it is truncated or damaged: copy or download it again"
        ) from None


class _PickledTensors:
    """One zip-format ``.bin`` file, loaded with its tensors memory-mapped."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def headers(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
        return {key: (tuple(t.shape), t.dtype) for key, t in self.tensors.items()}

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def get_row(self, key: str, index: int) -> torch.Tensor:
        return self.tensors[key][index]  # still mapped, as get_tensor's


def _open_bin(path: Path) -> _PickledTensors:
    with open(path, "rb") as file:
        start = file.read(4)
    if start[:1] == b"\x80":  # a pickle stream: torch.save's format before the zip archive (torch 1.6)
        raise WeightLoadError(
            f"{path} is a PyTorch .bin file in the legacy format written before torch 1.6 (not a zip archive), "
            f"which cannot be memory-mapped. Convert the model once: {convert_command(path.parent)}"
        )
    try:
        tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightLoadError(
            f"{path} cannot be read as a PyTorch weight file ({text}); it is truncated, damaged or holds more "
            "than tensors: copy or download it again"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise WeightLoadError(f"{path} holds a {type(tensors).__name__}, not a state dict of named tensors")
    return _PickledTensors(tensors)


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
