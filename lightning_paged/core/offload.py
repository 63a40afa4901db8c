"""Activation offloading: tensors saved for the backward pass wait in (pinned) host memory instead of the device.

With gradient checkpointing, what a long sequence still keeps on the device between the forward
and the backward pass is each checkpointed layer's input: ``layers x sequence x hidden`` values
(transformers#48444 counts 36 GB of them for Qwen3-8B at 128k tokens). :class:`ActivationOffload`
is a pair of saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``): when autograd saves a
tensor that lives on an accelerator, the hooks copy it to host memory (pinned, so the copies are
asynchronous) and copy it back when the backward pass needs it. It is torch's ``save_on_cpu``
(``torch/autograd/graph.py``) with three differences:

- it pins only where a pinned allocator exists: ``save_on_cpu(pin_memory=True, device_type="cpu")``
  asks for pinned memory on a CPU-only torch and raises ("pin_memory=True requires a CUDA or other
  accelerator backend"), and so does transformers 5.25's ``activation_checkpointing_enable(offload=True)``
  (``modeling_utils.py``, ``_activation_checkpointing_enable``), which uses it with the device type
  ``"cpu"`` when no accelerator is present;
- it leaves parameters (and views of them) and tensors under ``min_bytes`` where they are;
- it counts what it moved (:class:`OffloadStats`), so a run can show it.

:func:`enable_activation_offload` scopes the hooks to the checkpointed layers' inputs of a
transformers model, the way transformers does: each checkpoint call runs under the hooks, so what a
checkpoint saves (its inputs) goes to the host, and what the layer computes inside is recomputed as
before. For any other module, run the forward pass under ``ActivationOffload()``: every tensor saved
outside a checkpointed region then waits on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.torch import view_base
from lightning_paged.core.compat.transformers import set_checkpoint_function

MIN_OFFLOAD_BYTES = 1 << 20
"""Saved tensors smaller than this stay where they are: their copy costs more than their room."""

HOST = "cpu"


@dataclass
class OffloadStats:
    """What :class:`ActivationOffload` moved since it was made (summed over every forward pass)."""

    offloaded_tensors: int = 0
    """Tensors copied to host memory."""
    offloaded_bytes: int = 0
    """Their size."""
    restored_tensors: int = 0
    """Tensors copied back for a backward pass."""
    kept_tensors: int = 0
    """Saved tensors left where they were (on the host already, parameters, smaller than ``min_bytes``)."""


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep activations on the host from the forward to the backward pass.

    Args:
        min_bytes: Tensors smaller than this stay where they are.
        devices: Device types whose tensors move to the host; by default every type but the host's.
            Naming ``"cpu"`` makes host tensors move too (each copied into a fresh host buffer and
            back), which is how the hooks are exercised on a machine without an accelerator.
        stats: Where to count what moved; one is made when None.
    """

    def __init__(
        self,
        min_bytes: int = MIN_OFFLOAD_BYTES,
        devices: Sequence[str] | None = None,
        stats: OffloadStats | None = None,
    ) -> None:
        self.min_bytes = min_bytes
        self.devices = None if devices is None else tuple(devices)
        self.stats = stats if stats is not None else OffloadStats()
        super().__init__(self._pack, self._unpack)

    def moves(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``, saved for backward, goes to the host."""
        kind = tensor.device.type
        if (kind == HOST or kind == "meta") if self.devices is None else kind not in self.devices:
            return False
        if isinstance(view_base(tensor), nn.Parameter) or tensor.is_sparse:
            return False
        return tensor.numel() * tensor.element_size() >= self.min_bytes

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self.moves(tensor):
            self.stats.kept_tensors += 1
            return tensor
        pinned = tensor.device.type == "cuda"  # CUDA tensors: a pinned allocator exists, copies can overlap
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pinned)
        host.copy_(tensor, non_blocking=pinned)
        self.stats.offloaded_tensors += 1
        self.stats.offloaded_bytes += host.numel() * host.element_size()
        return _Offloaded(tensor.device, host, pinned)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Offloaded):
            return packed
        self.stats.restored_tensors += 1
        return packed.host.to(packed.device, non_blocking=packed.pinned)


@dataclass(frozen=True)
class _Offloaded:
    device: torch.device
    host: torch.Tensor
    pinned: bool


def offloading(checkpoint: Callable[..., Any], hooks: ActivationOffload) -> Callable[..., Any]:
    """``checkpoint`` with every call run under ``hooks``: the checkpoint's saved inputs go to the host."""

    @functools.wraps(checkpoint)
    def checkpoint_offloaded(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with hooks:
            return checkpoint(function, *args, **kwargs)

    return checkpoint_offloaded


def enable_activation_offload(
    model: nn.Module,
    min_bytes: int = MIN_OFFLOAD_BYTES,
    devices: Sequence[str] | None = None,
    hooks: ActivationOffload | None = None,
) -> OffloadStats | None:
    """Offload the checkpointed layers' inputs of a transformers model; None where it has no checkpointing.

    Gradient checkpointing must be on (non-reentrant) already; it stays on, each checkpoint call now
    under :class:`ActivationOffload`, installed with the model's own ``_set_gradient_checkpointing``,
    where transformers installs its checkpoint function (replacing one installed before). ``hooks``:
    the hooks to install instead of ``ActivationOffload(min_bytes, devices)`` (the memory plan's own).
    Returns the counts of what moves.
    """
    from torch.utils.checkpoint import checkpoint

    if not is_checkpointing(model):
        return None
    hooks = hooks if hooks is not None else ActivationOffload(min_bytes=min_bytes, devices=devices)
    function = offloading(functools.partial(checkpoint, use_reentrant=False), hooks)
    if not set_checkpoint_function(model, function):
        return None
    return hooks.stats


def is_checkpointing(model: nn.Module) -> bool:
    """Whether some layer of ``model`` runs under gradient checkpointing (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
