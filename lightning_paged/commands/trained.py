"""What ``lightning-paged export`` reads: the adapters of a LightningCLI run, a Fabric checkpoint or an Accelerate state.

Every front door writes the same record beside the adapter weights
(:class:`~lightning_paged.core.adapter_checkpoint.AdapterCheckpoint`). A LightningCLI run also has
the ``config.yaml`` it was started with: export checks the checkpoint against it and rebuilds a
base built from a config from it. A Fabric checkpoint (``fabric.save``) or an Accelerate state
directory (``accelerator.save_state``) has no config: its record is the whole account, and a base
built in a script is checked against ``--base``, the directory it was saved to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lightning_paged.commands.run_config import (
    build_module,
    locate_checkpoint,
    locate_config,
    read_run_config,
    strategy_qlora_settings,
)
from lightning_paged.core.adapter_checkpoint import RECORD_FILE, AdapterCheckpoint
from lightning_paged.core.atomic import read_checkpoint
from lightning_paged.core.errors import ExportError
from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora
from lightning_paged.core.run_checks import check_settings
from lightning_paged.core.selection import select_target
from lightning_paged.lightning.strategies.base import PLACES

LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
"""A key every Lightning checkpoint holds (``Trainer.save_checkpoint``)."""


@dataclass
class Trained:
    """A checkpoint to export: its record, its adapter weights and, for a LightningCLI run, its config."""

    path: Path
    """The checkpoint file, or an Accelerate state directory."""
    record: AdapterCheckpoint
    weights: Mapping[str, Any]
    """The checkpoint's adapter weights (names within the module the front door held)."""
    settings: QLoRAConfig
    """The run's QLoRA settings."""
    config_path: Path | None = None
    """The run's ``config.yaml``; None for a Fabric or Accelerate checkpoint."""
    run_config: dict[str, Any] | None = None

    @property
    def configured_base(self) -> str | None:
        """The base model directory the run's config names (``model_name_or_path``), if any."""
        model = (self.run_config or {}).get("model") or {}
        return (model.get("init_args") or {}).get("model_name_or_path")

    def module(self, model_name_or_path: Path | None = None) -> Any:
        """The run's LightningModule, rebuilt from its config (a LightningCLI run only)."""
        assert self.run_config is not None
        return build_module(self.run_config, model_name_or_path=model_name_or_path)

    def target(self, module: Any) -> Any:
        """The converted submodule of ``module``, by the rule the run used (``model_attr``)."""
        return select_target(module, self.record.model_attr)

    def load_adapter(self, target: Any, device: Any = "cpu") -> Any:
        """``target`` (the run's base, as :meth:`target` selects it) quantized on ``device`` with the run's
        QLoRA settings, holding the checkpoint's adapter: the model as it was trained."""
        convert_to_qlora(target, replace(self.settings, gradient_checkpointing=False), device=device)
        prefix = self.record.target_prefix
        state = {k.removeprefix(prefix): v for k, v in self.weights.items() if k.startswith(prefix)}
        loaded = target.load_state_dict(state, strict=False)
        mismatched = loaded.unexpected_keys + [k for k in loaded.missing_keys if ".lora_" in k]
        if mismatched:
            raise ExportError(
                f"the checkpoint's adapter does not fit the rebuilt model (first mismatch: {mismatched[0]})"
            )
        return target


def read_trained(run: Path, config: Path | None) -> Trained:
    """The checkpoint ``run`` names: a run directory, a checkpoint file or an Accelerate state directory."""
    if run.is_dir() and (run / RECORD_FILE).is_file():
        record = AdapterCheckpoint.read_file(run)
        assert record is not None
        return Trained(run, record, record.adapter_weights(run), record.settings())
    checkpoint_path = locate_checkpoint(run)
    # The run's own file: its hyper-parameters may hold config objects the weights-only loader refuses.
    checkpoint = read_checkpoint(checkpoint_path, weights_only=False)
    record = AdapterCheckpoint.read(checkpoint, checkpoint_path)
    if record is None:
        raise ExportError(
            f"checkpoint {checkpoint_path} was not written by a lightning_paged QLoRA front door (it carries no "
            "base-model fingerprint); export needs a checkpoint of a paged_qlora, paged_qlora_ddp or "
            "paged_qlora_fsdp run (Lightning or Fabric) or a save_state directory of prepare_paged_qlora"
        )
    weights = record.adapter_weights(checkpoint)
    if (
        LIGHTNING_VERSION_KEY not in checkpoint and config is None
    ):  # Fabric's: the record is the whole account
        return Trained(checkpoint_path, record, weights, record.settings())
    config_path = locate_config(run, checkpoint_path, config)
    run_config = read_run_config(config_path)
    settings = strategy_qlora_settings(run_config)
    if settings is None:
        strategy = (run_config.get("trainer") or {}).get("strategy")
        raise ExportError(
            f"{config_path} is not the config of a QLoRA run (trainer.strategy is {strategy!r}), but "
            f"{checkpoint_path} was written by one: they belong to different runs; give the checkpoint's own run"
        )
    check_settings(record, settings, checkpoint_path, config_path, PLACES.qlora)
    return Trained(checkpoint_path, record, weights, settings, config_path, run_config)
