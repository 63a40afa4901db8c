"""PEFT LoRA adapters on a model's 4-bit layers: their config, adding them, activation checkpointing.

Framework-free helpers of :mod:`lightning_paged.core.qlora` (the whole-model conversion) and
:mod:`lightning_paged.core.fsdp_load` (which adds them block by block while it shards).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.peft import mark_loaded_in_4bit
from lightning_paged.core.experts4bit import adapt_experts
from lightning_paged.core.layers4bit import enable_checkpointing
from lightning_paged.core.qlora_config import QLoRAConfig
from lightning_paged.core.selection import peft_target_spec

log = logging.getLogger(__name__)


def add_adapters(
    model: nn.Module,
    config: QLoRAConfig,
    targets: Sequence[str],
    device: torch.device,
    *,
    conv1d: bool = False,
) -> list[str]:
    """Freeze everything, add PEFT LoRA adapters to ``targets`` (4-bit layers), adapters in float32 on ``device``.

    With ``lora_on_experts``, the fused expert weights get their LoRA pairs too, in PEFT's layout
    (:mod:`~lightning_paged.core.experts_lora`); returns their PEFT ``target_parameters``. ``conv1d``:
    some targets were ``Conv1D`` layers. Then activation checkpointing, when the settings ask for it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    lora = lora_config(config, targets, [n for n, _ in model.named_modules()], conv1d=conv1d)
    inject_lora(model, lora, device)
    adapted_experts = adapt_experts(model, config, device) if config.lora_on_experts else []
    if adapted_experts:  # recorded for the exported adapter, after PEFT's injection left the experts alone
        lora.target_parameters = adapted_experts
    model.peft_config = {"default": lora}  # type: ignore[assignment]
    if config.gradient_checkpointing:
        checkpointing(model)
    return adapted_experts


def lora_config(
    config: QLoRAConfig, targets: Sequence[str], module_names: Sequence[str], *, conv1d: bool = False
) -> Any:
    """PEFT's ``LoraConfig`` for ``targets`` among ``module_names`` (what an exported ``adapter_config.json`` says).

    ``conv1d``: the targets are transformers' ``Conv1D`` layers, whose 16-bit weights PEFT adapts
    with ``fan_in_fan_out`` (its 4-bit LoRA layer, used here, ignores it).
    """
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=peft_target_spec(targets, module_names),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
        fan_in_fan_out=conv1d,
    )


def inject_lora(module: nn.Module, lora: Any, device: torch.device) -> None:
    """PEFT LoRA layers on ``lora.target_modules`` of ``module``; only they train, in float32 on ``device``.

    Only the adapters draw random numbers (PEFT initialises each on the host as it adds it, then moves
    it to its base layer's device), one layer after the other in the order of ``module.named_modules()``:
    adding them to a model's blocks one after the other draws what adding them to the whole model does.
    """
    from peft import inject_adapter_in_model

    mark_loaded_in_4bit(module)  # PEFT picks its 4-bit LoRA layer only then
    inject_adapter_in_model(lora, module)
    for name, param in module.named_parameters():
        is_adapter = "lora_" in name
        param.requires_grad_(is_adapter)
        if is_adapter:  # adapters train in float32 whatever the compute dtype
            param.data = param.data.to(device=device, dtype=torch.float32)


def checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing where the model supports it (transformers models)."""
    if not enable_checkpointing(model):
        log.info("gradient_checkpointing: %s does not support it; running without", type(model).__name__)
