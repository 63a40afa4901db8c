"""Building a bitsandbytes optimizer from a name and its parameter groups; the settings of it and its schedule.

One table, :data:`OPTIMIZERS`, maps every name that transformers' ``TrainingArguments.optim``
and Ludwig's optimizer ``type`` give a bitsandbytes optimizer to the algorithm, the state bit
width and paging. :func:`build_optimizer` also takes a dotted class path or a callable.
Framework-free: the Lightning mixin, Fabric and Accelerate users call the same functions. The
schedule itself is :mod:`lightning_paged.core.schedule`'s (``build_scheduler`` is re-exported here).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_paged.core.errors import SettingError
from lightning_paged.core.kernels import cuda_8bit_refusal, cuda_algorithms
from lightning_paged.core.paging import PagingPolicy, install_paging, is_bitsandbytes_optimizer, warn_once
from lightning_paged.core.schedule import SCHEDULERS, SchedulerName, resolve_warmup
from lightning_paged.core.schedule import build_scheduler as build_scheduler  # re-exported: its old home
from lightning_paged.core.schedule import lr_factor as lr_factor
from lightning_paged.core.settings import did_you_mean


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer name builds."""

    algorithm: str
    """Class in ``bitsandbytes.optim`` that runs the algorithm at any bit width (``AdamW``, ``Lion``, ...)."""
    bits: Literal[8, 32]
    """Bits per state value; 8-bit state applies to parameters of at least 4,096 elements (``min_8bit_size``)."""
    paged: bool = False
    """State in unified memory that the driver can evict to host RAM under memory pressure."""
    origin: str = "transformers"
    """Which tool spells the name this way (``transformers``: ``TrainingArguments.optim``; ``Ludwig``: optimizer type)."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments the name implies unless given (bitsandbytes' SGD and LARS refuse zero momentum)."""

    @property
    def optimizer_class(self) -> type[torch.optim.Optimizer]:
        import bitsandbytes as bnb

        return getattr(bnb.optim, self.algorithm)


def _spec(
    algorithm: str, bits: Literal[8, 32], paged: bool = False, origin: str = "transformers", **defaults: Any
):
    return OptimizerSpec(algorithm, bits, paged, origin, tuple(defaults.items()))


_BOTH = "transformers, Ludwig"
_MOMENTUM = 0.9

OPTIMIZERS: dict[str, OptimizerSpec] = {
    # transformers' TrainingArguments.optim names for bitsandbytes optimizers
    "adamw_bnb_8bit": _spec("AdamW", 8),
    "adamw_8bit": _spec("AdamW", 8, origin=_BOTH),
    "paged_adamw_32bit": _spec("AdamW", 32, paged=True),
    "paged_adamw_8bit": _spec("AdamW", 8, paged=True, origin=_BOTH),
    "ademamix": _spec("AdEMAMix", 32),
    "ademamix_8bit": _spec("AdEMAMix", 8),
    "paged_ademamix_32bit": _spec("AdEMAMix", 32, paged=True),
    "paged_ademamix_8bit": _spec("AdEMAMix", 8, paged=True),
    "lion_32bit": _spec("Lion", 32),
    "lion_8bit": _spec("Lion", 8, origin=_BOTH),
    "paged_lion_32bit": _spec("Lion", 32, paged=True),
    "paged_lion_8bit": _spec("Lion", 8, paged=True, origin=_BOTH),
    "rmsprop_bnb": _spec("RMSprop", 32),
    "rmsprop_bnb_8bit": _spec("RMSprop", 8),
    "rmsprop_bnb_32bit": _spec("RMSprop", 32),
    # Ludwig's optimizer types (its torch-only ones build the bitsandbytes 32-bit version)
    "adam": _spec("Adam", 32, origin="Ludwig"),
    "adam_8bit": _spec("Adam", 8, origin="Ludwig"),
    "paged_adam": _spec("Adam", 32, paged=True, origin="Ludwig"),
    "paged_adam_8bit": _spec("Adam", 8, paged=True, origin="Ludwig"),
    "adamw": _spec("AdamW", 32, origin="Ludwig"),
    "paged_adamw": _spec("AdamW", 32, paged=True, origin="Ludwig"),
    "lion": _spec("Lion", 32, origin="Ludwig"),
    "paged_lion": _spec("Lion", 32, paged=True, origin="Ludwig"),
    "sgd": _spec("SGD", 32, origin=_BOTH, momentum=_MOMENTUM),
    "sgd_8bit": _spec("SGD", 8, origin="Ludwig", momentum=_MOMENTUM),
    "rmsprop": _spec("RMSprop", 32, origin=_BOTH),
    "rmsprop_8bit": _spec("RMSprop", 8, origin="Ludwig"),
    "adagrad": _spec("Adagrad", 32, origin=_BOTH),
    "adagrad_8bit": _spec("Adagrad", 8, origin="Ludwig"),
    "lamb": _spec("LAMB", 32, origin="Ludwig"),
    "lamb_8bit": _spec("LAMB", 8, origin="Ludwig"),
    "lars": _spec("LARS", 32, origin="Ludwig", momentum=_MOMENTUM),
    "lars_8bit": _spec("LARS", 8, origin="Ludwig", momentum=_MOMENTUM),
}
"""Every optimizer name, keyed as transformers and Ludwig spell it."""

COMMON_SETTINGS = ("lr", "betas", "eps", "weight_decay")
"""Settings every name is given; an algorithm that has no such setting (Lion has no ``eps``) ignores it."""


@dataclass
class OptimizerConfig:
    """Settings of the optimizer and its learning-rate schedule. The single source of their defaults."""

    name: str = "paged_adamw_8bit"
    """An optimizer name (see ``docs/optimizers.md``) or a dotted class path such as ``torch.optim.AdamW``."""
    lr: float = 2e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.0
    """Decoupled weight decay; never applied to biases and norm weights."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the moment estimates (AdEMAMix adds its third, 0.9999; RMSprop and SGD have none)."""
    eps: float = 1e-8
    """Term added to the denominator for numerical stability."""
    scheduler: SchedulerName = "constant"
    """Learning-rate decay after warmup, stepped once per optimizer step; linear and cosine end at 0."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup, from ``lr / (warmup_steps + 1)`` up to ``lr``."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction in [0, 1) of the run's optimizer steps, instead of ``warmup_steps``: ``ceil(ratio * steps)``
    warmup steps, as transformers counts them. The steps are Lightning's estimate when the optimizer is built:
    ``trainer.max_steps``, or with ``max_steps: -1`` the epochs (``max_epochs``, 1000 when neither is set) times the
    optimizer steps per epoch."""
    page_adapters: bool = True
    """Page the state of small parameters (LoRA adapters) too, which bitsandbytes leaves unpaged below 100,000 elements."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the optimizer class (``momentum`` for sgd, ``alpha`` for ademamix)."""

    def validate(self) -> None:
        """Raise :class:`SettingError` naming the first bad setting."""
        if not isinstance(self.name, str) or not self.name:
            raise SettingError("name", self.name, "must be an optimizer name or a dotted class path")
        if "." not in self.name:
            resolve_name(self.name)
        if not self.lr > 0:
            raise SettingError("lr", self.lr, "must be positive (typical for QLoRA: 1e-4 to 3e-4)")
        if self.weight_decay < 0:
            raise SettingError("weight_decay", self.weight_decay, "must be zero or positive")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise SettingError("betas", self.betas, "must be two numbers in [0, 1), such as [0.9, 0.999]")
        if self.eps < 0:
            raise SettingError("eps", self.eps, "must be zero or positive")
        if self.scheduler not in SCHEDULERS:
            raise SettingError("scheduler", self.scheduler, f"must be one of {', '.join(SCHEDULERS)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise SettingError("warmup_steps", self.warmup_steps, "must be a whole number, 0 or more")
        ratio = self.warmup_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise SettingError("warmup_ratio", ratio, "must be a fraction in [0, 1), e.g. 0.03")
        if ratio and self.warmup_steps:
            raise SettingError(
                "warmup_ratio", ratio, f"and warmup_steps ({self.warmup_steps}) both set the warmup: give one"
            )

    def warmup(self, total_steps: float | None) -> int:
        """Warmup steps of a run of ``total_steps`` optimizer steps: ``warmup_steps``, or ``warmup_ratio`` of them."""
        return resolve_warmup(self.warmup_steps, self.warmup_ratio, total_steps)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`build_optimizer`."""
        common = dict(lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)
        return {**common, **self.kwargs}


# Modules keep their settings in their hyperparameters, which every checkpoint stores: let
# ``torch.load(weights_only=True)`` (the default, and how Lightning resumes) read them back.
torch.serialization.add_safe_globals([OptimizerConfig])


def resolve_name(name: str) -> OptimizerSpec:
    """The spec of an optimizer name, or a :class:`SettingError` that suggests the closest."""
    spec = OPTIMIZERS.get(name)
    if spec is not None:
        return spec
    hint = did_you_mean(name, OPTIMIZERS, " (did you mean '{}'?)")
    raise SettingError(
        "name",
        name,
        f"is not an optimizer name{hint}; valid names: {', '.join(OPTIMIZERS)}; or give a dotted class path "
        "such as torch.optim.AdamW",
    )


def _import_path(path: str) -> Callable[..., torch.optim.Optimizer]:
    module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise SettingError("name", path, f"names nothing importable ({err})") from err
    if not callable(target):
        raise SettingError("name", path, "names no class or function that builds an optimizer")
    return target


def _fit_kwargs(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop common settings the factory has no parameter for; refuse any other unknown keyword."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass everything
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    fitted: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in params:
            fitted[key] = value
        elif key not in COMMON_SETTINGS:
            accepted = ", ".join(k for k in params if k not in ("self", "params"))
            raise SettingError(
                key,
                value,
                f"is not a setting of {getattr(factory, '__name__', factory)}; it takes {accepted}",
            )
    default_betas = params["betas"].default if "betas" in params else None
    betas = fitted.get("betas")
    if isinstance(default_betas, tuple) and betas is not None and len(betas) < len(default_betas):
        fitted["betas"] = (*betas, *default_betas[len(betas) :])  # AdEMAMix's beta3
    return fitted


def _without_empty(params: list[Any]) -> list[Any]:
    """``params`` without zero-element tensors (and groups left empty by that).

    They have nothing to learn, and bitsandbytes' CUDA kernels cannot take them: a kernel launched
    over zero elements fails its launch check, which ends the process (``exit(1)``).
    """
    kept: list[Any] = []
    for item in params:
        if isinstance(item, Mapping):
            tensors = [t for t in item["params"] if t.numel() > 0]
            if tensors:
                kept.append({**item, "params": tensors})
        elif item.numel() > 0:
            kept.append(item)
    return kept


_KIN_8BIT = {"lamb": "adamw_8bit", "lars": "sgd_8bit"}
"""An 8-bit name whose CUDA kernel is the one the refused algorithm's 32-bit update reuses
(bitsandbytes' ``str2optimizer32bit`` gives ``lamb`` the adam kernels, ``lars`` the momentum ones)."""


def refuse_missing_cuda_kernels(
    optimizer: torch.optim.Optimizer, name: str, device: torch.device | None = None
) -> None:
    """Raise :class:`SettingError` when ``optimizer``'s first step would fail on CUDA for want of a kernel.

    ``name`` is the optimizer setting as the user gave it; ``device`` stands for every parameter's
    device (None: each parameter's own). The nearest names that run are suggested: the same algorithm
    with 32-bit state, and the 8-bit name whose CUDA kernel that algorithm's 32-bit update reuses.
    """
    algorithm = cuda_8bit_refusal(optimizer, device)
    if algorithm is None:
        return
    kernels, where = cuda_algorithms(8)
    spec = OPTIMIZERS.get(name)
    names = []
    if spec is not None and algorithm in cuda_algorithms(32)[0]:
        names = [
            n
            for n, s in OPTIMIZERS.items()
            if (s.algorithm, s.bits, s.paged) == (spec.algorithm, 32, spec.paged)
        ]
    if algorithm in _KIN_8BIT:
        names.append(_KIN_8BIT[algorithm])
    instead = " or ".join(f"'{n}'" for n in names) if names else "an optimizer with 32-bit state"
    raise SettingError(
        "name",
        name,
        f"cannot train on a CUDA GPU: bitsandbytes has 8-bit CUDA kernels for {', '.join(sorted(kernels))} "
        f"(read from {where}), not for '{algorithm}', and would fail at the first step (its CPU backend "
        f"has one, which is why it trains on a CPU); use {instead}",
    )


def _first_device(params: list[Any]) -> torch.device | None:
    for item in params:
        tensors = item["params"] if isinstance(item, Mapping) else [item]
        for tensor in tensors:
            return tensor.device
    return None


def build_optimizer(
    name: str | Callable[..., torch.optim.Optimizer],
    params: Iterable[Any],
    *,
    paging: PagingPolicy | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimizer from a name in :data:`OPTIMIZERS`, a dotted class path or a callable.

    ``params`` are tensors or parameter groups, already on their training device (paging is
    decided from it). ``kwargs`` go to the optimizer class; of :data:`COMMON_SETTINGS` those
    the algorithm has no parameter for are dropped. Every bitsandbytes optimizer gets ``paging``
    (default: adapters paged too, through a pool); where its device has no managed memory, a
    paged name keeps ordinary state and says so once per run. Zero-element tensors are left out
    (bitsandbytes' CUDA kernels cannot take them), and a name whose 8-bit update bitsandbytes has no
    CUDA kernel for (``lamb_8bit``, ``lars_8bit``) is refused on a CUDA parameter.
    """
    params = _without_empty(list(params))
    if not params:
        raise SettingError("params", params, "is empty; the model has no trainable parameters to optimize")
    label = name if isinstance(name, str) else getattr(name, "__name__", repr(name))
    if isinstance(name, str) and "." not in name:
        spec = resolve_name(name)
        cls: Any = spec.optimizer_class
        for fixed in ("optim_bits", "is_paged"):
            if fixed in kwargs:
                raise SettingError(
                    fixed, kwargs[fixed], f"is set by the optimizer name {name!r}; choose another name"
                )
        kwargs = {**dict(spec.defaults), **kwargs}
        factory: Callable[..., torch.optim.Optimizer] = functools.partial(cls, optim_bits=spec.bits)
        if spec.paged:
            factory = functools.partial(factory, is_paged=True)
        fitted = _fit_kwargs(cls, kwargs)
    else:
        factory = _import_path(name) if isinstance(name, str) else name
        fitted = _fit_kwargs(factory, kwargs)
    try:
        optimizer = factory(params, **fitted)
    except (ValueError, NotImplementedError, TypeError) as err:
        raise SettingError("name", label, f"cannot be built with {fitted}: {err}") from err
    if is_bitsandbytes_optimizer(optimizer):
        refuse_missing_cuda_kernels(optimizer, label)
        policy = paging or PagingPolicy()
        install_paging(optimizer, policy)
        device = _first_device(params)
        reason = policy.memory.unavailable_reason(device) if device is not None else None
        if getattr(optimizer, "is_paged", False) and reason is not None:
            warn_once(
                reason,
                f"{label}: {reason}; optimizer state stays in ordinary memory "
                "(on a CUDA GPU it would be paged). Shown once per run.",
            )
    return optimizer


def _is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def param_groups(
    named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float
) -> list[dict[str, Any]]:
    """Trainable parameters in groups: weight decay on matrices, none on biases and norm weights."""
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for name, param in named_params:
        if param.requires_grad:
            (no_decay if _is_no_decay(name, param) else decay).append(param)
    if not weight_decay:
        return [{"params": decay + no_decay, "weight_decay": 0.0}] if decay or no_decay else []
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
