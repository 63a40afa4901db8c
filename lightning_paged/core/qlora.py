"""Turning a torch module into NF4 QLoRA in memory: frozen 4-bit base weights with trainable LoRA adapters.

The third floor of the conversion (``docs/architecture.md``): settings
(:mod:`~lightning_paged.core.qlora_config`), one layer (:mod:`~lightning_paged.core.layers4bit`),
then this whole-model conversion; loading (:mod:`~lightning_paged.core.loading`) and the entry
every front door calls (:func:`~lightning_paged.core.prepare.prepare_model`) stand on it. The
settings and the selection are re-exported here, where users have always imported them from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from lightning_paged.core.deferred import deferred_weights
from lightning_paged.core.errors import SettingError
from lightning_paged.core.layers4bit import (
    linear4bit_layers,
    param_count,
    place_non_quantized,
    quantize_linear,
    quantize_weight,
    quantized_weight_bytes,
    set_submodule,
)
from lightning_paged.core.lora import add_adapters
from lightning_paged.core.offload import OffloadStats, enable_activation_offload
from lightning_paged.core.qlora_config import (
    FINGERPRINT,
    QLORA_FIELDS,
    QUANT_TYPES,
    QLoRAConfig,
    QuantType,
    qlora_config,
    qlora_config_from_init_args,
)
from lightning_paged.core.selection import select_layers, select_target
from lightning_paged.core.units import format_bytes

__all__ = [
    "FINGERPRINT",
    "QLORA_FIELDS",
    "QUANT_TYPES",
    "ConversionReport",
    "LayerSource",
    "QLoRAConfig",
    "QuantType",
    "convert_to_qlora",
    "is_qlora",
    "qlora_config",
    "qlora_config_from_init_args",
    "quantize_weight",
    "select_layers",
    "select_target",
]


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
    offload: OffloadStats | None = None
    """What activation offloading moves, when ``offload_activations`` put it on the checkpointed layers."""
    offload_requested: bool = False
    """Whether ``offload_activations`` was on (with ``offload`` None: no checkpointed layers to offload from)."""

    def summary(self) -> str:
        ratio = self.quantized_bytes / self.replaced_16bit_bytes if self.replaced_16bit_bytes else 0.0
        skipped = ", ".join(self.skipped) if self.skipped else "none"
        text = (
            f"QLoRA: {len(self.quantized)} linear layers quantized to 4-bit, {len(self.skipped)} skipped "
            f"({skipped}); LoRA on {len(self.adapted)} layers; "
            f"{self.trainable_params:,} of {self.total_params:,} parameters trainable "
            f"({100.0 * self.trainable_params / max(self.total_params, 1):.2f}%); "
            f"4-bit weights {format_bytes(self.quantized_bytes)} in place of "
            f"{format_bytes(self.replaced_16bit_bytes)} at 16 bits ({ratio:.3f}x)"
        )
        if self.offload is not None:
            text += "; checkpointed layer inputs wait in host memory (offload_activations)"
        elif self.offload_requested:
            text += "; offload_activations: the model has no gradient checkpointing to offload from"
        return text

    def values(self) -> dict[str, Any]:
        """This report's fields as they are (``asdict`` would turn :class:`OffloadStats` into a dict)."""
        return {f.name: getattr(self, f.name) for f in fields(ConversionReport)}


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
    deferred = deferred_weights(model) if layers is None else None
    if deferred is not None:
        report: ConversionReport = deferred.load_and_convert(model, deferred.directory, config, device)
        return report
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
    offload = enable_activation_offload(model) if config.offload_activations else None

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
        offload=offload,
        offload_requested=config.offload_activations,
    )


def is_qlora(module: nn.Module) -> bool:
    """True when the module holds 4-bit layers, i.e. it was converted already."""
    return bool(linear4bit_layers(module))
