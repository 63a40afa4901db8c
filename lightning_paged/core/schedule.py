"""The learning-rate schedule: linear warmup, then constant, linear or cosine decay, per optimizer step.

Framework-free. :func:`build_scheduler` returns a ``LambdaLR`` over :func:`lr_factor`;
:func:`resolve_warmup` turns ``warmup_steps`` or ``warmup_ratio`` into a number of steps.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, get_args

import torch
from torch.optim.lr_scheduler import LambdaLR

from lightning_paged.core.errors import SettingError

SchedulerName = Literal["constant", "linear", "cosine"]
"""Learning-rate schedules :func:`build_scheduler` knows."""
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)


def resolve_warmup(steps: int, ratio: float, total_steps: float | None) -> int:
    """Warmup steps of a run of ``total_steps`` optimizer steps: ``steps``, or with a ``ratio`` ``ceil(ratio * total)``.

    As transformers' ``TrainingArguments.get_warmup_steps`` counts them, kept below the run's
    steps. Raises :class:`SettingError` (``warmup_ratio``) when a ratio has no known number of steps.
    """
    if not ratio:
        return steps
    if total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        raise SettingError(
            "warmup_ratio",
            ratio,
            f"needs a known number of training steps (got {total_steps}); set trainer.max_steps or "
            "max_epochs, or give warmup_steps",
        )
    return min(math.ceil(ratio * total_steps), max(0, int(total_steps) - 1))


def lr_factor(
    step: int,
    scheduler: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (counted from 0).

    Warmup rises linearly from ``1 / (warmup_steps + 1)`` so no step runs at a zero rate; linear
    and cosine decay then reach 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    assert total_steps is not None, "linear and cosine schedules need total_steps"
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    scheduler: str = "constant",
    warmup_steps: int = 0,
    total_steps: float | None = None,
) -> LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`, to be stepped once per optimizer step."""
    if scheduler not in SCHEDULERS:
        raise SettingError("scheduler", scheduler, f"must be one of {', '.join(SCHEDULERS)}")
    if scheduler != "constant" and (
        total_steps is None or not math.isfinite(total_steps) or total_steps <= 0
    ):
        raise SettingError(
            "scheduler",
            scheduler,
            f"needs a known number of training steps (got {total_steps}); set trainer.max_steps or use constant",
        )
    if total_steps is not None and warmup_steps >= total_steps:
        raise SettingError(
            "warmup_steps", warmup_steps, f"must be smaller than the {total_steps} training steps"
        )
    total = int(total_steps) if total_steps is not None and math.isfinite(total_steps) else None
    schedule = functools.partial(lr_factor, scheduler=scheduler, warmup_steps=warmup_steps, total_steps=total)
    return LambdaLR(optimizer, schedule)
