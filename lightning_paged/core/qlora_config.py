"""The settings of the NF4 + LoRA conversion: :class:`QLoRAConfig`, its closed choices and their dtypes.

The lowest floor of the conversion (see ``docs/architecture.md``): the one layer
(:mod:`~lightning_paged.core.layers4bit`), the in-memory conversion (:mod:`~lightning_paged.core.qlora`),
loading and :func:`~lightning_paged.core.prepare.prepare_model` all read their settings from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from lightning_paged.core.errors import SettingError
from lightning_paged.core.settings import settings_from_mapping

QuantType = Literal["nf4", "fp4"]
"""4-bit data types of bitsandbytes."""
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)
ComputeDtype = Literal["bfloat16", "float16", "float32"]
"""Data types the 4-bit matmuls can run in."""
StorageDtype = Literal["uint8", "bfloat16", "float16", "float32"]
"""Storage types of packed 4-bit weights."""
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(ComputeDtype)}
STORAGE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(StorageDtype)}

FINGERPRINT = {"fingerprint": True}
"""Field metadata of the settings that change what the adapter weights mean (see ``core/fingerprint.py``)."""


@dataclass
class QLoRAConfig:
    """Settings of the NF4 + LoRA conversion. The single source of their defaults.

    Fields marked ``metadata=FINGERPRINT`` change what the adapter weights mean: a checkpoint
    records them and refuses a resume or export under other values.
    """

    quant_type: QuantType = field(default="nf4", metadata=FINGERPRINT)
    """4-bit data type of the frozen base weights."""
    double_quant: bool = field(default=True, metadata=FINGERPRINT)
    """Quantize the quantization constants too (about 0.37 bits per parameter less)."""
    compute_dtype: ComputeDtype = field(default="bfloat16", metadata=FINGERPRINT)
    """Data type of the 4-bit matmuls and of the non-quantized weights (embeddings, head, biases)."""
    quant_storage: StorageDtype = "uint8"
    """Storage type of the packed 4-bit weights (a float type lets FSDP-style sharding treat them uniformly)."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"], metadata=FINGERPRINT)
    """Linear layers left unquantized and without adapters: module names or name suffixes."""
    lora_r: int = field(default=16, metadata=FINGERPRINT)
    """LoRA rank."""
    lora_alpha: int = field(default=32, metadata=FINGERPRINT)
    """LoRA scaling numerator (scale is ``lora_alpha / lora_r``, or ``/ sqrt(lora_r)`` with rsLoRA)."""
    lora_dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = field(default="all-linear", metadata=FINGERPRINT)
    """``"all-linear"`` (every quantized layer) or a list of layer names or name suffixes."""
    use_rslora: bool = field(default=False, metadata=FINGERPRINT)
    """Rank-stabilised LoRA scaling."""
    use_dora: bool = field(default=False, metadata=FINGERPRINT)
    """Weight-decomposed LoRA (DoRA)."""
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing on models that support it (transformers models)."""
    offload_activations: bool = False
    """Keep each checkpointed layer's input in pinned host memory from the forward to the backward pass.

    Frees about ``layers x tokens x hidden x 2`` bytes of device memory (bf16) for two copies per layer
    and step; needs ``gradient_checkpointing``. Nothing moves for a model on the host."""
    upcast_non_quantized: bool = field(default=False, metadata=FINGERPRINT)
    """Cast every non-quantized weight to float32 (PEFT's ``prepare_model_for_kbit_training`` default). Costs memory."""

    def validate(self) -> None:
        """Raise :class:`SettingError` naming the first bad setting."""
        if self.quant_type not in QUANT_TYPES:
            raise SettingError("quant_type", self.quant_type, f"must be one of {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in DTYPES:
            raise SettingError("compute_dtype", self.compute_dtype, f"must be one of {', '.join(DTYPES)}")
        if self.quant_storage not in STORAGE_DTYPES:
            raise SettingError(
                "quant_storage", self.quant_storage, f"must be one of {', '.join(STORAGE_DTYPES)}"
            )
        if not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise SettingError("lora_r", self.lora_r, "must be a positive integer (typical: 8, 16, 64)")
        if self.lora_alpha <= 0:
            raise SettingError("lora_alpha", self.lora_alpha, "must be positive (typical: 2 * lora_r)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SettingError("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise SettingError(
                "target_modules", self.target_modules, "must be 'all-linear' or a list of layer names"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise SettingError("target_modules", self.target_modules, "must not be empty")


QLORA_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(QLoRAConfig))
"""Every QLoRA setting, in the dataclass's order."""


def qlora_config(value: QLoRAConfig | Mapping[str, Any] | None, where: str = "qlora.") -> QLoRAConfig:
    """A validated :class:`QLoRAConfig` from a config, a mapping of its fields, or None (the defaults).

    ``where`` is the settings' place in the user's config: an unknown key or a bad value is
    reported as ``<where><name>``.
    """
    return settings_from_mapping(QLoRAConfig, value, where)


def qlora_config_from_init_args(settings: Mapping[str, Any], where: str) -> QLoRAConfig:
    """A validated :class:`QLoRAConfig` from flat init arguments (a strategy's), ``None`` keeping a default.

    Keys that are not QLoRA settings (``model_attr``, ``device``, ...) are left out; bad values
    are reported as ``<where><name>``.
    """
    values = {name: settings[name] for name in QLORA_FIELDS if settings.get(name) is not None}
    return settings_from_mapping(QLoRAConfig, values, where)
