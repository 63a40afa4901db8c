"""Turning a torch module into NF4 QLoRA: frozen 4-bit base weights with trainable LoRA adapters.

Framework-free: the Lightning strategy, the Fabric plugin and the Accelerate helper all call
:func:`convert_to_qlora` on the module they are about to move to a device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_paged.core.errors import SettingError
from lightning_paged.core.layers4bit import (
    DTYPES,
    STORAGE_DTYPES,
    ComputeDtype,
    StorageDtype,
    linear4bit_layers,
    param_count,
    place_non_quantized,
    quantize_linear,
    quantize_weight,  # noqa: F401  (re-exported: every path that quantizes a base weight calls it)
    quantized_weight_bytes,
    set_submodule,
)
from lightning_paged.core.lora import add_adapters
from lightning_paged.core.settings import settings_from_mapping
from lightning_paged.core.units import format_bytes

QuantType = Literal["nf4", "fp4"]
"""4-bit data types of bitsandbytes."""
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)

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


@dataclass
class ConversionReport:
    """What :func:`convert_to_qlora` did, for the one-line summary and for tests."""

    quantized: list[str]
    skipped: list[str]
    adapted: list[str]
    total_params: int
    trainable_params: int
    quantized_bytes: int
    replaced_16bit_bytes: int

    def summary(self) -> str:
        ratio = self.quantized_bytes / self.replaced_16bit_bytes if self.replaced_16bit_bytes else 0.0
        skipped = ", ".join(self.skipped) if self.skipped else "none"
        return (
            f"QLoRA: {len(self.quantized)} linear layers quantized to 4-bit, {len(self.skipped)} skipped "
            f"({skipped}); LoRA on {len(self.adapted)} layers; "
            f"{self.trainable_params:,} of {self.total_params:,} parameters trainable "
            f"({100.0 * self.trainable_params / max(self.total_params, 1):.2f}%); "
            f"4-bit weights {format_bytes(self.quantized_bytes)} in place of "
            f"{format_bytes(self.replaced_16bit_bytes)} at 16 bits ({ratio:.3f}x)"
        )


def select_target(module: nn.Module, attr: str | None = "auto") -> nn.Module:
    """The module the conversion applies to.

    The rule: ``attr="auto"`` takes the ``model`` attribute when it is an ``nn.Module`` (the usual
    LightningModule that holds a transformers model), else the module itself; ``attr=None`` or ``""``
    takes the module itself; any other string is a dotted attribute path.
    """
    if attr == "auto":
        inner = getattr(module, "model", None)
        return inner if isinstance(inner, nn.Module) else module
    if not attr:
        return module
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SettingError("model_attr", attr, f"names no attribute of {type(module).__name__}")
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        raise SettingError("model_attr", attr, f"is a {type(target).__name__}, not a torch module")
    return target


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _resolve_targets(config: QLoRAConfig, linear_names: Sequence[str], quantized: Sequence[str]) -> list[str]:
    if config.target_modules == "all-linear":
        return list(quantized)
    wanted = list(config.target_modules)
    unmatched = [p for p in wanted if not any(_matches(n, [p]) for n in linear_names)]
    if unmatched:
        raise SettingError(
            "target_modules",
            unmatched,
            "match no linear layer; linear layers found: " + ", ".join(_short_names(linear_names)),
        )
    skipped_hits = [n for n in linear_names if _matches(n, wanted) and n not in quantized]
    if skipped_hits:
        raise SettingError(
            "target_modules",
            wanted,
            f"select layers that skip_modules leaves unquantized ({', '.join(skipped_hits)}); "
            "remove them from one of the two lists",
        )
    return [n for n in quantized if _matches(n, wanted)]


def _short_names(names: Sequence[str]) -> list[str]:
    """Layer names with block indices folded (``model.layers.*.self_attn.q_proj``), for messages."""
    folded = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return list(folded)


def select_layers(model: nn.Module, config: QLoRAConfig) -> tuple[list[str], list[str], list[str]]:
    """``(linear layers, those to quantize, those to adapt)`` of ``model`` under ``config``'s selection.

    Raises :class:`SettingError` for a selection :func:`convert_to_qlora` would refuse; cheap
    (names only), so a command can check it before anything starts.
    """
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear_names:
        raise SettingError(
            "model",
            type(model).__name__,
            "has no nn.Linear layers to quantize; QLoRA needs a model built of linear layers "
            "(set model_attr to the submodule that holds them)",
        )
    # Every entry must select a layer (a typo would quantize what it meant to keep), but the default
    # "lm_head": models without an output layer keep the default.
    unmatched = [
        p for p in config.skip_modules if p != "lm_head" and not any(_matches(n, [p]) for n in linear_names)
    ]
    if unmatched:
        raise SettingError(
            "skip_modules",
            unmatched,
            "match no linear layer; linear layers found: " + ", ".join(_short_names(linear_names)),
        )
    quantized = [n for n in linear_names if not _matches(n, config.skip_modules)]
    if not quantized:
        raise SettingError(
            "skip_modules",
            config.skip_modules,
            f"leaves none of the {len(linear_names)} linear layers to quantize",
        )
    return linear_names, quantized, _resolve_targets(config, linear_names, quantized)


LayerSource = Callable[[str, nn.Linear], nn.Module]
"""Given a linear layer's name and the layer, its 4-bit replacement (the streaming loader's hook)."""


def convert_to_qlora(
    model: nn.Module,
    config: QLoRAConfig | None = None,
    device: torch.device | str | None = None,
    *,
    layers: LayerSource | None = None,
) -> ConversionReport:
    """Convert ``model`` in place: 4-bit base weights, LoRA adapters, only adapters trainable.

    Quantization happens on ``device`` (the model's current device when None), one layer at a
    time, so a model on the host never needs its 16-bit weights on the accelerator. A model built
    empty from a directory (:func:`~lightning_paged.core.loading.empty_model`) is filled from its
    files here, each weight read and quantized in turn (the host never holds the 16-bit model).
    ``layers`` makes each 4-bit layer instead of quantizing the layer's own weight (that loader's hook).
    """
    config = config or QLoRAConfig()
    config.validate()
    if layers is None:
        from lightning_paged.core.loading import deferred_directory, load_and_convert

        directory = deferred_directory(model)
        if directory is not None:
            return load_and_convert(model, directory, config, device)
    import bitsandbytes as bnb

    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        raise SettingError("model", type(model).__name__, "is already quantized; convert a module only once")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    linear_names, quantized, targets = select_layers(model, config)
    skipped = [n for n in linear_names if n not in quantized]

    replaced_bytes = 0
    quantized_bytes = 0
    for name in quantized:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        replaced_bytes += linear.weight.numel() * 2
        new = quantize_linear(linear, config, device) if layers is None else layers(name, linear)
        quantized_bytes += quantized_weight_bytes(new)
        set_submodule(model, name, new)
        del linear

    place_non_quantized(model, config, device)
    add_adapters(model, config, targets, linear_names, device)

    total = sum(param_count(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ConversionReport(
        quantized=quantized,
        skipped=skipped,
        adapted=targets,
        total_params=total,
        trainable_params=trainable,
        quantized_bytes=quantized_bytes,
        replaced_16bit_bytes=replaced_bytes,
    )


# ---------------------------------------------------------------------------------------------
# What every front door calls: settings from what the user wrote, and the conversion once


def qlora_config(value: QLoRAConfig | Mapping[str, Any] | None, where: str = "qlora.") -> QLoRAConfig:
    """A validated :class:`QLoRAConfig` from a config, a mapping of its fields, or None (the defaults)."""
    return settings_from_mapping(QLoRAConfig, value, where)


def qlora_config_from_init_args(settings: Mapping[str, Any], where: str) -> QLoRAConfig:
    """A validated :class:`QLoRAConfig` from flat init arguments (a strategy's), ``None`` keeping a default.

    Keys that are not QLoRA settings (``model_attr``, ``device``, ...) are left out; bad values
    are reported as ``<where><name>``.
    """
    values = {name: settings[name] for name in QLORA_FIELDS if settings.get(name) is not None}
    return settings_from_mapping(QLoRAConfig, values, where)


QLORA_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(QLoRAConfig))
"""Every QLoRA setting, in the dataclass's order."""


def is_qlora(module: nn.Module) -> bool:
    """True when the module holds 4-bit layers, i.e. it was converted already."""
    return bool(linear4bit_layers(module))


def convert_model(
    module: nn.Module,
    config: QLoRAConfig,
    device: torch.device | None,
    model_attr: str | None = None,
    where: str = "qlora.",
) -> ConversionReport | None:
    """Convert ``module`` (or its ``model_attr`` submodule) in place, after taking rank zero's weights.

    A model built empty from a directory (:func:`~lightning_paged.core.loading.empty_model`) is
    filled from its files instead, by every rank itself, quantizing as it reads (on the host when
    ``device`` is None). Returns None when it holds 4-bit layers already (converted by an earlier
    call or by hand).
    """
    from lightning_paged.core.adapters import broadcast_from_rank_zero
    from lightning_paged.core.loading import deferred_directory

    target = select_target(module, model_attr)
    if is_qlora(target):
        return None
    if deferred_directory(target) is None:
        if device is None:
            first = next(target.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        broadcast_from_rank_zero(target, device)
    try:
        return convert_to_qlora(target, config, device=device)
    except SettingError as err:
        raise (err.located(where) if err.setting in QLORA_FIELDS else err) from None
