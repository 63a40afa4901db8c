"""torch internals the project relies on, each behind one function. Read from torch 2.13.0."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

READ_FROM = "2.13.0"

DispatchMode = TorchDispatchMode
"""The base of a mode that sees every operator call (``torch.utils._python_dispatch.TorchDispatchMode``)."""


def set_last_lr(scheduler: Any, lrs: list[float]) -> None:
    """Set what ``scheduler.get_last_lr()`` returns (``LRScheduler._last_lr``, ``torch/optim/lr_scheduler.py``).

    After a resume puts configured learning rates back over restored ones, the scheduler's record of
    the last rates must say the same, or ``get_last_lr`` (and the logged rate) reports the old ones.
    """
    scheduler._last_lr = list(lrs)


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The live dict of ``module``'s own parameters (``nn.Module._parameters``), ``None`` entries included.

    Replacing an entry swaps the parameter without ``__setattr__``'s checks and hooks: the loaders
    place each weight (or take it back to the meta device) this way, tied weights once.
    """
    return module._parameters  # type: ignore[return-value]


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The live dict of ``module``'s own buffers (``nn.Module._buffers``), ``None`` entries included."""
    return module._buffers


def cuda_allocator_stats(device_index: int) -> dict[str, Any] | None:
    """The caching allocator's nested statistics (``torch._C._cuda_memoryStats``), None where it is missing.

    ``torch.cuda.memory_stats`` returns the same numbers flattened, at a cost paid on every call;
    the eviction monitor reads them every step.
    """
    probe = getattr(torch._C, "_cuda_memoryStats", None)
    return probe(device_index) if probe is not None else None


def profiler_active() -> bool:
    """True while a PyTorch (Kineto) profiler session runs in this process.

    ``torch._C._autograd._profiler_enabled()``, else the flag ``torch.autograd.profiler._is_profiler_enabled``
    (``torch/autograd/profiler.py``): CUPTI serves one subscriber, and the profiler may hold it.
    """
    probe = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    if probe is not None:
        return bool(probe())
    return bool(getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


# Fake tensors and dispatch modes: the memory plan's dry run (``core/plan/``) stands on them. They live
# in torch's private modules ``torch._subclasses.fake_tensor``, ``torch.utils._python_dispatch`` and
# ``torch.utils._pytree`` (read from torch 2.13.0).


def fake_tensor_mode() -> Any:
    """A ``FakeTensorMode`` into which real tensors may flow (the batch, bitsandbytes' code tables)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(value: Any) -> bool:
    """Whether ``value`` is a fake tensor (``torch._subclasses.fake_tensor.FakeTensor``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


def is_fake_parameter(value: Any) -> bool:
    """Whether ``value`` is a fake tensor standing for a plain ``nn.Parameter`` (a module's weight in a dry run).

    ``Module.to_empty`` under a fake mode gives each parameter a ``FakeTensor`` flagged as a parameter
    (``isinstance(value, nn.Parameter)`` holds, ``type(value) is nn.Parameter`` does not).
    """
    return is_fake(value) and isinstance(value, nn.Parameter)


def real_tensors() -> Any:
    """A context in which the active fake mode is off: operators run for real (``unset_fake_temporarily``)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    return unset_fake_temporarily()


def value_dependent_errors() -> tuple[type[Exception], ...]:
    """What a fake mode raises for an operator whose output depends on the values (``.item()``, ``nonzero``)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    return (DataDependentOutputException, DynamicOutputShapeException)


def tensor_leaves(tree: Any) -> list[Any]:
    """The leaves of nested lists, tuples and dicts (``torch.utils._pytree.tree_leaves``)."""
    from torch.utils._pytree import tree_leaves

    return list(tree_leaves(tree))


def has_module_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or forward-pre hooks of its own (``nn.Module._forward_hooks``,
    ``_forward_pre_hooks``, ``torch/nn/modules/module.py``).

    The chunked loss calls a bare output layer's weight directly only when nothing hooks its forward.
    """
    return bool(module._forward_hooks or module._forward_pre_hooks)


def view_base(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor ``tensor`` is a view of, or ``tensor`` itself (``Tensor._base``, ``torch/_tensor.py``).

    Activation offloading leaves a view of a parameter where it is, as it leaves the parameter.
    """
    base = tensor._base
    return base if base is not None else tensor


def index_put_impl() -> Any:
    """The ATen overload ``index_put_`` dispatches to (``torch.ops.aten._index_put_impl_.default``).

    ``aten/src/ATen/native/TensorAdvancedIndexing.cpp``: boolean-mask assignment reaches the dispatcher
    as this private operator, so a dispatch mode that rewrites masks must name it.
    """
    return torch.ops.aten._index_put_impl_.default
