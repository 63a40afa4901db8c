"""Event sources and the rule that picks one: CUPTI when it works, else memory pressure on CUDA, else none."""

from __future__ import annotations

import logging
from typing import Any, Literal, get_args

import torch

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.sources.base import EventSource, Notify, OnceNotifier, SourceUnavailable
from lightning_paged.core.eviction.sources.cupti import CuptiSource
from lightning_paged.core.eviction.sources.cupti_setup import cupti_importable
from lightning_paged.core.eviction.sources.null import NullSource
from lightning_paged.core.eviction.sources.pressure import MemoryProbe, MemorySample, PressureSource

log = logging.getLogger(__name__)

SourceSetting = Literal["auto", "cupti", "pressure", "none"]
"""Where eviction events come from (see :func:`open_source`)."""
SOURCE_SETTINGS: tuple[str, ...] = get_args(SourceSetting)

__all__ = [
    "SOURCE_SETTINGS",
    "CuptiSource",
    "EventSource",
    "MemoryProbe",
    "MemorySample",
    "NullSource",
    "PressureSource",
    "SourceSetting",
    "SourceUnavailable",
    "open_source",
]


def open_source(
    setting: str = "auto",
    device: torch.device | str = "cpu",
    *,
    probe: MemoryProbe | None = None,
    cupti_binding: Any = None,
    notify: Notify | OnceNotifier | None = None,
) -> EventSource:
    """Build and start the event source for ``device``.

    ``"auto"`` tries CUPTI (when cupti-python imports and CUPTI supports unified-memory counters here),
    then the pressure source (CUDA devices), then the null source. ``"cupti"`` and ``"pressure"`` force
    that source; when it cannot run, the reason is reported once and the next one in that order is used.
    ``"none"`` records sequence lengths and times only. ``probe`` replaces the pressure source's CUDA
    reader (it also lets the pressure source run off-GPU, for tests); ``cupti_binding`` replaces the
    ``cupti.cupti`` module.
    """
    if setting not in SOURCE_SETTINGS:
        raise SettingError("source", setting, f"must be one of {', '.join(SOURCE_SETTINGS)}")
    once = notify if isinstance(notify, OnceNotifier) else OnceNotifier(notify)
    dev = torch.device(device)
    cuda_index = _cuda_index(dev)
    if setting == "none":
        return _started_null("the event source is set to 'none'", once, cuda_index)

    chain = ["cupti", "pressure"] if setting in ("auto", "cupti") else ["pressure"]
    reason = ""
    for name in chain:
        try:
            source = _build(name, dev, probe, cupti_binding, once)
            source.start()
            return source
        except SourceUnavailable as err:
            reason = str(err)
            quiet = setting == "auto" and err.expected
            if quiet:
                log.info("%s source not used: %s", name, reason)
            elif dev.type == "cuda" or name == setting:
                once(f"the {name} event source cannot run: {reason}; falling back")
    return _started_null(reason, once, cuda_index)


def _started_null(reason: str, once: OnceNotifier, cuda_index: int | None) -> NullSource:
    source = NullSource(reason, once, cuda_device=cuda_index)
    source.start()
    return source


def _cuda_index(dev: torch.device) -> int | None:
    if dev.type != "cuda":
        return None
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _build(name: str, dev: torch.device, probe: Any, binding: Any, once: OnceNotifier) -> EventSource:
    on_cuda = dev.type == "cuda"
    index = _cuda_index(dev) or 0
    if name == "cupti":
        if not on_cuda:
            raise _expected(f"training runs on {dev.type}, not on a CUDA GPU")
        if getattr(torch.version, "hip", None):
            raise _expected("this is a ROCm build of torch; CUPTI does not see HIP managed memory")
        if binding is None and not cupti_importable():
            raise _expected("cupti-python is not installed (pip install lightning-paged[cupti])")
        return CuptiSource(device_index=index, binding=binding, notify=once)
    if probe is None and not on_cuda:
        raise _expected(f"training runs on {dev.type}, not on a CUDA GPU")
    return PressureSource(probe=probe, device_index=index)


def _expected(message: str) -> SourceUnavailable:
    return SourceUnavailable(message, expected=True)
