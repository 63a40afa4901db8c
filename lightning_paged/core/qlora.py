"""Turning a torch module into NF4 QLoRA in memory: frozen 4-bit base weights with trainable LoRA adapters.

The third floor of the conversion (``docs/architecture.md``): settings
(:mod:`~lightning_paged.core.qlora_config`), one layer (:mod:`~lightning_paged.core.layers4bit`),
then this whole-model conversion; loading (:mod:`~lightning_paged.core.loading`) and the entry
every front door calls (:func:`~lightning_paged.core.prepare.prepare_model`) stand on it. The
settings and the selection are re-exported here, where users have always imported them from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from lightning_paged.core.conv1d import is_conv1d
from lightning_paged.core.deferred import deferred_weights
from lightning_paged.core.errors import SettingError
from lightning_paged.core.experts4bit import (
    ExpertReader,
    ExpertsReport,
    check_experts,
    find_experts,
    quantize_experts,
)
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
    """Bytes of every 4-bit weight (linear layers and experts) with its quantization state."""
    replaced_16bit_bytes: int
    """What the same weights take at 16 bits."""
    expert_tensors: list[str] = field(default_factory=list)
    """Fused expert parameters quantized per expert (``...mlp.experts.gate_up_proj``)."""
    experts: int = 0
    """Experts quantized, counted once per fused parameter."""
    expert_params: int = 0
    """Expert parameters now in 4 bits."""
    expert_bytes: int = 0
    """Bytes of the 4-bit experts (included in ``quantized_bytes``)."""
    adapted_experts: list[str] = field(default_factory=list)
    """PEFT ``target_parameters`` of the expert LoRA (empty without ``lora_on_experts``)."""
    offload: OffloadStats | None = None
    """What activation offloading moves, when ``offload_activations`` put it on the checkpointed layers."""
    offload_requested: bool = False
    """Whether ``offload_activations`` was on (with ``offload`` None: no checkpointed layers to offload from)."""

    def summary(self) -> str:
        ratio = self.quantized_bytes / self.replaced_16bit_bytes if self.replaced_16bit_bytes else 0.0
        skipped = ", ".join(self.skipped) if self.skipped else "none"
        experts = ""
        if self.expert_tensors:
            experts = (
                f"; {self.expert_params:,} expert parameters in 4-bit ({len(self.expert_tensors)} fused expert "
                f"tensors, {self.experts} expert matrices, each quantized on its own"
                + (f", LoRA on {', '.join(self.adapted_experts)}" if self.adapted_experts else "")
                + ")"
            )
        text = (
            f"QLoRA: {len(self.quantized)} linear layers quantized to 4-bit, {len(self.skipped)} skipped "
            f"({skipped}); LoRA on {len(self.adapted)} layers{experts}; "
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


LayerSource = Callable[[str, nn.Module], nn.Module]
"""Given a linear layer's name and the layer, its 4-bit replacement (the streaming loader's hook)."""


def convert_to_qlora(
    model: nn.Module,
    config: QLoRAConfig | None = None,
    device: torch.device | str | None = None,
    *,
    layers: LayerSource | None = None,
    experts: ExpertReader | None = None,
) -> ConversionReport:
    """Convert ``model`` in place: 4-bit base weights, LoRA adapters, only adapters trainable.

    Quantization happens on ``device`` (the model's current device when None), one layer at a
    time, so a model on the host never needs its 16-bit weights on the accelerator. A model built
    empty from a directory (:func:`~lightning_paged.core.loading.empty_model`) is filled from its
    files here, each weight read and quantized in turn (the host never holds the 16-bit model).
    ``layers`` makes each 4-bit layer instead of quantizing the layer's own weight, and ``experts``
    reads each expert's weight (that loader's hooks). The fused expert weights of a mixture-of-experts
    model are quantized per expert (``quantize_experts``), one expert at a time.
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
    check_experts(model, config)  # before anything changes

    replaced_bytes = 0
    quantized_bytes = 0
    conv1d = any(is_conv1d(model.get_submodule(n)) for n in targets)
    for name in quantized:
        linear: Any = model.get_submodule(name)
        replaced_bytes += linear.weight.numel() * 2
        new = quantize_linear(linear, config, device) if layers is None else layers(name, linear)
        quantized_bytes += quantized_weight_bytes(new)
        set_submodule(model, name, new)
        del linear
    moe = ExpertsReport()
    if config.quantize_experts and find_experts(model):
        moe = quantize_experts(model, config, device, read=experts)

    place_non_quantized(model, config, device)
    adapted_experts = add_adapters(model, config, targets, device, conv1d=conv1d)
    offload = enable_activation_offload(model) if config.offload_activations else None

    total = sum(param_count(p) for p in model.parameters()) + moe.parameters - moe.packed_elements
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ConversionReport(
        quantized=quantized,
        skipped=skipped,
        adapted=targets,
        total_params=total,
        trainable_params=trainable,
        quantized_bytes=quantized_bytes + moe.nbytes,
        replaced_16bit_bytes=replaced_bytes + moe.nbytes_16bit,
        expert_tensors=moe.tensors,
        experts=moe.experts,
        expert_params=moe.parameters,
        expert_bytes=moe.nbytes,
        adapted_experts=adapted_experts,
        offload=offload,
        offload_requested=config.offload_activations,
    )


def is_qlora(module: nn.Module) -> bool:
    """True when the module holds 4-bit layers, i.e. it was converted already."""
    return bool(linear4bit_layers(module))
