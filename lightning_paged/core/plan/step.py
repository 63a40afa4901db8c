"""One training step under the counter: forward and loss, backward, optimizer step.

The same function measures a dry run (fake tensors) and a real run (the accuracy test and the
benchmark), so both are counted by one mechanism. The optimizer's state is made first, as its first
step makes it (from zero gradients), and held through the measured step, as in every step after the
first. With gradient accumulation two
micro-batches run before each optimizer step: from the second on, the gradients are live during the
forward pass too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_paged.core.paging import POOL_ALIGN, ManagedMemory
from lightning_paged.core.plan.counter import LiveBytes, Peak

StepLoss = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
"""The loss a training step backpropagates, from the model and a batch (the module's own, for a plan)."""

WEIGHTS_4BIT = "weights_4bit"
QUANT_CONSTANTS = "quant_constants"
WEIGHTS_OTHER = "weights_other"
LORA_WEIGHTS = "lora_weights"
LORA_GRADS = "lora_grads"
OPTIMIZER_PAGED = "optimizer_paged"
OPTIMIZER_UNPAGED = "optimizer_unpaged"
BATCH = "batch"
"""The batch's own tensors (planned with the activations)."""
PHASES = ("forward", "backward", "optimizer")


class PlanMemory(ManagedMemory):
    """Managed memory for a dry run: ordinary (fake) tensors marked paged, as a GPU with managed memory gives."""

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        self.allocations += 1
        self.allocated_bytes += nbytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        buffer.is_paged = True  # type: ignore[attr-defined]
        buffer.page_deviceid = 0  # type: ignore[attr-defined]
        return buffer

    def zero_(self, buffer: torch.Tensor) -> None:
        buffer.zero_()

    def prefetch(self, tensor: torch.Tensor) -> None:
        self.prefetches += 1


@dataclass
class StepMeasure:
    """What one measured training step held at the peak of each phase."""

    peaks: dict[str, Peak]
    paged_state_bytes: int
    """Bytes of optimizer state in paged buffers (what a GPU holds of them once touched)."""
    pooled_span_bytes: int
    """Of those, the span taken in the paging pool's slabs (each state aligned)."""
    trainable_params: int

    def peak(self) -> tuple[str, Peak]:
        """The phase with the highest peak, and that peak."""
        phase = max(self.peaks, key=lambda name: self.peaks[name].bytes)
        return phase, self.peaks[phase]


def track_model(model: nn.Module, counter: LiveBytes) -> None:
    """Count every weight, buffer and quantization constant of ``model`` under its category."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                counter.track(param, LORA_WEIGHTS)
            elif getattr(param, "quant_state", None) is not None:
                counter.track(param, WEIGHTS_4BIT)
                for tensor in _quant_state_tensors(getattr(param, "quant_state", None)):
                    counter.track(tensor, QUANT_CONSTANTS)
            else:
                counter.track(param, WEIGHTS_OTHER)
        for buffer in module.buffers(recurse=False):
            counter.track(buffer, WEIGHTS_OTHER)


def _quant_state_tensors(state: Any) -> list[torch.Tensor]:
    tensors = [getattr(state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += _quant_state_tensors(nested)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def track_optimizer(optimizer: torch.optim.Optimizer, counter: LiveBytes) -> tuple[int, int]:
    """Count the optimizer's state as paged or not.

    Returns the bytes of paged state, and of those the bytes carved from pool slabs, each rounded
    up to the pool's alignment (the span they take in their slabs).
    """
    paged = pooled = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            if not getattr(value, "is_paged", False):
                counter.track(value, OPTIMIZER_UNPAGED)
                continue
            counter.track(value, OPTIMIZER_PAGED)
            nbytes = value.numel() * value.element_size()
            paged += nbytes
            if value.untyped_storage().nbytes() != nbytes:  # a slice of a pool slab
                pooled += -(-nbytes // POOL_ALIGN) * POOL_ALIGN
    return paged, pooled


def measure_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: StepLoss,
    batch: Mapping[str, Any],
    counter: LiveBytes,
    micro_batches: int = 1,
    *,
    optimizer_step: bool = True,
) -> StepMeasure:
    """Measure a training step of ``micro_batches`` forward/backward passes under ``counter`` (entered).

    The optimizer's state is made first when it has none. ``optimizer_step=False`` leaves the
    optimizer step out (its peak does not depend on the batch; a planner measures it once).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(functools.partial(_track_grad, counter)) for p in trainable]
    hooks.append(_mark_loss_region(model, counter))
    try:
        track_model(model, counter)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                counter.track(value, BATCH)  # on the device in a real run
        if not optimizer.state:
            make_state(model, optimizer)
        paged, pooled = track_optimizer(optimizer, counter)
        counter.reset_peaks()
        _step(model, optimizer, step_loss, batch, counter, micro_batches, optimizer_step)
    finally:
        for hook in hooks:
            hook.remove()
    return StepMeasure(dict(counter.peaks), paged, pooled, sum(p.numel() for p in trainable))


def _mark_loss_region(model: nn.Module, counter: LiveBytes) -> Any:
    """From the moment the model's decoder returns, new storages are the loss's (logits and after).

    A hook on the decoder's output, not on the output layer: the chunked loss runs a bare output
    layer its own way only when nothing hooks it, and the plan must run what the run runs.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder.register_forward_hook(lambda *_: counter.enter_loss_region())
    output_embeddings = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    if isinstance(head, nn.Module):
        return head.register_forward_pre_hook(lambda *_: counter.enter_loss_region())
    return _NoHook()


class _NoHook:
    def remove(self) -> None:
        pass


def _track_grad(counter: LiveBytes, param: torch.Tensor) -> None:
    if param.grad is not None:
        counter.track(param.grad, LORA_GRADS)


def make_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer's state, as its first step creates it (from zero gradients: no forward pass needed)."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_loss: StepLoss,
    batch: Mapping[str, Any],
    counter: LiveBytes,
    micro_batches: int,
    optimizer_step: bool,
) -> None:
    for _ in range(max(1, micro_batches)):
        with counter.in_phase("forward"):
            loss = step_loss(model, batch)
        with counter.in_phase("backward"):
            loss.backward()
        del loss
    if optimizer_step:
        with counter.in_phase("optimizer"):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
