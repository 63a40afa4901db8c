"""Estimates eviction from memory pressure, with no dependency beyond torch (NVML used when present).

Every figure this source reports is an estimate (``estimated=True`` in the records):

- Managed pages resident on the GPU count as used in ``cudaMemGetInfo`` but are not part of the
  caching allocator's reserved memory. So ``resident = (total - free) - reserved`` follows the
  managed pages, up to a constant (the CUDA context, other libraries and processes). The source
  samples it at the step's start, when the optimizer starts (after backward: activations have
  peaked and evicted state has not yet been touched again) and at the step's end. Drops count as
  evicted bytes, rises as paged-in bytes. Pages evicted and brought back between two samples are
  missed; changes under 2 MiB (one large page) are taken as noise.
- With ``pynvml`` importable and a driver that has them, NVML's cumulative PCIe counters replace
  that: bytes the GPU sent (TX) count as evicted, bytes it received (RX) as paged in. They cover
  all PCIe traffic of the device, batch uploads and other processes included: an upper bound.
  ``nvml.h`` says of both counters "Value can be wrapped": a counter that went down wrapped around
  the width of its value type (``valueType`` of the field value), and the difference is taken
  modulo that width.
- Allocator retries and OOMs are exact deltas of ``torch.cuda.memory_stats``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

from lightning_paged.core.eviction.records import StepCounters
from lightning_paged.core.eviction.sources.base import EventSource

log = logging.getLogger(__name__)

NOISE_BYTES = 2 * 1024 * 1024
"""Changes of the resident estimate smaller than this are ignored."""

# NVML field ids of the cumulative PCIe byte counters (nvml.h: NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197,
# NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198; pynvml exposes them under the same names).
_NVML_PCIE_TX = 197
_NVML_PCIE_RX = 198
# nvmlValueType_t (nvml.h; pynvml's NVML_VALUE_TYPE_*) -> (member of the nvmlValue_t union, bits)
_NVML_UNSIGNED = {1: ("uiVal", 32), 2: ("ulVal", 64), 3: ("ullVal", 64), 6: ("usVal", 16)}


@dataclass(frozen=True)
class MemorySample:
    """One reading of the device's memory state."""

    free: int
    """Free device memory (``cudaMemGetInfo``)."""
    total: int
    """Total device memory."""
    reserved: int
    """Bytes the caching allocator holds (``reserved_bytes.all.current``)."""
    alloc_retries: int
    """Cumulative ``num_alloc_retries``."""
    ooms: int
    """Cumulative ``num_ooms``."""
    pcie_rx: int | None = None
    """Cumulative bytes the device received over PCIe (NVML), or None without NVML."""
    pcie_tx: int | None = None
    """Cumulative bytes the device sent over PCIe (NVML), or None without NVML."""
    pcie_wrap: int | None = None
    """The PCIe counters count modulo this (2 to the bits of their NVML value type); None: never wrap."""

    @property
    def resident(self) -> int:
        """Device memory in use outside the caching allocator: managed pages plus a constant."""
        return self.total - self.free - self.reserved


class MemoryProbe(Protocol):
    """Reads the device's memory state. :class:`CudaMemoryProbe` is the real one; tests pass their own."""

    def sample(self) -> MemorySample: ...

    def synchronize(self) -> None: ...


class CudaMemoryProbe:
    """Reads one CUDA device through torch, and NVML's PCIe counters when ``pynvml`` is importable."""

    def __init__(self, device_index: int, use_nvml: bool = True) -> None:
        self.device_index = device_index
        self._nvml_handle = _nvml_handle(device_index) if use_nvml else None

    @property
    def has_pcie_counters(self) -> bool:
        return self._nvml_handle is not None

    def sample(self) -> MemorySample:
        import torch

        free, total = torch.cuda.mem_get_info(self.device_index)
        stats = _allocator_stats(self.device_index)
        rx = tx = wrap = None
        if self._nvml_handle is not None:
            rx, tx, wrap = _nvml_pcie_bytes(self._nvml_handle)
        return MemorySample(
            free=int(free),
            total=int(total),
            reserved=stats[0],
            alloc_retries=stats[1],
            ooms=stats[2],
            pcie_rx=rx,
            pcie_tx=tx,
            pcie_wrap=wrap,
        )

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize(self.device_index)


def _allocator_stats(device_index: int) -> tuple[int, int, int]:
    """(reserved bytes, alloc retries, OOMs) of the caching allocator."""
    import torch

    from lightning_paged.core.compat.torch import cuda_allocator_stats

    try:  # the nested form skips the flattening that torch.cuda.memory_stats does on every call
        nested: Any = cuda_allocator_stats(device_index)
        return (
            int(nested["reserved_bytes"]["all"]["current"]),
            int(nested["num_alloc_retries"]),
            int(nested["num_ooms"]),
        )
    except (AttributeError, KeyError, TypeError):
        flat = torch.cuda.memory_stats(device_index)
        return (
            int(flat.get("reserved_bytes.all.current", 0)),
            int(flat.get("num_alloc_retries", 0)),
            int(flat.get("num_ooms", 0)),
        )


def nvml_available() -> bool:
    """The one availability check for ``pynvml``."""
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return False
    return True


def _nvml_handle(device_index: int) -> object | None:
    """NVML handle of the torch device (matched by UUID, so ``CUDA_VISIBLE_DEVICES`` is respected)."""
    if not nvml_available():
        return None
    import pynvml
    import torch

    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device_index).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(
            uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        )
        rx, tx, _ = _nvml_pcie_bytes(handle)
    except Exception as err:  # NVML reports unsupported fields and devices in many ways
        log.info("NVML PCIe counters unavailable (%s); using the resident-memory estimate", err)
        return None
    if rx is None or tx is None:
        log.info("NVML PCIe counters not supported on this device; using the resident-memory estimate")
        return None
    return handle


def _nvml_pcie_bytes(handle: object) -> tuple[int | None, int | None, int | None]:
    """Cumulative (received, sent) PCIe bytes and the modulus they wrap at.

    pynvml's ``c_nvmlFieldValue_t`` carries the result in the member of its ``value`` union that
    ``valueType`` names; an unknown type is read as ``ullVal`` (64 bits).
    """
    import pynvml

    values = pynvml.nvmlDeviceGetFieldValues(handle, [_NVML_PCIE_RX, _NVML_PCIE_TX])
    out: list[int | None] = []
    bits = 64
    for v in values:
        member, width = _NVML_UNSIGNED.get(int(getattr(v, "valueType", 3)), ("ullVal", 64))
        out.append(int(getattr(v.value, member)) if v.nvmlReturn == 0 else None)
        bits = min(bits, width)
    return out[0], out[1], 2**bits


class PressureSource(EventSource):
    """Per-step estimates from free memory, allocator statistics and (when present) NVML PCIe counters.

    ``probe`` reads the device; by default a :class:`CudaMemoryProbe` for ``device_index``.
    """

    name = "pressure"

    def __init__(self, probe: MemoryProbe | None = None, device_index: int = 0) -> None:
        self._probe = probe
        self._device_index = device_index
        self._samples: list[MemorySample] = []

    def start(self) -> None:
        if self._probe is None:
            self._probe = CudaMemoryProbe(self._device_index)
        self._probe.sample()  # fail here, not in the first step, when the device cannot be read

    @property
    def probe(self) -> MemoryProbe:
        if self._probe is None:
            raise RuntimeError("PressureSource.start() has not run")
        return self._probe

    def begin_step(self, step: int) -> None:
        self._samples = [self.probe.sample()]

    def begin_optimizer_step(self) -> None:
        if self._samples:
            self._samples.append(self.probe.sample())

    def synchronize(self) -> None:
        self.probe.synchronize()

    def end_step(self, step: int) -> StepCounters:
        samples = [*self._samples, self.probe.sample()]
        self._samples = []
        first, last = samples[0], samples[-1]
        if None not in (first.pcie_rx, first.pcie_tx, last.pcie_rx, last.pcie_tx):
            evicted = counter_delta(first.pcie_tx, last.pcie_tx, last.pcie_wrap)
            paged_in = counter_delta(first.pcie_rx, last.pcie_rx, last.pcie_wrap)
        else:
            evicted, paged_in = _resident_changes(samples)
        return StepCounters(
            evicted_bytes=evicted,
            paged_in_bytes=paged_in,
            device_free_bytes=min(s.free for s in samples),
            alloc_retries=last.alloc_retries - first.alloc_retries,
            ooms=last.ooms - first.ooms,
            estimated=True,
        )


def counter_delta(before: int | None, after: int | None, wrap: int | None) -> int:
    """How far a cumulative counter advanced; one that went down wrapped around ``wrap`` (once)."""
    assert before is not None and after is not None
    if after >= before:
        return after - before
    return after + wrap - before if wrap else 0


def _resident_changes(samples: list[MemorySample]) -> tuple[int, int]:
    """(sum of drops, sum of rises) of the resident estimate between consecutive samples."""
    dropped = risen = 0
    for before, after in pairwise(samples):
        change = after.resident - before.resident
        if change <= -NOISE_BYTES:
            dropped -= change
        elif change >= NOISE_BYTES:
            risen += change
    return dropped, risen
