"""bitsandbytes optimizers stepping FSDP2 shards, and their world-size-independent state.

bitsandbytes kernels take plain tensors, not ``DTensor``: :func:`shard_optimizer` makes a
bitsandbytes optimizer step each parameter's local shard with its gradient's local shard, its
state allocated (and paged) through the optimizer's paging policy as anywhere else.

Checkpoints stay independent of the world size: :func:`gathered_optimizer_state` assembles on rank
zero the state a single process would hold, and :func:`load_gathered_optimizer_state` cuts every
rank's part out of it. Framework-free: the Lightning strategy and the Fabric plugin call these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import CheckpointMismatchError
from lightning_paged.core.fsdp import local_tensor
from lightning_paged.core.paging import is_bitsandbytes_optimizer

BLOCKSIZE_8BIT = 256
"""Elements per block of bitsandbytes' 8-bit blockwise optimizer state (``optimizer.py`` ``init_state``)."""
_WRAPPED = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict() nests its state tensors
_SHARD_NUMELS = "fsdp_shard_numels"


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
        local = local_tensor(param.data)
        if proxy.data_ptr() != local.data_ptr() or proxy.shape != local.shape:
            proxy.data = local  # FSDP re-created the shard (a load or a device move)
        grad = param.grad
        proxy.grad = None if grad is None else local_tensor(grad)


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
    for proxy, _ in self.fsdp_shards:
        proxy.grad = None
    for param in self.fsdp_params:  # the sharded parameters, those of an empty shard here included
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
    Whether a parameter gets 8-bit state is decided by its whole size, as without sharding.

    A parameter of which this rank holds no piece (FSDP cuts dim 0 with ``torch.chunk``, so a LoRA
    matrix of rank 8 leaves ranks 5 and up of 6 or more empty) gets no proxy at all: bitsandbytes'
    CUDA update on zero elements fails and ends the process. The optimizer's groups then list fewer
    parameters on that rank; :func:`gathered_optimizer_state` and :func:`load_gathered_optimizer_state`
    index the state by each parameter's place in the original groups, the same on every rank.

    Optimizers that are not bitsandbytes' (``torch.optim.AdamW``) step DTensors themselves and are
    left alone (returns False). Algorithms that need a whole-parameter norm (LAMB, LARS) are refused
    by name.
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
    originals: list[torch.Tensor] = []
    layout: list[list[int]] = []
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        params, kept = [], []
        for param in group["params"]:
            originals.append(param)
            if isinstance(param, DTensor):
                local = param.to_local()
                if local.numel() == 0:
                    continue  # nothing of it here: never handed to bitsandbytes
                proxy = nn.Parameter(local.detach(), requires_grad=param.requires_grad)
                shards.append((proxy, param))
                full_numel[id(proxy)] = param.numel()
                param = proxy
            params.append(param)
            kept.append(len(originals) - 1)
        group["params"] = params
        layout.append(kept)
    optimizer.fsdp_shards = shards  # type: ignore[attr-defined]
    optimizer.fsdp_full_numel = full_numel  # type: ignore[attr-defined]
    optimizer.fsdp_params = originals  # type: ignore[attr-defined]
    """Every parameter of the groups as the model holds it, in the groups' order (the same on every rank)."""
    optimizer.fsdp_layout = layout  # type: ignore[attr-defined]
    """For each group, the places in ``fsdp_params`` of the parameters it still lists on this rank."""
    optimizer.fsdp_group_sizes = sizes  # type: ignore[attr-defined]
    optimizer.get_config = MethodType(_sharded_get_config(optimizer.get_config), optimizer)  # type: ignore[attr-defined]
    optimizer.step = MethodType(_sharded_step(optimizer.step), optimizer)  # type: ignore[method-assign]
    optimizer.zero_grad = MethodType(_sharded_zero_grad, optimizer)  # type: ignore[method-assign]
    return True


def model_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters as the model holds them: the sharded ones for an optimizer :func:`shard_optimizer` changed.

    Gradient clipping and the token-weighted rescale must see these (their gradients are sharded
    tensors whose norm is the global one); the optimizer's own groups hold local proxies, whose
    gradients exist only during the step. The order is the groups' own, the same on every rank
    (a norm over sharded tensors is a collective), whether or not this rank holds a piece of each.
    """
    inner = getattr(optimizer, "optimizer", None)  # Lightning's, Fabric's and Accelerate's wrappers
    optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
    originals = getattr(optimizer, "fsdp_params", None)
    if originals is None:
        return [p for group in optimizer.param_groups for p in group["params"]]
    return list(originals)


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


def _state_axis(key: str, value: Any, shape: Sequence[int]) -> int | None:
    """The axis of ``value`` that runs along dim 0 of a parameter of ``shape`` (the sharded one), or None.

    Per-element state is shaped like the parameter, or like ``(2, *shape)`` for AdEMAMix's two
    moving averages in one buffer (bitsandbytes ``optim/ademamix.py``, ``init_state``): its axis is 1.
    8-bit block maxima (``absmax1``, ``absmax2``) run along their last axis, AdEMAMix's ``absmax1``
    being ``(2, blocks)``. Anything else (step, code tables) is the same whole on every rank.
    """
    if not isinstance(value, torch.Tensor):
        return None
    if key in ("absmax1", "absmax2"):
        return value.dim() - 1
    lead = value.dim() - len(shape)
    if key in ("state1", "state2") and lead >= 0 and tuple(value.shape[lead + 1 :]) == tuple(shape[1:]):
        return lead
    return None


def _global_index(optimizer: torch.optim.Optimizer) -> list[int]:
    """For each parameter the groups list on this rank, its place in the original groups."""
    layout = getattr(optimizer, "fsdp_layout", None)
    if layout is None:
        return list(range(sum(len(group["params"]) for group in optimizer.param_groups)))
    return [index for group in layout for index in group]


def gathered_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state a single process would hold, assembled on rank zero (every rank must call it).

    The per-element state of each sharded parameter is concatenated in rank order along the axis
    that runs along the parameter's dim 0, which is how FSDP2 shards; 8-bit block maxima are
    concatenated too and the shard sizes recorded, so the state can be cut again for another world
    size. States are indexed by each parameter's place in the original groups (a rank with an empty
    shard of a parameter holds no state for it). Other ranks get an empty dict.
    """
    local = optimizer.state_dict()
    shards = getattr(optimizer, "fsdp_shards", None)
    if shards is None or not (dist.is_available() and dist.is_initialized()):
        return local
    originals: list[Any] = optimizer.fsdp_params  # type: ignore[attr-defined]
    places = _global_index(optimizer)
    mine = {
        places[index]: {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in _unwrap(state).items()}
        for index, state in local["state"].items()
    }
    numels = [local_tensor(p).numel() for p in originals]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((mine, numels), gathered, dst=0)
    if gathered is None:
        return {}
    from torch.distributed.tensor import DTensor

    state: dict[int, Any] = {}
    shard_numels: dict[int, list[int]] = {}
    for index, param in enumerate(originals):
        present = [part for part in (rank_state.get(index) for rank_state, _ in gathered) if part]
        if not present:
            continue
        merged = dict(present[0])
        if isinstance(param, DTensor):
            for key, value in present[0].items():
                axis = _state_axis(key, value, param.shape)
                if axis is not None:
                    merged[key] = torch.cat([part[key] for part in present], dim=axis)
            shard_numels[index] = [rank_numels[index] for _, rank_numels in gathered]
        state[index] = _wrap(merged, optimizer)
    groups = [
        {**group, "params": list(indices)}
        for group, indices in zip(local["param_groups"], _group_places(optimizer))
    ]
    return {"state": state, "param_groups": groups, _SHARD_NUMELS: shard_numels}


def _group_places(optimizer: torch.optim.Optimizer) -> list[range]:
    """Each group's places in the original groups (what its ``params`` list held before sharding)."""
    sizes = getattr(optimizer, "fsdp_group_sizes", None)
    if sizes is None:
        sizes = [len(group["params"]) for group in optimizer.param_groups]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


def _boundaries(numels: Sequence[int]) -> list[int]:
    edges, total = [], 0
    for n in numels[:-1]:
        total += n
        edges.append(total)
    return edges


def _cut_blocks(
    full: torch.Tensor, saved: Sequence[int], wanted: Sequence[int], rank: int, where: str
) -> torch.Tensor:
    """This rank's block maxima (along the last axis), from those of the saved shards (``saved`` and
    ``wanted``: shard numels)."""
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
    return full.narrow(-1, start, counts[rank]).clone()


def load_gathered_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Load state saved by :func:`gathered_optimizer_state` (or by one process), at any world size.

    Every rank needs the whole ``state_dict``; each keeps its own shard (and nothing of a parameter
    it holds no piece of). Loaded state is ordinary memory: re-page it afterwards
    (:func:`~lightning_paged.core.paging.repage_optimizer_state`).
    """
    shards = getattr(optimizer, "fsdp_shards", None)
    if shards is None:
        optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != _SHARD_NUMELS})
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    full_of = {id(proxy): param for proxy, param in shards}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local_of = {place: index for index, place in enumerate(_global_index(optimizer))}
    saved_numels = state_dict.get(_SHARD_NUMELS, {})
    local_state: dict[int, Any] = {}
    for place, saved in state_dict["state"].items():
        index = local_of.get(int(place))
        if index is None:
            continue  # a parameter this rank holds no piece of
        proxy = params[index]
        full_param = full_of.get(id(proxy))
        if full_param is None:
            local_state[index] = saved
            continue
        rows = torch.chunk(torch.empty(full_param.shape[0], 0), world)
        wanted = [len(r) * (full_param.numel() // max(full_param.shape[0], 1)) for r in rows]
        wanted += [0] * (world - len(wanted))
        cut: dict[str, Any] = {}
        for key, value in _unwrap(saved).items():
            axis = _state_axis(key, value, full_param.shape)
            if axis is None:
                cut[key] = value
            elif key in ("absmax1", "absmax2"):
                numels = saved_numels.get(place, [full_param.numel()])
                cut[key] = _cut_blocks(value, numels, wanted, rank, f"parameter {place}")
            else:
                parts = torch.chunk(value, world, dim=axis)
                cut[key] = parts[rank].clone()
                if tuple(cut[key].shape[axis:]) != tuple(proxy.shape):
                    raise CheckpointMismatchError(
                        f"The checkpoint's optimizer state {key} of parameter {place} has shape "
                        f"{tuple(value.shape)}, which does not fit this model's parameter {tuple(full_param.shape)}"
                    )
        local_state[index] = _wrap(cut, optimizer)
    groups = []
    for group, kept in zip(state_dict["param_groups"], optimizer.fsdp_layout):  # type: ignore[attr-defined]
        groups.append({**group, "params": [local_of[place] for place in kept]})
    optimizer.load_state_dict({"state": local_state, "param_groups": groups})
