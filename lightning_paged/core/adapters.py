"""Adapter-only state and rank-zero base weights: what every framework adapter shares.

A converted model's checkpoint holds only its trainable (LoRA) weights; the frozen 4-bit base is
rebuilt from the model source. Under data parallelism every rank must quantize rank zero's
weights, because DDP broadcasts the packed 4-bit data but not its quantization constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_paged.core.fingerprint import CheckpointMismatchError


def broadcast_from_rank_zero(module: nn.Module, device: torch.device) -> None:
    """Give every rank rank zero's parameters and buffers (no-op without a process group of 2+).

    Call before quantizing: DDP broadcasts the packed 4-bit data later, but not its quantization
    constants, so ranks must quantize identical weights.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        staged = tensor.data.to(device)
        dist.broadcast(staged, src=0)
        if staged.data_ptr() != tensor.data.data_ptr():
            tensor.data.copy_(staged)


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights only (the LoRA adapters of a converted model), detached."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_adapter_state_dict(module: nn.Module, state: Mapping[str, Any], strict: bool = True) -> None:
    """Load adapter weights saved by :func:`adapter_state_dict` into a converted model.

    The frozen base weights are rebuilt from the model source, so they are not expected. Refused,
    with the reason: keys this model does not have, with ``strict`` adapters the checkpoint lacks,
    and shapes that differ (another ``lora_r`` or model size).
    """
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    known = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    # A full state dict of a 4-bit model also holds quantization constants ("<layer>.weight.absmax").
    foreign = sorted(k for k in state if k not in known and ".weight." not in k)
    missing = sorted(trainable - set(state))
    if foreign or (strict and missing):
        problems = []
        if missing:
            problems.append(f"lacks {len(missing)} adapter weights of this model (first: {missing[0]})")
        if foreign:
            problems.append(f"holds {len(foreign)} weights this model does not have (first: {foreign[0]})")
        raise CheckpointMismatchError(
            "The checkpoint does not fit this model: it "
            + " and ".join(problems)
            + ". It was written for another model or with other LoRA settings "
            "(lora_r, target_modules, skip_modules); load it with the settings of the run that wrote it."
        )
    own = dict(module.named_parameters())
    adapters = {k: v for k, v in state.items() if k in trainable}
    for key, value in adapters.items():
        if own[key].shape != value.shape:
            raise CheckpointMismatchError(
                f"The checkpoint's {key} has shape {tuple(value.shape)}, this model's "
                f"{tuple(own[key].shape)}: it was written with another lora_r or model size."
            )
    module.load_state_dict(adapters, strict=False)
