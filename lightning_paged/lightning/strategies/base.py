"""What the single-device and DDP QLoRA strategies share: convert at setup, adapter-only checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_paged.core.errors import SettingError
from lightning_paged.core.qlora import (
    ConversionReport,
    QLoRAConfig,
    convert_to_qlora,
    linear4bit_layers,
    restore_training_layout,
    select_target,
)

SETTING_PREFIX = "trainer.strategy.init_args."


def qlora_config_from(settings: Mapping[str, Any]) -> QLoRAConfig:
    """A :class:`QLoRAConfig` from a strategy's init arguments (``None`` keeps a field's default)."""
    values = {f.name: settings[f.name] for f in fields(QLoRAConfig) if settings.get(f.name) is not None}
    config = QLoRAConfig(**values)
    try:
        config.validate()
    except SettingError as err:
        raise err.located(SETTING_PREFIX) from None
    return config


class QLoRAStrategyMixin:
    """Converts the LightningModule's model to NF4 QLoRA at the top of ``setup``.

    That point comes after the module's own ``setup``/``configure_model`` and before the device
    move, DDP wrapping and optimizer creation. Checkpoints hold only the trainable (adapter)
    weights, so they are restored after setup, once the adapters exist.
    """

    qlora: QLoRAConfig
    model_attr: str | None
    conversion_report: ConversionReport | None

    def _init_qlora(self, config: QLoRAConfig, model_attr: str | None) -> None:
        self.qlora = config
        self.model_attr = model_attr
        self.conversion_report = None
        self._converted: Any = None  # the LightningModule converted, once setup ran
        self._layers4bit: list[torch.nn.Module] = []
        self._trainable_keys: set[str] = set()

    def _check_precision(self) -> None:
        precision = self.precision_plugin  # type: ignore[attr-defined]
        if type(precision) is Precision or isinstance(precision, MixedPrecision):
            return
        name = getattr(precision, "precision", type(precision).__name__)
        raise SettingError(
            "trainer.precision",
            name,
            f"conflicts with {type(self).__name__}, which owns dtypes: 4-bit matmuls run in "
            f"compute_dtype={self.qlora.compute_dtype!r} and casting the quantized model would corrupt it. "
            "Leave precision at '32-true' (the default) or use 'bf16-mixed', and set "
            f"{SETTING_PREFIX}compute_dtype instead",
        )

    def _convert(self, module: pl.LightningModule, device: torch.device) -> None:
        if self._converted is module:
            return
        target = select_target(module, self.model_attr)
        try:
            report = convert_to_qlora(target, self.qlora, device=device)
        except SettingError as err:
            raise err.located(SETTING_PREFIX) from None
        self.conversion_report = report
        self._converted = module
        self._layers4bit = linear4bit_layers(module)
        self._trainable_keys = {n for n, p in module.named_parameters() if p.requires_grad}
        rank_zero_info(report.summary())

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Only the trainable weights: the frozen base is rebuilt from the model source on load."""
        module: Any = self.lightning_module  # type: ignore[attr-defined]
        if self._converted is not module:
            return module.state_dict()
        return {n: p.detach() for n, p in module.named_parameters() if n in self._trainable_keys}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module: Any = self.lightning_module  # type: ignore[attr-defined]
        if self._converted is not module:
            module.load_state_dict(checkpoint["state_dict"], strict=strict)
            return
        state = checkpoint["state_dict"]
        known = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        foreign = sorted(k for k in state if k not in known and ".weight." not in k)
        missing = sorted(self._trainable_keys - set(state))
        if foreign or (strict and missing):
            problems = []
            if missing:
                problems.append(f"lacks {len(missing)} adapter weights of this model (first: {missing[0]})")
            if foreign:
                problems.append(
                    f"holds {len(foreign)} weights this model does not have (first: {foreign[0]})"
                )
            raise RuntimeError(
                "The checkpoint does not fit this model: it "
                + " and ".join(problems)
                + ". It was written for another model or with other LoRA settings "
                "(lora_r, target_modules, skip_modules); resume with the settings of the run that wrote it."
            )
        adapters = {k: v for k, v in state.items() if k in self._trainable_keys}
        own = dict(module.named_parameters())
        for key, value in adapters.items():
            if own[key].shape != value.shape:
                raise RuntimeError(
                    f"The checkpoint's {key} has shape {tuple(value.shape)}, this model's "
                    f"{tuple(own[key].shape)}: it was written with another lora_r or model size."
                )
        module.load_state_dict(adapters, strict=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Validation or generation on CPU repacks 4-bit weights for inference (NOTES §3).
        restore_training_layout(self._layers4bit)
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
