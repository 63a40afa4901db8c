"""What a resume may change, checked before a command writes anything into the run.

:func:`check_resume` is what the ``lightning-paged`` command calls once the model and the Trainer
are built and before the subcommand runs (the loggers, the config callback and the checkpoint
callbacks have written nothing yet). It resolves ``ckpt_path`` (``"last"``: the newest complete
checkpoint of the run), reads the checkpoint, and refuses, naming each setting with its value in
the checkpoint and the new one, a resume onto another base model or with a setting that would
change what the trained weights mean. A refused resume leaves every file of the run as it was.

The rule for the model section (``--model.init_args.*``), the one Lightning's CLI would otherwise
replace by the checkpoint's saved hyper-parameters without a word:

- may change, and the change takes effect: :data:`RESUMABLE_MODEL_SETTINGS`;
- may change when the base model stays the same (the fingerprint check decides):
  ``model_name_or_path`` (the same weights moved elsewhere) and ``model_config`` entries that do not
  change the weights (``attn_implementation``);
- anything else (the class, ``tokenizer``, ``optimizer.name``, ``optimizer.kwargs``) is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_paged.core.adapter_checkpoint import AdapterCheckpoint
from lightning_paged.core.atomic import CheckpointReadError, read_checkpoint
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import CheckpointMismatchError, fingerprint, mismatch_error
from lightning_paged.core.selection import select_target
from lightning_paged.lightning.strategies.base import PLACES

MODEL_PREFIX = "model.init_args."
STRATEGY_PREFIX = PLACES.strategy
RESUMABLE_MODEL_SETTINGS = (
    "sample_prompt",
    "sample_max_new_tokens",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.betas",
    "optimizer.eps",
    "optimizer.scheduler",
    "optimizer.warmup_steps",
    "optimizer.warmup_ratio",
    "optimizer.page_adapters",
)
"""Model settings a resume may change: the optimizer's are applied over the restored optimizer state."""
BASE_MODEL_SETTINGS = ("model_name_or_path", "model_config")
"""Model settings a resume may change as long as the base model's fingerprint stays the same."""
_HPARAMS_BOOKKEEPING = ("_class_path", "_instantiator")


def check_resume(
    ckpt_path: str | os.PathLike | None, trainer: Any, model: Any, model_section: Any = None
) -> str | None:
    """The checkpoint a command resumes from, checked against the run; None to start from step 0.

    ``ckpt_path`` is the command's ``--ckpt_path``: a file, or ``"last"`` for the newest complete
    checkpoint in the Trainer's checkpoint directories. ``model_section`` is the parsed ``model``
    section of the config (class_path and init_args), compared with the checkpoint's saved
    hyper-parameters. Raises :class:`SettingError` for a path that does not exist,
    :class:`CheckpointReadError` for a file that cannot be read and :class:`CheckpointMismatchError`
    for a checkpoint of another base model or with settings a resume may not change.
    """
    if ckpt_path is None or str(ckpt_path) in ("best", "hpc") or "://" in str(ckpt_path):
        return None if ckpt_path is None else str(ckpt_path)
    if str(ckpt_path) == "last":
        path = newest_checkpoint(checkpoint_dirs(trainer, all_versions=True))
        if path is None:
            rank_zero_info(
                f"--ckpt_path last: no checkpoint in {', '.join(map(str, checkpoint_dirs(trainer, True)))} yet; "
                "starting at step 0."
            )
            return None
    else:
        path = Path(ckpt_path).expanduser()
        if not path.exists():
            raise SettingError(
                "ckpt_path", str(ckpt_path), f"does not exist{checkpoint_listing(path.parent)}"
            )
    checkpoint = _read(path)
    base_changes = _check_model_settings(checkpoint, model_section, path) if model_section is not None else []
    _check_base_and_strategy(checkpoint, trainer, model, path, base_changes)
    step = checkpoint.get("global_step")
    rank_zero_info(f"Resuming from {path}" + (f" (step {step})." if step is not None else "."))
    return str(path)


def last_checkpoint(trainer: Any) -> str | None:
    """The checkpoint ``--ckpt_path last`` of ``lightning-paged`` resumes from, for a LightningCLI of your own.

    The readable checkpoint with the highest global step (``last.ckpt`` on a tie) in the Trainer's
    checkpoint directories (:func:`checkpoint_dirs`), the earlier versions of a logger that numbers
    them (``version_0``, ``version_1``, ...) included; None when there is none yet. Lightning's own
    ``ckpt_path="last"`` looks only for ``last*.ckpt`` in the directories of this run, and with such
    a logger every run is a new version whose directory is empty. In a LightningCLI subclass::

        def before_fit(self):
            if self.config_init[self.subcommand].get("ckpt_path") == "last":
                self.config_init[self.subcommand]["ckpt_path"] = last_checkpoint(self.trainer)
    """
    path = newest_checkpoint(checkpoint_dirs(trainer, all_versions=True))
    return None if path is None else str(path)


def checkpoint_dirs(trainer: Any, all_versions: bool = False) -> list[Path]:
    """Where the Trainer's ``ModelCheckpoint`` callbacks write, resolved as Lightning resolves them at setup.

    The rule of ``ModelCheckpoint.__resolve_ckpt_dir`` (lightning 2.6, ``callbacks/model_checkpoint.py``):
    its ``dirpath``; else ``<save_dir>/<name>/<version>/checkpoints`` of the first logger; else
    ``<default_root_dir>/checkpoints``. With ``all_versions``, a logger whose versions are numbers
    (``version_N``, one new directory per run) adds the checkpoint directories of its earlier versions.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    dirs: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        found = []
        if callback.dirpath is not None:
            found.append(Path(callback.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            if all_versions and not isinstance(logger.version, str):
                found += sorted(Path(save_dir, str(logger.name)).glob("version_*/checkpoints"))
            found.append(Path(save_dir, str(logger.name), version, "checkpoints"))
        else:
            found.append(Path(trainer.default_root_dir, "checkpoints"))
        dirs += [directory for directory in found if directory not in dirs]
    return dirs


def newest_checkpoint(directories: list[Path]) -> Path | None:
    """The complete checkpoint of the highest ``global_step`` in ``directories`` (``last.ckpt`` on a tie).

    A kill between a step checkpoint and the ``last.ckpt`` update leaves ``last.ckpt`` one save
    behind: the step checkpoint is newer. Files that cannot be read are skipped with a warning.
    """
    best: tuple[int, bool, float] | None = None
    chosen: Path | None = None
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.ckpt")):
            try:
                checkpoint = _read(path)
            except CheckpointReadError as err:
                rank_zero_warn(f"Skipping a checkpoint that cannot be read: {err}")
                continue
            key = (int(checkpoint.get("global_step", -1)), path.name.startswith("last"), path.stat().st_mtime)
            if best is None or key > best:
                best, chosen = key, path
    return chosen


def _read(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, its tensors mapped rather than read."""
    try:
        return read_checkpoint(path, weights_only=True, mmap=True)
    except FileNotFoundError as err:
        raise CheckpointReadError(str(err)) from None
    except CheckpointReadError:
        raise
    except Exception:
        # Hyper-parameters of a module trained outside the CLI may hold objects the safe loader refuses.
        return read_checkpoint(path, weights_only=False, mmap=True)


def checkpoint_listing(directory: Path) -> str:
    """``"; <directory> holds a.ckpt, b.ckpt (...)"``, or nothing when it holds no checkpoint."""
    names = sorted(p.name for p in directory.glob("*.ckpt")) if directory.is_dir() else []
    if not names:
        return ""
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"; {directory} holds {shown} (or give --ckpt_path last for the newest)"


def _check_model_settings(checkpoint: Mapping[str, Any], model_section: Any, path: Path) -> list[str]:
    """Refuse model settings a resume may not change; log the allowed changes; return those of the base."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    if not saved:
        return []
    section = _plain(model_section)
    if not isinstance(section, dict):
        return []
    now = _flatten(section.get("init_args") or {})
    before = _flatten({k: v for k, v in saved.items() if k not in _HPARAMS_BOOKKEEPING})
    refused, changed, base_changes = [], [], []
    saved_class = saved.get("_class_path")
    if saved_class is not None and section.get("class_path") not in (None, saved_class):
        refused.append(
            f"--model.class_path ({saved_class!r} in the checkpoint, {section['class_path']!r} now)"
        )
    for key in sorted(set(before) & set(now)):
        if before[key] == now[key]:
            continue
        change = f"--{MODEL_PREFIX}{key} ({before[key]!r} in the checkpoint, {now[key]!r} now)"
        if key.split(".")[0] in BASE_MODEL_SETTINGS:
            base_changes.append(change)
            changed.append(change)
        elif key in RESUMABLE_MODEL_SETTINGS:
            changed.append(change)
        else:
            refused.append(change)
    if refused:
        raise CheckpointMismatchError(
            f"{path} cannot be resumed with this config: a resume may not change "
            + " or ".join(refused)
            + ". It may change model.init_args."
            + ", ".join(RESUMABLE_MODEL_SETTINGS)
            + " (see docs/checkpoints.md). Resume with the checkpoint's values, or start a new run in "
            "another directory"
        )
    if changed:
        rank_zero_info(f"Resuming {path.name} with changed settings: {'; '.join(changed)}.")
    return base_changes


def _check_base_and_strategy(
    checkpoint: Mapping[str, Any], trainer: Any, model: Any, path: Path, base_changes: list[str]
) -> None:
    from lightning_paged.lightning.strategies.base import QLoRAStrategyMixin

    strategy = trainer.strategy
    if not isinstance(strategy, QLoRAStrategyMixin):
        return  # another strategy: its own load decides
    record = AdapterCheckpoint.read(checkpoint, path)
    if record is None:
        return  # no record: the strategy's load warns that it cannot be checked
    current = fingerprint(select_target(model, strategy.model_attr), strategy.qlora)
    differences = record.differences(current, where=f"--{STRATEGY_PREFIX}")
    if differences:
        if base_changes and record.fingerprint.base.sha256 != current.base.sha256:
            differences[0] += f", after changing {' and '.join(base_changes)}"
        raise mismatch_error(
            differences,
            f"Resume {path} with the base model and strategy settings of the run that wrote it, or start a "
            "new run in another directory",
        )


def _plain(value: Any) -> Any:
    """Namespaces, dataclasses and tuples as dicts and lists, for comparing configs with saved hparams."""
    if hasattr(value, "as_dict") and callable(value.as_dict):
        value = value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, item in _plain(value).items():
        name = f"{prefix}{key}"
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, f"{name}."))
        else:
            flat[name] = item
    return flat
