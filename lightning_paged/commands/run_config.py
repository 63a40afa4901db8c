"""A LightningCLI run on disk: its checkpoint, its saved ``config.yaml``, its module and QLoRA settings.

What ``lightning-paged export`` needs to know about a run trained by ``lightning-paged fit``. A run
directory's checkpoint is the newest complete one by step, as ``--ckpt_path last`` takes it: the
readable ``*.ckpt`` with the highest global step (``last.ckpt`` on a tie), not the file written last.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lightning_paged.commands.resume_check import newest_checkpoint
from lightning_paged.core.errors import SettingError
from lightning_paged.core.export import ExportError
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.lightning.strategies.base import qlora_config_from

CONFIG_NAME = "config.yaml"
QLORA_STRATEGIES = ("paged_qlora", "paged_qlora_ddp", "paged_qlora_fsdp")


def locate_checkpoint(path: Path) -> Path:
    """The checkpoint ``path`` names: the file itself, or a run directory's newest complete checkpoint."""
    if not path.exists():
        raise ExportError(f"RUN_OR_CHECKPOINT {path} does not exist")
    if not path.is_dir():
        return path
    directories = sorted({p.parent for p in path.rglob("*.ckpt") if p.is_file()})
    if not directories:
        raise ExportError(f"run directory {path} holds no checkpoint (*.ckpt)")
    newest = newest_checkpoint(directories)
    if newest is None:
        raise ExportError(
            f"run directory {path} holds no readable checkpoint (*.ckpt); see the warnings above"
        )
    return newest


def locate_config(path: Path, checkpoint: Path, config: Path | None) -> Path:
    """The run's ``config.yaml``: ``config``, else the one nearest ``checkpoint`` (within ``path``, a run directory)."""
    if config is not None:
        if not config.is_file():
            raise ExportError(f"--config {config} does not exist")
        return config
    if path.is_dir():  # its own version's config under a logger that numbers them
        roots = [checkpoint.parents[i] for i in range(len(checkpoint.relative_to(path).parts))]
    else:
        roots = [path.parent, path.parent.parent, path.parent.parent.parent]
    for root in roots:
        found = [
            p for pattern in ("", "*/", "*/*/") for p in root.glob(f"{pattern}{CONFIG_NAME}") if p.is_file()
        ]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    raise ExportError(
        f"no {CONFIG_NAME} found near {checkpoint}; give --config (the config.yaml LightningCLI saved in the "
        "run's log directory)"
    )


def read_run_config(path: Path) -> dict[str, Any]:
    """A LightningCLI config (``fit`` subcommand level), with interpolations resolved."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ExportError(f"{path} is not valid YAML: {err}") from None
    if isinstance(data, dict) and "model" not in data and isinstance(data.get("fit"), dict):
        data = data["fit"]
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ExportError(f"{path} is not a run config: it has no model section")
    if "${" in path.read_text():
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)  # type: ignore[assignment]
    return data


def build_module(run_config: dict[str, Any], model_name_or_path: Path | None = None) -> Any:
    """The run's LightningModule, built as LightningCLI built it (same class, arguments and seed)."""
    from jsonargparse import ArgumentParser
    from lightning.fabric.utilities.seed import seed_everything
    from lightning.pytorch import LightningModule

    model = copy.deepcopy(run_config["model"])
    init_args = model.setdefault("init_args", {}) or {}
    if model_name_or_path is not None and init_args.get("model_name_or_path"):
        init_args["model_name_or_path"] = str(model_name_or_path)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningModule, "model", required=True)
    try:
        parsed = parser.parse_object({"model": model})
        seed = run_config.get("seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool):
            seed_everything(seed, workers=True, verbose=False)
        return parser.instantiate_classes(parsed)["model"]
    except (ValueError, TypeError, ImportError, SettingError) as err:
        raise ExportError(f"could not build the run's model from its config: {err}") from None


def strategy_qlora_settings(run_config: dict[str, Any]) -> QLoRAConfig | None:
    """The QLoRA settings of the run's ``trainer.strategy``; None when it is no QLoRA strategy."""
    strategy = (run_config.get("trainer") or {}).get("strategy")
    if isinstance(strategy, str) and strategy in QLORA_STRATEGIES:
        return QLoRAConfig()
    if isinstance(strategy, dict) and isinstance(strategy.get("init_args"), dict):
        return qlora_config_from(strategy["init_args"])
    return None
