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
from lightning_paged.core.layers4bit import enable_checkpointing
from lightning_paged.core.qlora_config import QLoRAConfig
from lightning_paged.core.selection import peft_target_spec

log = logging.getLogger(__name__)


def add_adapters(
    model: nn.Module,
    config: QLoRAConfig,
    targets: Sequence[str],
    linear_names: Sequence[str],
    device: torch.device,
) -> None:
    """Freeze everything, add PEFT LoRA adapters to ``targets`` (4-bit layers), adapters in float32 on ``device``.

    Then activation checkpointing, when the settings ask for it.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    lora = lora_config(config, targets, linear_names)
    inject_lora(model, lora, device)
    model.peft_config = {"default": lora}  # type: ignore[assignment]
    if config.gradient_checkpointing:
        checkpointing(model)


def lora_config(config: QLoRAConfig, targets: Sequence[str], linear_names: Sequence[str]) -> Any:
    """PEFT's ``LoraConfig`` for ``targets`` (what an exported adapter's ``adapter_config.json`` says)."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=peft_target_spec(targets, linear_names),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
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
