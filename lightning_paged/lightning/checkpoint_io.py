"""``AtomicCheckpointIO``: Lightning checkpoints written atomically and durably, read with clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

from lightning_paged.compat.lightning import PathLike as _PATH
from lightning_paged.core.atomic import read_checkpoint, save_checkpoint_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """The QLoRA strategies' default ``CheckpointIO``.

    On a local file system a checkpoint is streamed to a temporary file beside its target, flushed
    to disk and renamed over the target: a crash or an error during the save leaves the previous
    checkpoint intact and loadable. An error removes the temporary file; a killed process leaves it
    (hidden, ``.<name>.<random>.partial``), and the QLoRA strategies remove those when the next fit starts. Lightning's own writer buffers the
    whole checkpoint in memory and does not flush it to disk before the rename. Remote paths
    (``s3://`` and the like) go through Lightning's writer unchanged.

    Loading a missing, empty or truncated file raises an error that names the file and the problem
    instead of a zip-archive error from deep inside ``torch.load``.
    """

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        save_checkpoint_file(checkpoint, _local_path(path))

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return read_checkpoint(_local_path(path), map_location=map_location, weights_only=weights_only)


def _is_local(path: _PATH) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def _local_path(path: _PATH) -> str:
    return str(path).removeprefix("file://")
