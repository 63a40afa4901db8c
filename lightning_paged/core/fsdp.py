"""Sharding a converted QLoRA model with FSDP2 and stepping bitsandbytes optimizers on the shards.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns every parameter into a ``DTensor`` sharded on
dim 0 across a device mesh: the packed 4-bit base weights (frozen) and the LoRA adapters
(trainable) alike. Three things make that work for QLoRA with paged optimizers:

* the packed weights are stored in a floating dtype (``quant_storage`` equal to the compute dtype,
  :func:`sharding_storage`), so every sharding path treats them as ordinary floating parameters;
  their quantization constants (``quant_state``) are not parameters and stay whole on every rank,
  where ``Linear4bit`` finds them again on its module after FSDP re-creates the parameter;
* each repeated block (decoder layer) and the root are sharded (:func:`find_blocks`,
  :func:`shard_model`), so one block's weights are gathered at a time;
* bitsandbytes kernels take plain tensors, not ``DTensor``: :func:`shard_optimizer` makes a
  bitsandbytes optimizer step each parameter's local shard with its gradient's local shard, its
  state allocated (and paged) through the optimizer's paging policy as anywhere else.

Checkpoints stay independent of the world size: :func:`gathered_optimizer_state` assembles on rank
zero the state a single process would hold, and :func:`load_gathered_optimizer_state` cuts every
rank's part out of it. Framework-free: the Lightning strategy and the Fabric plugin call these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import CheckpointMismatchError
from lightning_paged.core.layers4bit import DTYPES, linear4bit_layers, quantized_weight_bytes
from lightning_paged.core.paging import is_bitsandbytes_optimizer
from lightning_paged.core.units import format_bytes

BLOCKSIZE_8BIT = 256
"""Elements per block of bitsandbytes' 8-bit blockwise optimizer state (``optimizer.py`` ``init_state``)."""
_WRAPPED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict() nests its state tensors
_SHARD_NUMELS = "fsdp_shard_numels"


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
    declared = set(getattr(model, "_no_split_modules", None) or [])
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


def _local(tensor: torch.Tensor) -> torch.Tensor:
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
    local_packed = sum(_local(layer.weight).numel() * layer.weight.element_size() for layer in layers)
    return ShardReport(
        block_class=kind,
        blocks=len(blocks),
        world_size=mesh.size(),
        local_packed_bytes=local_packed,
        total_packed_bytes=total_packed,
        quant_state_bytes=constants,
    )


# ---------------------------------------------------------------------------------------------
# Optimizers on local shards


def _refuse_whole_tensor_algorithms(optimizer: torch.optim.Optimizer) -> None:
    args = getattr(optimizer, "args", None)
    name = type(optimizer).__name__
    if args is not None and getattr(args, "max_unorm", 0.0) > 0.0:
        raise SettingError(
            "name",
            name,
            "cannot step on FSDP shards: it scales each update by the norm of the whole parameter "
            "(LAMB/LARS trust ratio, max_unorm), which a shard does not have. Choose an elementwise "
            "algorithm such as paged_adamw_8bit, paged_lion_8bit or paged_ademamix_8bit",
        )
    if args is not None and getattr(args, "percentile_clipping", 100) < 100:
        raise SettingError(
            "percentile_clipping",
            args.percentile_clipping,
            f"cannot be used with {name} on FSDP shards: it clips by the norm of the whole gradient; leave it at 100",
        )


def _sharded_get_config(original: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def get_config(self: Any, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        config = original(gindex, pindex, group)
        full = self.fsdp_full_numel.get(id(group["params"][pindex]))
        if full is not None and full >= config["min_8bit_size"]:
            config["min_8bit_size"] = 0  # 8-bit or not by the whole parameter, as without sharding
        return config

    return get_config


def _sync_shards(self: Any) -> None:
    """Point each local proxy at its parameter's local shard and give it the local gradient."""
    for proxy, param in self.fsdp_shards:
        local = _local(param.data)
        if proxy.data_ptr() != local.data_ptr() or proxy.shape != local.shape:
            proxy.data = local  # FSDP re-created the shard (a load or a device move)
        grad = param.grad
        proxy.grad = None if grad is None else _local(grad)


def _sharded_step(original: Callable[..., Any]) -> Callable[..., Any]:
    def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _sync_shards(self)
        original()
        # The step consumes the gradients: wrappers that imitate the optimizer's class (Fabric's,
        # Lightning's) call the class's zero_grad, which only sees the proxies.
        _sharded_zero_grad(self)
        return loss

    return step


def _sharded_zero_grad(self: Any, set_to_none: bool = True) -> None:
    for proxy, param in self.fsdp_shards:
        proxy.grad = None
        if param.grad is not None:
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()


def shard_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Make a bitsandbytes optimizer over FSDP2 parameters step on their local shards, in place.

    Each ``DTensor`` parameter in its groups is replaced by a plain parameter sharing the local
    shard's memory; ``step`` runs the closure, hands each proxy its gradient's local shard and runs
    bitsandbytes' update, whose state (created at the first step) comes from the optimizer's paging
    policy like anywhere else; the step then clears the gradients (as ``zero_grad`` would), since
    wrappers that imitate the optimizer's class reach only the proxies with their ``zero_grad``.
    Whether a parameter gets 8-bit state is decided by its whole size, as without sharding. Optimizers that are not bitsandbytes' (``torch.optim.AdamW``) step DTensors
    themselves and are left alone (returns False). Algorithms that need a whole-parameter norm
    (LAMB, LARS) are refused by name.
    """
    from torch.distributed.tensor import DTensor

    if not is_bitsandbytes_optimizer(optimizer):
        return False
    if getattr(optimizer, "fsdp_shards", None) is not None:
        return True
    _refuse_whole_tensor_algorithms(optimizer)
    if any(len(state) for state in optimizer.state.values()):
        raise RuntimeError("shard_optimizer must run before the optimizer's first step")
    shards: list[tuple[nn.Parameter, torch.Tensor]] = []
    full_numel: dict[int, int] = {}
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            if isinstance(param, DTensor):
                proxy = nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)
                shards.append((proxy, param))
                full_numel[id(proxy)] = param.numel()
                params.append(proxy)
            else:
                params.append(param)
        group["params"] = params
    optimizer.fsdp_shards = shards  # type: ignore[attr-defined]
    optimizer.fsdp_full_numel = full_numel  # type: ignore[attr-defined]
    optimizer.get_config = MethodType(_sharded_get_config(optimizer.get_config), optimizer)  # type: ignore[attr-defined]
    optimizer.step = MethodType(_sharded_step(optimizer.step), optimizer)  # type: ignore[method-assign]
    optimizer.zero_grad = MethodType(_sharded_zero_grad, optimizer)  # type: ignore[method-assign]
    return True


def model_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters as the model holds them: the sharded ones for an optimizer :func:`shard_optimizer` changed.

    Gradient clipping must see these (their gradients are sharded tensors whose norm is the global
    one); the optimizer's own groups hold local proxies, whose gradients exist only during the step.
    """
    optimizer = getattr(optimizer, "_optimizer", optimizer)  # Lightning's and Fabric's wrappers
    shards = getattr(optimizer, "fsdp_shards", None)
    if shards is None:
        return [p for group in optimizer.param_groups for p in group["params"]]
    local = {id(proxy) for proxy, _ in shards}
    plain = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in local]
    return [param for _, param in shards] + plain


# ---------------------------------------------------------------------------------------------
# World-size-independent optimizer state


def _unwrap(state: Mapping[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in state.items() if k != _WRAPPED}
    flat.update(state.get(_WRAPPED, {}))
    return flat


def _wrap(state: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    keys: set[str] = getattr(optimizer, "non_castable_tensor_keys", set())
    out = {k: v for k, v in state.items() if k not in keys}
    nested = {k: v for k, v in state.items() if k in keys}
    if nested:
        out[_WRAPPED] = nested
    return out


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _is_elementwise(key: str, value: Any, param: torch.Tensor) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and key in ("state1", "state2")
        and value.shape[-param.dim() :] == param.shape
    )


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state a single process would hold, assembled on rank zero (every rank must call it).

    The per-element state of each parameter is concatenated along dim 0 in rank order, which is
    how FSDP2 shards; 8-bit block maxima are concatenated too and the shard sizes recorded, so
    the state can be cut again for another world size. Other ranks get an empty dict.
    """
    local = optimizer.state_dict()
    shards = getattr(optimizer, "fsdp_shards", None)
    if shards is None or not (dist.is_available() and dist.is_initialized()):
        return local
    params = _flat_params(optimizer)
    mine = {
        index: {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in _unwrap(state).items()}
        for index, state in local["state"].items()
    }
    numels = [p.numel() for p in params]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((mine, numels), gathered, dst=0)
    if gathered is None:
        return {}
    state: dict[int, Any] = {}
    shard_numels: dict[int, list[int]] = {}
    for index, param in enumerate(params):
        parts = [rank_state.get(index) for rank_state, _ in gathered]
        present = [part for part in parts if part]
        if not present:
            continue
        merged = dict(present[0])
        for key, value in present[0].items():
            if _is_elementwise(key, value, param) or key in ("absmax1", "absmax2"):
                merged[key] = torch.cat([part[key] for part in present])
        state[index] = _wrap(merged, optimizer)
        shard_numels[index] = [rank_numels[index] for _, rank_numels in gathered]
    return {"state": state, "param_groups": local["param_groups"], _SHARD_NUMELS: shard_numels}


def _boundaries(numels: Sequence[int]) -> list[int]:
    edges, total = [], 0
    for n in numels[:-1]:
        total += n
        edges.append(total)
    return edges


def _cut_blocks(
    full: torch.Tensor, saved: Sequence[int], wanted: Sequence[int], rank: int, where: str
) -> torch.Tensor:
    """This rank's block maxima, from those of the saved shards (``saved`` and ``wanted``: shard numels)."""
    if list(saved) != list(wanted) and any(
        edge % BLOCKSIZE_8BIT for edge in [*_boundaries(saved), *_boundaries(wanted)] if edge < sum(saved)
    ):
        raise CheckpointMismatchError(
            f"The checkpoint's 8-bit optimizer state of {where} was written with {len(saved)} shards whose "
            f"blocks of {BLOCKSIZE_8BIT} elements do not line up with {len(wanted)} shards; resume with "
            f"{len(saved)} processes, or train with a 32-bit optimizer name to resume at any world size"
        )
    layout = saved if list(saved) == list(wanted) else wanted
    counts = [-(-n // BLOCKSIZE_8BIT) for n in layout]
    start = sum(counts[:rank])
    return full[start : start + counts[rank]].clone()


def load_gathered_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Load state saved by :func:`gathered_optimizer_state` (or by one process), at any world size.

    Every rank needs the whole ``state_dict``; each keeps its own shard. Loaded state is ordinary
    memory: re-page it afterwards (:func:`~lightning_paged.core.paging.repage_optimizer_state`).
    """
    shards = getattr(optimizer, "fsdp_shards", None)
    if shards is None:
        optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != _SHARD_NUMELS})
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    full_of = {id(proxy): param for proxy, param in shards}
    params = _flat_params(optimizer)
    saved_numels = state_dict.get(_SHARD_NUMELS, {})
    local_state: dict[int, Any] = {}
    for index, saved in state_dict["state"].items():
        proxy = params[index]
        full_param = full_of.get(id(proxy))
        flat = _unwrap(saved)
        if full_param is None:
            local_state[index] = saved
            continue
        rows = torch.chunk(torch.empty(full_param.shape[0], 0), world)
        wanted = [len(r) * (full_param.numel() // max(full_param.shape[0], 1)) for r in rows]
        wanted += [0] * (world - len(wanted))
        cut: dict[str, Any] = {}
        for key, value in flat.items():
            if _is_elementwise(key, value, full_param):
                parts = torch.chunk(value, world, dim=value.dim() - full_param.dim())
                cut[key] = parts[rank].clone() if rank < len(parts) else value[:0].clone()
                if cut[key].shape[-proxy.dim() :] != proxy.shape:
                    raise CheckpointMismatchError(
                        f"The checkpoint's optimizer state {key} of parameter {index} has shape "
                        f"{tuple(value.shape)}, which does not fit this model's parameter {tuple(full_param.shape)}"
                    )
            elif key in ("absmax1", "absmax2"):
                numels = saved_numels.get(index, [full_param.numel()])
                cut[key] = _cut_blocks(value, numels, wanted, rank, f"parameter {index}")
            else:
                cut[key] = value
        local_state[index] = _wrap(cut, optimizer)
    optimizer.load_state_dict({"state": local_state, "param_groups": state_dict["param_groups"]})


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
