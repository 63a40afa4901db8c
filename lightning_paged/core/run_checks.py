"""Does a checkpoint belong to this base model and these settings? The checks ``export`` runs first.

Each names what differs (see :func:`~lightning_paged.core.fingerprint.describe_differences`) and
raises :class:`~lightning_paged.core.export.ExportError` before anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_paged.core.adapter_checkpoint import AdapterCheckpoint
from lightning_paged.core.errors import ExportError
from lightning_paged.core.fingerprint import (
    BaseFingerprint,
    Fingerprint,
    describe_differences,
    files_fingerprint,
    settings_of,
    weight_files,
)
from lightning_paged.core.progress import progress_bar
from lightning_paged.core.qlora_config import QLoRAConfig


def check_settings(
    record: AdapterCheckpoint, settings: QLoRAConfig, checkpoint: Path, config: Path, where: str
) -> None:
    """The run's QLoRA settings (``settings``, from ``config``) must be those the checkpoint was written with.

    ``where`` is the settings' place in the run's config, for the message.
    """
    current = Fingerprint(base=record.fingerprint.base, settings=settings_of(settings))
    differences = record.differences(current, where, now="in the config")
    if differences:
        raise ExportError(
            f"{checkpoint} does not belong to the run of {config}: it was written with "
            + " and ".join(differences)
        )


def find_base_dir(saved: BaseFingerprint, configured: str | None, base: str | os.PathLike | None) -> Path:
    """The base model directory: ``--base``, else the configured one, else where the run loaded it from."""
    if base is not None:
        base_dir = Path(base).expanduser()
        if not base_dir.is_dir():
            raise ExportError(f"--base {base_dir} does not exist or is not a directory")
        if not weight_files(base_dir):
            raise ExportError(f"--base {base_dir} holds no model weights (*.safetensors or *.bin)")
        return base_dir
    for candidate in (configured, saved.source):
        if candidate and Path(candidate).expanduser().is_dir() and weight_files(Path(candidate).expanduser()):
            return Path(candidate).expanduser()
    raise ExportError(
        f"the base model was loaded from {saved.source}, which holds no model weights here; give --base with "
        "the directory of the same base model"
    )


def files_fingerprint_with_bar(base_dir: Path, progress: bool) -> BaseFingerprint:
    """:func:`files_fingerprint` with a progress bar over the bytes hashed."""
    total = sum(p.stat().st_size for p in weight_files(base_dir))
    with progress_bar("checking base weights", total, progress) as advance:
        return files_fingerprint(base_dir, on_bytes=advance)


def check_base(saved: BaseFingerprint, current: BaseFingerprint, checkpoint: Path, what: str) -> None:
    """The base model now (``what``: where it is) must be the one the checkpoint was written for."""
    differences = describe_differences(Fingerprint(saved, {}), Fingerprint(current, {}), now=what)
    if differences:
        raise ExportError(f"{checkpoint} does not fit this base model: it was written with {differences[0]}")
