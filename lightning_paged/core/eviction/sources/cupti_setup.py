"""Whether CUPTI can run here, and configuring its unified-memory counters (once, before CUDA if possible).

``import cupti.cupti`` succeeds without a driver or libcupti: the library is loaded at the first
real call, which then raises cupti-python's ``NotSupportedError`` or ``FunctionNotFoundError``
(``RuntimeError`` subclasses), ``cuda.pathfinder``'s ``DynamicLibNotFoundError`` (a
``RuntimeError`` too) or, once CUPTI runs, ``cuptiError`` with a ``Result``. :func:`refusals` is that
list; :func:`cupti_available` probes a real call; :func:`configure_counters` is the configuration
NVIDIA's unified-memory sample makes after ``cuInit`` and before its first allocation.
"""

from __future__ import annotations

import weakref
from typing import Any

COUNTER_KINDS = ("BYTES_TRANSFER_HTOD", "BYTES_TRANSFER_DTOH", "GPU_PAGE_FAULT", "THRASHING")
"""The ``ActivityUnifiedMemoryCounterKind`` members this source enables."""


def cupti_importable() -> bool:
    """Whether ``cupti.cupti`` imports (it does without a driver or libcupti; see :func:`cupti_available`)."""
    try:
        import cupti.cupti  # noqa: F401
    except Exception:  # ImportError, or an OSError when a compiled part cannot load
        return False
    return True


def refusals(binding: Any) -> tuple[type[BaseException], ...]:
    """What a CUPTI call can raise when it cannot do its work here: ``cuptiError`` and ``RuntimeError``.

    ``RuntimeError`` covers cupti-python's ``NotSupportedError`` and ``FunctionNotFoundError`` (no
    driver, no libcupti, a libcupti without the function) and ``cuda.pathfinder``'s
    ``DynamicLibNotFoundError``; ``OSError`` a library that is found but does not load.
    """
    error = getattr(binding, "cuptiError", None)
    others: tuple[type[BaseException], ...] = (RuntimeError, OSError)
    return (error, *others) if isinstance(error, type) else others


def cupti_unavailable_reason(binding: Any = None) -> str | None:
    """Why CUPTI cannot be used here, or None when a real call (``get_timestamp``) succeeds.

    ``binding`` replaces the ``cupti.cupti`` module (tests).
    """
    if binding is None:
        if not cupti_importable():
            return "cupti-python is not installed (pip install lightning-paged[cupti])"
        import cupti.cupti as module

        binding = module
    try:
        binding.get_timestamp()
    except refusals(binding) as err:
        return unsupported_reason(binding, err)
    return None


def cupti_available(binding: Any = None) -> bool:
    """The one availability check for CUPTI: cupti-python imports and a real call succeeds."""
    return cupti_unavailable_reason(binding) is None


_configured: weakref.WeakKeyDictionary[Any, dict[int, str | None]] = weakref.WeakKeyDictionary()
"""Per binding and device: None once the counters are configured, else why CUPTI refused."""


def configure_counters(device_index: int = 0, binding: Any = None, *, again: bool = False) -> str | None:
    """Configure CUPTI's unified-memory counters for one device, once; None when done, else why not.

    Call it before the CUDA context is created, as NVIDIA's sample does; a second call for the same
    device returns the first answer without asking CUPTI again, unless ``again`` (after the PyTorch
    profiler, which may have torn CUPTI down). ``binding`` replaces ``cupti.cupti``.
    """
    if binding is None:
        if not cupti_importable():
            return "cupti-python is not installed (pip install lightning-paged[cupti])"
        import cupti.cupti as module

        binding = module
    done = _configured.setdefault(binding, {})
    if device_index in done and not again:
        return done[device_index]
    b = binding
    try:
        kinds = [getattr(b.ActivityUnifiedMemoryCounterKind, k) for k in COUNTER_KINDS]
        config = b.ActivityUnifiedMemoryCounterConfig(len(kinds))
        config.scope = b.ActivityUnifiedMemoryCounterScope.PROCESS_SINGLE_DEVICE
        config.device_id = device_index
        config.enable = 1
        for i, kind in enumerate(kinds):
            config[i].kind = kind
        b.activity_configure_unified_memory_counter(config.ptr, len(kinds))
    except refusals(b) as err:
        done[device_index] = unsupported_reason(b, err)
    else:
        done[device_index] = None
    return done[device_index]


def unsupported_reason(binding: Any, err: BaseException) -> str:
    """A user-facing reason from what a CUPTI call raised (a ``cuptiError``'s ``status`` is a ``Result``)."""
    status = getattr(err, "status", None)
    if status is None:  # NotSupportedError and the other RuntimeErrors: the message says it all
        return f"CUPTI cannot be used here ({type(err).__name__}: {err or 'no further detail'})"
    try:
        name = binding.Result(status).name
    except (ValueError, TypeError, AttributeError):
        name = str(status)
    hints = {
        "ERROR_UM_PROFILING_NOT_SUPPORTED": "unified-memory profiling is not supported on this system",
        "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE": "unified-memory profiling is not supported on this GPU",
        "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_NON_P2P_DEVICES": (
            "unified-memory profiling needs peer access between all visible GPUs; "
            "set CUDA_VISIBLE_DEVICES to one GPU per process"
        ),
        "ERROR_UM_PROFILING_NOT_SUPPORTED_WITH_MPS": "unified-memory profiling does not work under MPS",
        "ERROR_INSUFFICIENT_PRIVILEGES": (
            "profiling is restricted to admin users (NVreg_RestrictProfilingToAdminUsers=1)"
        ),
    }
    return f"CUPTI answered {name}: {hints.get(name, str(err) or 'no further detail')}"
