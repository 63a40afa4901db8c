"""Sharding a converted QLoRA model with FSDP2.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` sharded on
dim 0 across a device mesh: the packed 4-bit base weights (frozen) and the LoRA adapters
(trainable) alike. Two things make that work for QLoRA:

* the packed weights are stored in a floating dtype (``quant_storage`` equal to the compute dtype,
  :func:`sharding_storage`), so every sharding path treats them as ordinary floating parameters;
  their quantization constants (``quant_state``) are not parameters and stay whole on every rank,
  where ``Linear4bit`` finds them again on its module after FSDP re-creates the parameter;
* each repeated block (decoder layer) and the root are sharded (:func:`find_blocks`), so one block's
  weights are gathered at a time: :func:`shard_model` shards a model converted already, and the
  strategies convert and shard one block at a time
  (:func:`~lightning_paged.core.fsdp_load.convert_and_shard`), so no rank holds the whole model.

:func:`gather_full` and :func:`distribute_like` turn sharded adapter weights into whole tensors for
a checkpoint and back. The optimizer side is :mod:`lightning_paged.core.fsdp_optimizer`.
Framework-free: the Lightning strategy and the Fabric plugin call these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_paged.core.compat.transformers import no_split_modules
from lightning_paged.core.errors import SettingError
from lightning_paged.core.layers4bit import DTYPES, linear4bit_layers, quantized_weight_bytes
from lightning_paged.core.units import format_bytes

STRATEGY_DESCRIPTION = "NF4 QLoRA (bitsandbytes 4-bit + PEFT LoRA), sharded with FSDP2, paged optimizer state"
"""How the Lightning and Fabric ``paged_qlora_fsdp`` strategies describe themselves in their registries."""


def sharding_storage(quant_storage: str | None, compute_dtype: str) -> str:
    """The ``quant_storage`` to quantize with before sharding: ``None`` takes ``compute_dtype``.

    ``uint8`` is refused: sharding wrappers flatten, cast and reduce parameters by floating dtype,
    and a byte tensor beside the floating weights is either refused or, worse, reinterpreted so that
    training runs with a wrong model (a loss of 0 or noise) and no error.
    """
    if quant_storage is None:
        return compute_dtype
    if quant_storage not in DTYPES:
        raise SettingError(
            "quant_storage",
            quant_storage,
            "must be a floating type under FSDP (bfloat16, float16 or float32; leave it unset to take "
            f"compute_dtype={compute_dtype!r}): FSDP shards the packed 4-bit weights as ordinary floating "
            "parameters, and byte storage beside floating weights is refused or silently trains a wrong "
            "model with some FSDP versions",
        )
    return quant_storage


def check_world_size(world: int, setting: str) -> None:
    """Refuse one process: there is nothing to shard across (``setting`` is where the user sets it)."""
    if world < 2:
        raise SettingError(
            setting,
            world,
            "is one process, and paged_qlora_fsdp shards the model across two or more; "
            "use strategy='paged_qlora' on one device, or set devices (and num_nodes) to 2 or more",
        )


def check_precision(precision: str | None, setting: str) -> None:
    """Refuse float16 AMP (``"16-mixed"``): its gradient scaler cannot see the gradients FSDP shards.

    torch's ``GradScaler.step`` unscales and checks for inf the gradients it finds in the optimizer's
    groups (``torch/amp/grad_scaler.py``, ``unscale_``/``step``); under FSDP those groups hold the
    local proxies, which get their gradients only inside the step, so the first step fails with
    "No inf checks were recorded for this optimizer". Lightning refuses it for a strategy instance
    only; a strategy given by name reaches the first step. ``setting`` is where the user sets it.
    """
    if precision in ("16-mixed", "16"):
        raise SettingError(
            setting,
            precision,
            "cannot be used with paged_qlora_fsdp: float16 mixed precision scales the gradients, and its "
            "scaler cannot see the sharded gradients the optimizer steps; use 'bf16-mixed' or '32-true' "
            "(4-bit matmuls run in the strategy's compute_dtype, which may be float16)",
        )


def _block_candidates(model: nn.Module) -> list[tuple[str, str]]:
    """(ModuleList name, class name) of every ModuleList of two or more modules of one class, largest first."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            kinds = {type(child).__name__ for child in module}
            if len(kinds) == 1:
                found.append((len(module), name, kinds.pop()))
    return [(name, kind) for _, name, kind in sorted(found, key=lambda item: -item[0])]


def find_blocks(model: nn.Module, block_class: str | None = None) -> list[nn.Module]:
    """The repeated blocks to shard one by one (the decoder layers of a transformer).

    The rule: ``block_class`` names the class (its ``__name__``); without it, the classes in the
    model's ``_no_split_modules`` (transformers declares its decoder layer there); without those,
    the class of the largest ``nn.ModuleList`` of two or more modules of one class.
    """
    if block_class is not None:
        blocks = [m for m in model.modules() if type(m).__name__ == block_class]
        if not blocks:
            found = ", ".join(kind for _, kind in _block_candidates(model)) or "none"
            raise SettingError(
                "block_class",
                block_class,
                f"names no module class of {type(model).__name__}; repeated block classes found: {found}",
            )
        return blocks
    declared = no_split_modules(model)
    blocks = [m for m in model.modules() if type(m).__name__ in declared]
    if blocks:
        return blocks
    candidates = _block_candidates(model)
    if candidates:
        name, _ = candidates[0]
        return list(model.get_submodule(name).children())
    raise SettingError(
        "block_class",
        None,
        f"is needed: {type(model).__name__} has no repeated blocks to shard (looked for the classes in its "
        "_no_split_modules and for an nn.ModuleList of two or more modules of one class); set it to the "
        "class name of the model's repeated layer, such as LlamaDecoderLayer",
    )


@dataclass
class ShardReport:
    """What :func:`shard_model` sharded, and the bytes this rank holds of the 4-bit base weights."""

    block_class: str
    blocks: int
    world_size: int
    local_packed_bytes: int
    """Packed 4-bit data this rank holds (its shards)."""
    total_packed_bytes: int
    """Packed 4-bit data of the whole model."""
    quant_state_bytes: int
    """Quantization constants (absmax), which every rank holds whole."""

    def summary(self) -> str:
        return (
            f"FSDP: {self.blocks} {self.block_class} blocks and the root sharded over {self.world_size} "
            f"ranks; this rank holds {format_bytes(self.local_packed_bytes)} of "
            f"{format_bytes(self.total_packed_bytes)} packed 4-bit weights, plus "
            f"{format_bytes(self.quant_state_bytes)} of quantization constants kept whole on every rank"
        )


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_model(
    model: nn.Module,
    mesh: Any,
    *,
    block_class: str | None = None,
    reshard_after_forward: bool = True,
) -> ShardReport:
    """Apply ``fully_shard`` to each repeated block of a converted model, then to the model itself.

    ``mesh`` is a one-dimensional device mesh (``init_device_mesh``). No mixed-precision policy is
    given: parameters keep their dtypes (a cast of the packed weights would corrupt them). The
    trainable weights are first broadcast from the mesh's first rank: each rank initialised its
    adapters from its own random state, and FSDP keeps each rank's piece as it finds it.
    """
    from torch.distributed.fsdp import fully_shard

    layers: list[Any] = linear4bit_layers(model)
    storage = {layer.weight.dtype for layer in layers}
    if any(not dtype.is_floating_point for dtype in storage):
        raise SettingError(
            "quant_storage",
            "uint8",
            "must be a floating type to shard 4-bit weights (convert with quant_storage equal to compute_dtype)",
        )
    total_packed = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
    constants = sum(quantized_weight_bytes(layer) for layer in layers) - total_packed
    blocks = find_blocks(model, block_class)
    kind = type(blocks[0]).__name__
    if mesh.size() > 1:
        group, source = mesh.get_group(), mesh.mesh.flatten()[0].item()
        for param in model.parameters():
            if param.requires_grad:
                dist.broadcast(param.data, src=source, group=group)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    local_packed = sum(local_tensor(layer.weight).numel() * layer.weight.element_size() for layer in layers)
    return ShardReport(
        block_class=kind,
        blocks=len(blocks),
        world_size=mesh.size(),
        local_packed_bytes=local_packed,
        total_packed_bytes=total_packed,
        quant_state_bytes=constants,
    )


def gather_full(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors on the host from sharded ones (every rank must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu() for name, t in named.items()
    }


def distribute_like(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Whole tensors (adapter weights) as shards placed like ``module``'s sharded parameters.

    Every rank holds the whole tensors and keeps its own piece; no communication. Keys that name
    no sharded parameter are returned as they are.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = dict(module.named_parameters())
    out: dict[str, Any] = {}
    for name, value in state.items():
        param = own.get(name)
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            value = distribute_tensor(
                value.to(device=param.device, dtype=param.dtype),
                param.device_mesh,
                param.placements,
                src_data_rank=None,
            )
        out[name] = value
    return out
