"""The paged optimizer of a converted model: optimizer by name, its schedule, the paging policy, re-paging.

One builder for every front door. The Lightning mixin returns its result from
``configure_optimizers``; Fabric and Accelerate users call :func:`build_paged_optimizer` after the
conversion, and get an optimizer that puts its state back into paged memory after every
``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lightning_paged.core.compat.torch import set_last_lr
from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import OptimizerConfig, build_optimizer, param_groups
from lightning_paged.core.paging import (
    ManagedMemory,
    PagingPolicy,
    is_bitsandbytes_optimizer,
    repage_optimizer_state,
    warn_once,
)
from lightning_paged.core.qlora import is_qlora
from lightning_paged.core.schedule import build_scheduler
from lightning_paged.core.settings import settings_from_mapping

_CONVERT_FIRST = (
    "; build the optimizer after the conversion (fabric.setup_module or prepare_paged_qlora), which adds "
    "the LoRA adapters"
)


def optimizer_config(
    value: OptimizerConfig | Mapping[str, Any] | None, where: str = "optimizer."
) -> OptimizerConfig:
    """A validated :class:`OptimizerConfig` from a config, a mapping of its fields, or None (the defaults)."""
    return settings_from_mapping(OptimizerConfig, value, where)


def optimizer_and_schedule(
    module: nn.Module,
    config: OptimizerConfig,
    *,
    total_steps: float | None,
    warmup_steps: int | None = None,
    memory: ManagedMemory | None = None,
    where: str = "optimizer.",
    if_empty: str = _CONVERT_FIRST,
) -> tuple[Optimizer, LambdaLR]:
    """The optimizer ``config`` names over ``module``'s trainable weights, with the paging policy, and its schedule.

    No weight decay on biases and norm weights. ``warmup_steps`` overrides the config's;
    ``memory`` replaces the unified-memory primitives (CPU tests). Errors are located at ``where``;
    ``if_empty`` ends the message for a module with nothing to train.
    """
    groups = param_groups(module.named_parameters(), config.weight_decay)
    if not groups:
        raise SettingError("model", type(module).__name__, f"has no trainable parameters{if_empty}")
    policy = PagingPolicy(page_small=config.page_adapters, memory=memory or ManagedMemory())
    try:
        warmup = config.warmup(total_steps) if warmup_steps is None else warmup_steps
        optimizer = build_optimizer(config.name, groups, paging=policy, **config.optimizer_kwargs())
        scheduler = build_scheduler(optimizer, config.scheduler, warmup, total_steps)
    except SettingError as err:
        raise err.located(where) from None
    return optimizer, scheduler


def build_paged_optimizer(
    module: nn.Module,
    config: OptimizerConfig | Mapping[str, Any] | None = None,
    *,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    memory: ManagedMemory | None = None,
) -> tuple[Optimizer, LambdaLR]:
    """The optimizer named in ``config`` over the module's trainable weights, and its schedule.

    Call it on the converted model (after ``fabric.setup_module``): before the conversion the LoRA
    weights do not exist. No weight decay on biases and norm weights. Step the scheduler once per
    optimizer step; ``total_steps`` is needed by the linear and cosine schedules, ``warmup_steps``
    overrides the config's (Accelerate counts scheduler steps per process). A bitsandbytes
    optimizer gets the paging policy (adapters paged too, unless ``page_adapters`` is off) and
    puts its state back into paged memory after every ``load_state_dict``. ``memory`` replaces
    the unified-memory primitives (CPU tests).
    """
    settings = optimizer_config(config)
    if not is_qlora(module) and any(p.requires_grad for p in module.parameters()):
        warn_once(
            "optimizer-before-conversion",
            f"build_paged_optimizer: {type(module).__name__} has no 4-bit layers, so the optimizer covers all "
            "its trainable weights. For QLoRA, set the model up first (fabric.setup_module).",
        )
    optimizer, scheduler = optimizer_and_schedule(
        module, settings, total_steps=total_steps, warmup_steps=warmup_steps, memory=memory
    )
    if is_bitsandbytes_optimizer(optimizer):
        repage_after_load(optimizer)
    return optimizer, scheduler


def repage_after_load(optimizer: Optimizer) -> None:
    """Loading a state dict turns paged state into ordinary tensors; put it back after each load."""
    load = optimizer.load_state_dict

    def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        load(state_dict, *args, **kwargs)
        repage_optimizer_state(optimizer)

    optimizer.load_state_dict = load_state_dict  # type: ignore[method-assign]


class ConfiguredSettings:
    """An optimizer's parameter-group settings and its schedule's base rates as configured, to put back after a restore.

    Restoring an optimizer replaces its parameter groups' settings (learning rate, weight decay,
    betas, eps) by the saved ones, and restoring a ``LambdaLR`` its base learning rates; a setting
    changed on resume would otherwise be dropped. The schedule itself (its kind and warmup) is the
    one built from the config, continuing at the restored step.
    """

    def __init__(self, optimizer: Optimizer, scheduler: Any) -> None:
        self.groups = [_settings(group) for group in optimizer.param_groups]
        self.base_lrs = list(scheduler.base_lrs)

    def apply(self, optimizer: Optimizer, scheduler: Any) -> None:
        """Put the configured settings over those a checkpoint restored into ``optimizer`` and ``scheduler``."""
        for group, settings in zip(optimizer.param_groups, self.groups):
            for key, value in settings.items():
                if group.get(key) != value:
                    group[key] = value
        if list(scheduler.base_lrs) != self.base_lrs:
            scheduler.base_lrs = list(self.base_lrs)
            factors = [factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
            for group, base, factor in zip(optimizer.param_groups, self.base_lrs, factors):
                group["initial_lr"], group["lr"] = base, base * factor
            set_last_lr(scheduler, [group["lr"] for group in optimizer.param_groups])


def _settings(group: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter group's settings, without its parameters and the learning rates the scheduler sets."""
    return {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
