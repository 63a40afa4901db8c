"""Adapter-only state, rank-zero base weights, optimizers over the adapters: what every front door shares.

A converted model's checkpoint holds only its trainable (LoRA) weights; the frozen 4-bit base is
rebuilt from the model source. Under data parallelism every rank must quantize rank zero's
weights, because DDP broadcasts the packed 4-bit data but not its quantization constants. An
optimizer built before the conversion holds none of the adapters, and training changes nothing:
:func:`check_optimizers` refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_paged.core.errors import UsageError
from lightning_paged.core.fingerprint import CheckpointMismatchError

OPTIMIZER_FIX = (
    "Build the optimizer over the trainable parameters after the conversion: in configure_optimizers "
    "([p for p in self.parameters() if p.requires_grad]), or with lightning_paged.PagedOptimizerMixin "
    "(CausalLMModule: --model.init_args.optimizer); a LightningCLI of your own needs "
    "auto_configure_optimizers=False, since its --optimizer is built over the model before the conversion"
)


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


def check_optimizers(optimizers: Sequence[torch.optim.Optimizer], model: nn.Module) -> str | None:
    """Refuse an optimizer that holds none of ``model``'s trainable parameters; say which no optimizer holds.

    ``model`` is the converted module. An optimizer without parameters (Lightning's stand-in when
    ``configure_optimizers`` returns none) is left alone. Raises :class:`UsageError` naming the cause
    and the fix; returns a warning when some trainable parameters are in no optimizer (they will not
    train), else None.
    """
    named = dict(model.named_parameters())
    trainable = {id(p): n for n, p in named.items() if p.requires_grad}
    frozen = {id(p) for p in named.values() if not p.requires_grad}
    held: set[int] = set()
    for optimizer in optimizers:
        params = [id(p) for group in optimizer.param_groups for p in group["params"]]
        if params and not any(p in trainable for p in params):
            foreign = sum(p not in frozen for p in params)
            what = (
                f"{foreign} parameters the converted model does not have (its weights before the conversion)"
                if foreign
                else f"only {len(params)} frozen parameters"
            )
            raise UsageError(
                f"The optimizer {type(optimizer).__name__} holds none of the model's {len(trainable)} trainable "
                f"adapter parameters but {what}: training would change nothing. {OPTIMIZER_FIX}"
            )
        held.update(params)
    missing = [name for ident, name in trainable.items() if ident not in held]
    if not missing or not held:
        return None
    return (
        f"{len(missing)} of the model's {len(trainable)} trainable adapter parameters are in no optimizer "
        f"(first: {missing[0]}) and will not train. {OPTIMIZER_FIX}"
    )
