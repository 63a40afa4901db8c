"""Activation offloading in a dry run: the offload hooks' host copies counted as host memory, not the device's.

A run with ``offload_activations`` moves each checkpointed layer's input to (pinned) host memory
when autograd saves it and copies it back for the backward pass
(:class:`~lightning_paged.core.offload.ActivationOffload`). In a dry run every tensor is a fake
*CPU* tensor, where those hooks would move nothing (they leave host tensors where they are). The
plan therefore installs :class:`PlanOffload` where the run installs its hooks: it treats the dry
run's CPU tensors as the device's, makes its host copies under the counter's
:meth:`~lightning_paged.core.plan.counter.LiveBytes.on_host` (so they are not device bytes), and
gives the backward pass a fresh copy, as ``host.to(device)`` makes one on a GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from lightning_paged.core.offload import MIN_OFFLOAD_BYTES, ActivationOffload, enable_activation_offload
from lightning_paged.core.plan.counter import LiveBytes
from lightning_paged.core.plan.step import StepLoss


class PlanOffload(ActivationOffload):
    """:class:`ActivationOffload` for the dry run's CPU tensors, its host copies counted apart by ``counter``."""

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        super().__init__(min_bytes=min_bytes, devices=("cpu",))
        self.counter: LiveBytes | None = None
        """The counter of the step being measured (set before each)."""

    def _pack(self, tensor: torch.Tensor) -> Any:
        with self.counter.on_host() if self.counter is not None else nullcontext():
            return super()._pack(tensor)

    def _unpack(self, packed: Any) -> torch.Tensor:
        restored = super()._unpack(packed)
        if restored is packed:  # never moved
            return restored
        return restored.clone()  # on a GPU ``host.to(device)`` is a new device tensor


def install(model: nn.Module, step_loss: StepLoss) -> tuple[PlanOffload, StepLoss]:
    """Put :class:`PlanOffload` where a run with ``offload_activations`` puts its hooks; the step's loss to run.

    On the checkpointed layers (their inputs go to the host) when the model has transformers'
    checkpointing, as the conversion does; else around the whole loss computation, as a QLoRA
    strategy wraps each training step.
    """
    hooks = PlanOffload()
    if enable_activation_offload(model, hooks=hooks) is not None:
        return hooks, step_loss
    return hooks, functools.partial(_under, hooks, step_loss)


def _under(
    hooks: PlanOffload, step_loss: StepLoss, model: nn.Module, batch: Mapping[str, Any]
) -> torch.Tensor:
    with hooks:
        return step_loss(model, batch)
