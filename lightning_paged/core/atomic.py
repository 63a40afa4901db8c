"""Files and directories that are either whole or absent: atomic writes, staged directories, clear reads.

A write goes to a temporary file in the target's directory, is flushed to disk (``fsync``) and then
renamed over the target (``os.replace``, atomic on POSIX and Windows). A crash, a full disk or an
exception while writing leaves the previous file untouched; an exception also removes the
temporary file, and one a killed process left behind is removed by :func:`remove_stale_partials`.
A directory is filled under a temporary name beside its target (:func:`staged_directory`) and
renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from lightning_paged.core.errors import BadInput, MissingFileError

PARTIAL_SUFFIX = ".partial"
_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.partial$")
"""The temporary files :func:`atomic_write` makes: ``.<target name>.<8 random characters>.partial``."""


class CheckpointReadError(BadInput, RuntimeError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or not a checkpoint)."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)`` so that it holds either the old or the complete new content.

    An exception removes the temporary file; a process killed while writing (SIGKILL, power loss)
    leaves it behind, hidden, beside the target: :func:`remove_stale_partials` cleans those up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def remove_stale_partials(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` left in ``directory``; returns them.

    Only names of the form ``.<name>.<8 characters>.partial`` (what :func:`atomic_write` creates)
    are touched, never another file. Call it when no other process is writing into the directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if _PARTIAL.match(path.name) and path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def save_checkpoint_file(checkpoint: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically, streaming to disk (no in-memory copy of the checkpoint)."""
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None, mmap: bool = False
) -> dict[str, Any]:
    """``torch.load`` a checkpoint file, with a clear error when it is missing, empty or truncated.

    ``mmap=True`` maps the tensors instead of reading them (cheap for looking at the metadata); a
    truncated file is still refused, since its zip directory, at the end, is missing.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise MissingFileError(f"Checkpoint {path} {problem}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointReadError(f"Checkpoint {path} is empty (0 bytes): it was never completely written")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise  # a readable file whose content the safe loader refuses: torch's message says what to do
        text = str(err).strip()
        first_line = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(err).__name__
        raise CheckpointReadError(
            f"Checkpoint {path} ({size:,} bytes) cannot be read: {first_line}. The file is truncated or "
            "corrupt (an interrupted copy or download, or a crash while a non-atomic writer was saving it); "
            "use an earlier checkpoint"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointReadError(
            f"Checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict"
        )
    return checkpoint


def _default_file_mode() -> int:
    """``0o666`` less the process umask: the mode an ordinary ``open(path, "w")`` would give."""
    return 0o666 & ~_umask()


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:
        return
    try:
        fd = os.open(directory, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A fresh directory beside ``out`` to fill; on success it is renamed to ``out``, on failure removed.

    An existing ``out`` is replaced only with ``overwrite`` (and then only once the new content is
    complete); without it, :class:`FileExistsError` names it before anything is written.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o777 & ~_umask())
    try:
        yield staging
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished directory into place; an existing ``out`` is replaced only with ``overwrite``."""
    if not out.exists() and not out.is_symlink():
        os.replace(staging, out)
        return
    if not overwrite:
        raise FileExistsError(out)
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
