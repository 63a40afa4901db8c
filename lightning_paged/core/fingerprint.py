"""What an adapter was trained on: a fingerprint of the base model plus the quantization and LoRA settings.

An adapter only means something on the base weights it was trained against, quantized the way they
were. The base is identified by the sha256 of its weight files when it was loaded from a directory
(streamed, and cached by path, size and modification time, so checking it again is nearly free), or
by the sha256 of its tensors, taken before quantization, when it was built from a config.
:func:`describe_differences` says exactly what differs between two fingerprints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_paged.core.atomic import atomic_write
from lightning_paged.core.errors import BadInput, MissingFileError
from lightning_paged.core.qlora_config import QLoRAConfig

SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(QLoRAConfig) if f.metadata.get("fingerprint"))
"""The QLoRA settings that change what the adapter weights mean: those marked on :class:`QLoRAConfig`.
``lora_dropout``, ``quant_storage``, ``gradient_checkpointing`` and ``offload_activations`` do not, and may
change between runs."""

_CHUNK = 8 * 1024 * 1024


class CheckpointMismatchError(BadInput, RuntimeError):
    """A checkpoint was written for another base model or with other settings."""


@dataclass(frozen=True)
class BaseFingerprint:
    """Identity of a base model's weights."""

    kind: Literal["files", "tensors"]
    """``"files"``: hashes of the weight files of a model directory; ``"tensors"``: hash of the tensors."""
    sha256: str
    """One digest over everything below."""
    source: str
    """The model directory, or a short description of a model built from a config."""
    files: dict[str, str] = field(default_factory=dict)
    """Weight file name to its sha256 (``kind="files"`` only)."""

    def describe(self) -> str:
        if self.kind == "files":
            return f"loaded from {self.source} (weights sha256 {self.sha256[:12]})"
        return f"built from a config ({self.source}, weights sha256 {self.sha256[:12]})"


@dataclass(frozen=True)
class Fingerprint:
    """The base model and the settings an adapter was trained with; stored in every checkpoint."""

    base: BaseFingerprint
    settings: dict[str, Any]
    """The values of :data:`SETTINGS`."""

    def to_dict(self) -> dict[str, Any]:
        return {"base": asdict(self.base), "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fingerprint:
        return cls(base=BaseFingerprint(**data["base"]), settings=dict(data["settings"]))


def settings_of(config: Any) -> dict[str, Any]:
    """The fingerprinted settings of a :class:`~lightning_paged.core.qlora.QLoRAConfig` (or a mapping)."""
    values = config if isinstance(config, Mapping) else asdict(config)
    return {name: _plain(values[name]) for name in SETTINGS if name in values}


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    return value


def fingerprint(model: nn.Module, config: Any) -> Fingerprint:
    """The fingerprint of ``model`` (call it before quantizing) trained with QLoRA settings ``config``."""
    return Fingerprint(base=base_fingerprint(model), settings=settings_of(config))


def base_fingerprint(model: nn.Module) -> BaseFingerprint:
    """Weight files of the model's directory when it was loaded from one, else its tensors."""
    directory = model_directory(model)
    if directory is not None:
        return files_fingerprint(directory)
    return tensors_fingerprint(model)


def model_directory(model: nn.Module) -> Path | None:
    """The local directory a transformers model was loaded from, when it still holds weight files."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "name_or_path", None
    )
    if not name or not isinstance(name, (str, os.PathLike)):
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() and weight_files(path) else None


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The weight files of a transformers model directory: safetensors, else PyTorch ``.bin`` files."""
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        files = sorted(p for p in directory.glob("*.bin") if p.is_file() and p.name != "training_args.bin")
    return files


def files_fingerprint(
    directory: str | os.PathLike,
    cache_file: Path | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> BaseFingerprint:
    """sha256 of each weight file of ``directory`` (cached) and one digest over them all.

    ``on_bytes(n)`` is called as files are read (cached files count at once), for a progress bar.
    """
    directory = Path(directory).expanduser().resolve()
    files = weight_files(directory)
    if not files:
        raise MissingFileError(
            f"{directory} holds no model weights (*.safetensors or *.bin); give the directory of a saved "
            "transformers model"
        )
    cache = _HashCache(cache_file or default_cache_file())
    digests = {path.name: cache.sha256(path, on_bytes) for path in files}
    cache.save()
    overall = hashlib.sha256()
    for name, digest in sorted(digests.items()):
        overall.update(f"{name}\0{digest}\n".encode())
    return BaseFingerprint(kind="files", sha256=overall.hexdigest(), source=str(directory), files=digests)


def tensors_fingerprint(model: nn.Module) -> BaseFingerprint:
    """sha256 over the names, dtypes, shapes and bytes of every tensor in ``model.state_dict()``."""
    digest = hashlib.sha256()
    state = model.state_dict()
    count = 0
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        if tensor.device.type != "meta":
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(data.numpy().data)  # the buffer itself: no copy of the bytes
        count += 1
    return BaseFingerprint(
        kind="tensors", sha256=digest.hexdigest(), source=f"{type(model).__name__}, {count} tensors"
    )


def describe_differences(
    saved: Fingerprint, current: Fingerprint, where: str = "", now: str = "now"
) -> list[str]:
    """What differs between the fingerprint in a checkpoint and the current one, one phrase each.

    ``where`` prefixes setting names with their location in the user's config
    (``trainer.strategy.init_args.``); ``now`` says where the current values come from.
    """
    differences = []
    if saved.base.sha256 != current.base.sha256:
        differences.append(
            f"another base model (in the checkpoint: {saved.base.describe()}; {now}: {current.base.describe()}"
            f"{_base_hint(saved.base, current.base)})"
        )
    for name in sorted(set(saved.settings) | set(current.settings)):
        before, after = saved.settings.get(name), current.settings.get(name)
        if before != after:
            differences.append(f"another {where}{name} ({before!r} in the checkpoint, {after!r} {now})")
    return differences


def mismatch_error(differences: Iterable[str], advice: str) -> CheckpointMismatchError:
    """The refusal to use a checkpoint, naming what differs and what to do."""
    return CheckpointMismatchError(
        "The checkpoint does not fit this model: it was written with "
        + " and ".join(differences)
        + f". {advice}"
    )


def _base_hint(saved: BaseFingerprint, current: BaseFingerprint) -> str:
    if saved.kind == current.kind == "tensors":
        return "; the weights built from the config differ: another model_config or seed_everything?"
    if saved.kind != "files" or current.kind != "files":
        return ""
    changed = sorted(n for n in set(saved.files) & set(current.files) if saved.files[n] != current.files[n])
    missing = sorted(set(saved.files) - set(current.files))
    extra = sorted(set(current.files) - set(saved.files))
    parts = []
    if changed:
        parts.append("different content: " + ", ".join(changed))
    if missing:
        parts.append("missing now: " + ", ".join(missing))
    if extra:
        parts.append("new: " + ", ".join(extra))
    return "; weight files with " + "; ".join(parts) if parts else ""


def default_cache_file() -> Path:
    """``$LIGHTNING_PAGED_CACHE_DIR/file_hashes.json``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("LIGHTNING_PAGED_CACHE_DIR")
    if root is None:
        root = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightning_paged"
        )
    return Path(root) / "file_hashes.json"


class _HashCache:
    """sha256 of files keyed by (absolute path, size, modification time in ns), kept in a JSON file.

    A file rewritten in place gets a new size or modification time and is hashed again. A cache that
    cannot be read or written is ignored: the digests are then recomputed each time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self.changed = False
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self.entries = {k: v for k, v in loaded.items() if isinstance(v, str)}
        except (OSError, ValueError):
            pass

    def sha256(self, file: Path, on_bytes: Callable[[int], None] | None = None) -> str:
        stat = file.stat()
        where = f"{file.resolve()}|"
        key = f"{where}{stat.st_size}|{stat.st_mtime_ns}"
        digest = self.entries.get(key)
        if digest is None:
            digest = file_sha256(file, on_bytes)
            for stale in [k for k in self.entries if k.startswith(where)]:
                del self.entries[stale]
            self.entries[key] = digest
            self.changed = True
        elif on_bytes is not None:
            on_bytes(stat.st_size)
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        text = json.dumps(self.entries, indent=0, sort_keys=True)
        with contextlib.suppress(OSError):  # a read-only cache directory only costs re-hashing
            atomic_write(self.path, lambda f: f.write(text.encode()))
        self.changed = False


def file_sha256(path: str | os.PathLike, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return digest.hexdigest()
