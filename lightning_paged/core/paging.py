"""Which optimizer state lives in paged (unified) memory, and keeping it there.

bitsandbytes gives a paged optimizer's state buffers managed memory (``cudaMallocManaged``) that
the driver can evict to host RAM under pressure, but only for parameters of at least 100,000
elements: LoRA adapters (65,536 elements at rank 16 on a 4096-wide layer) keep ordinary GPU
state. A :class:`PagingPolicy`, installed on a bitsandbytes optimizer, decides where every state
buffer comes from:

* parameters at or above the threshold get one managed allocation each, as in bitsandbytes;
* smaller ones, with ``page_small``, get a slice of a shared paged pool (a few large managed
  allocations), so paging the adapters does not cost one driver allocation per state tensor
  (``bench/paging_coverage.py`` measures both ways);
* on a device without managed memory (the CPU) every buffer is an ordinary tensor.

:func:`paging_coverage` reports how many bytes of state are paged and why the rest is not, and
:func:`repage_optimizer_state` puts state back into paged buffers after a checkpoint load turned
it into ordinary tensors. Framework-free: the Lightning mixin and other adapters call these.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch

from lightning_paged.core.compat.bitsandbytes import route_double_state_buffer
from lightning_paged.core.units import format_bytes

PAGE_THRESHOLD = 100_000
"""bitsandbytes pages a state only when its parameter has at least this many elements."""
POOL_SLAB_BYTES = 64 * 2**20
"""Size of each managed allocation the pool carves small states from (larger requests get their own size)."""
POOL_ALIGN = 512
"""Byte alignment of each state inside a pool slab (what the CUDA caching allocator guarantees too)."""
LIVE_BYTES = "live_bytes"
"""Attribute of a pool slab: bytes of state carved from it so far (the rest of it was never touched)."""
STATE_BUFFERS = ("state1", "state2")
"""The per-parameter buffers bitsandbytes can page; quantization maps and block maxima never are."""

BELOW_THRESHOLD = "below threshold"
OPTIMIZER_NOT_PAGED = "optimizer not paged"
NO_MANAGED_MEMORY = "platform without managed memory"
BOOKKEEPING = "bookkeeping (quantization maps, block maxima, norms)"
NOT_REPAGED = "ordinary tensor where paging applies (not re-paged after a checkpoint load)"
NOT_BITSANDBYTES = "not a bitsandbytes optimizer"


def unavailable_on(device: torch.device) -> str:
    return f"paging unavailable on {device.type}"


class ManagedMemory:
    """Unified-memory primitives, through bitsandbytes' ``cudaMallocManaged`` wrapper.

    The seam of this module: everything above it (threshold, pool, coverage, re-paging) runs on
    CPU in tests and in the benchmark with a subclass that hands out host tensors marked paged.
    Counts its allocations for the coverage benchmark.
    """

    def __init__(self) -> None:
        self.allocations = 0
        self.allocated_bytes = 0
        self.prefetches = 0

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why state for a parameter on ``device`` cannot be paged; None when it can."""
        if device.type != "cuda":
            return unavailable_on(device)
        if not _supports_managed_memory(_device_index(device)):
            return NO_MANAGED_MEMORY
        return None

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """``nbytes`` of uninitialized managed memory as a flat uint8 tensor marked paged."""
        from bitsandbytes import functional as F

        buffer = F.get_paged(nbytes, dtype=torch.uint8, device=torch.device("cuda", _device_index(device)))
        F.GlobalPageManager.get_instance().paged_tensors.append(buffer)
        self.allocations += 1
        self.allocated_bytes += nbytes
        return buffer

    def zero_(self, buffer: torch.Tensor) -> None:
        """Zero a paged byte range on the device (a CPU write would migrate its pages to the host)."""
        from bitsandbytes import functional as F

        F.fill(buffer, 0)

    def prefetch(self, tensor: torch.Tensor) -> None:
        """Ask the driver to move a paged tensor's pages to its device ahead of the update."""
        from bitsandbytes import functional as F

        self.prefetches += 1
        F.prefetch_tensor(tensor)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _supports_managed_memory(index: int) -> bool:
    """``cudaDevAttrManagedMemory`` of a device; True when the runtime cannot be asked."""
    import ctypes

    major = (torch.version.cuda or "").split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so"):  # torch's runtime, already loaded
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        value = ctypes.c_int(0)
        if runtime.cudaDeviceGetAttribute(ctypes.byref(value), 83, index) == 0:  # cudaDevAttrManagedMemory
            return bool(value.value)
        return True
    return True


def _mark_paged(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    tensor.is_paged = True  # type: ignore[attr-defined]
    tensor.page_deviceid = getattr(like, "page_deviceid", None)  # type: ignore[attr-defined]
    return tensor


class PagedPool:
    """Paged buffers for small states, carved from a few large managed allocations ("slabs").

    Each buffer starts at a :data:`POOL_ALIGN`-byte boundary and is zeroed on its own, so the
    untouched tail of a slab never gets physical pages. Buffers are never returned to the pool:
    optimizer state lives as long as the optimizer (bitsandbytes frees no paged memory either).
    """

    def __init__(self, memory: ManagedMemory, slab_bytes: int = POOL_SLAB_BYTES) -> None:
        self.memory = memory
        self.slab_bytes = slab_bytes
        self._slabs: dict[int | None, tuple[torch.Tensor, int]] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        span = -(-nbytes // POOL_ALIGN) * POOL_ALIGN
        slab, used = self._slabs.get(device.index, (None, 0))
        if slab is None or used + span > slab.numel():
            slab, used = self.memory.allocate(max(self.slab_bytes, span), device), 0
        self._slabs[device.index] = (slab, used + span)
        setattr(slab, LIVE_BYTES, getattr(slab, LIVE_BYTES, 0) + nbytes)  # what the monitor reports
        raw = _mark_paged(slab[used : used + nbytes], slab)
        self.memory.zero_(raw)
        return _mark_paged(raw.view(dtype).view(shape), slab)


@dataclass
class PagingPolicy:
    """Where a bitsandbytes optimizer's state buffers come from. Install with :func:`install_paging`."""

    page_small: bool = True
    """Page the state of parameters below bitsandbytes' 100,000-element threshold too (LoRA adapters)."""
    pooled: bool = True
    """Carve those small states from a shared pool instead of one managed allocation each."""
    memory: ManagedMemory = field(default_factory=ManagedMemory)
    """The unified-memory primitives (replaced by host tensors in CPU tests)."""
    pool: PagedPool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pool = PagedPool(self.memory)

    def unpaged_reason(self, optimizer: torch.optim.Optimizer, param: torch.Tensor) -> str | None:
        """Why this parameter's state is not paged under this policy; None when it is."""
        if not getattr(optimizer, "is_paged", False):
            return OPTIMIZER_NOT_PAGED
        reason = self.memory.unavailable_reason(param.device)
        if reason is not None:
            return reason
        if param.numel() < PAGE_THRESHOLD and not self.page_small:
            return BELOW_THRESHOLD
        return None

    def paged_buffer(self, param: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zeroed paged buffer for one state of ``param``.

        An empty state is an ordinary empty tensor: bitsandbytes' ``fill`` of zero elements would
        launch a CUDA kernel over no blocks, whose failed launch check ends the process.
        """
        if math.prod(shape) == 0:
            return torch.zeros(shape, dtype=dtype, device=param.device)
        if param.numel() < PAGE_THRESHOLD and self.pooled:
            return self.pool.take(shape, dtype, param.device)
        flat = self.memory.allocate(math.prod(shape) * dtype.itemsize, param.device)
        self.memory.zero_(flat)
        return _mark_paged(flat.view(dtype).view(shape), flat)

    def state_buffer(
        self,
        optimizer: torch.optim.Optimizer,
        param: torch.Tensor,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        if self.unpaged_reason(optimizer, param) is not None:
            return torch.zeros(shape, dtype=dtype, device=param.device)
        return self.paged_buffer(param, shape, dtype)


def bitsandbytes_policy(memory: ManagedMemory | None = None) -> PagingPolicy:
    """The policy that reproduces bitsandbytes' own choice: one allocation per state, large parameters only."""
    return PagingPolicy(page_small=False, pooled=False, memory=memory or ManagedMemory())


def policy_of(optimizer: torch.optim.Optimizer) -> PagingPolicy:
    """The policy installed on ``optimizer``, or bitsandbytes' own rule for one built elsewhere."""
    policy = getattr(optimizer, "paging_policy", None)
    return policy if isinstance(policy, PagingPolicy) else bitsandbytes_policy()


def is_bitsandbytes_optimizer(optimizer: Any) -> bool:
    from bitsandbytes.optim.optimizer import Optimizer8bit

    return isinstance(optimizer, Optimizer8bit)


def _get_state_buffer(self: Any, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return self.paging_policy.state_buffer(self, p, tuple(p.shape), dtype)


def _get_state_double_buffer(self: Any, p: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return self.paging_policy.state_buffer(self, p, (2, *p.shape), dtype)


def _prefetch_state(self: Any, p: torch.Tensor) -> None:
    if not self.is_paged:
        return
    state = self.state[p]
    for key in STATE_BUFFERS:
        buffer = state.get(key)
        if buffer is not None and getattr(buffer, "is_paged", False):
            self.paging_policy.memory.prefetch(buffer)


def _standalone(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _standalone(item) for key, item in value.items()}
    if not isinstance(value, torch.Tensor) or not getattr(value, "is_paged", False):
        return value
    if value.untyped_storage().nbytes() != value.nbytes:
        return value.clone()  # a slice of a pool slab: save its own bytes, not the whole slab
    return value.detach()  # same memory, without the is_paged flag that torch.save would keep


def _standalone_pool_views(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """State-dict hook: paged state as plain tensors, each on its own.

    ``torch.save`` keeps a tensor's Python attributes, so a loaded checkpoint would claim
    ``is_paged`` for ordinary memory; and it writes the whole storage of a view, so pool slices
    would bring their whole slab (and fail outright when a slab holds two dtypes). New dicts
    throughout: the live optimizer state is left as it is.
    """
    state_dict["state"] = {index: _standalone(state) for index, state in state_dict["state"].items()}
    return state_dict


def install_paging(optimizer: torch.optim.Optimizer, policy: PagingPolicy) -> None:
    """Route a bitsandbytes optimizer's state allocation and prefetching through ``policy``.

    Replaces, on this one instance, the three methods bitsandbytes allocates and prefetches
    state with (``get_state_buffer``, AdEMAMix's ``_get_state_double_buffer`` and
    ``prefetch_state``), and registers a state-dict hook that saves pool slices on their own.
    State is created at the first ``step()``, so install before it.
    """
    if not is_bitsandbytes_optimizer(optimizer):
        raise TypeError(f"install_paging needs a bitsandbytes optimizer; got {type(optimizer).__name__}")
    optimizer.paging_policy = policy  # type: ignore[attr-defined]
    optimizer.get_state_buffer = MethodType(_get_state_buffer, optimizer)  # type: ignore[attr-defined]
    route_double_state_buffer(optimizer, _get_state_double_buffer)
    optimizer.prefetch_state = MethodType(_prefetch_state, optimizer)  # type: ignore[attr-defined]
    optimizer.register_state_dict_post_hook(_standalone_pool_views)


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A warning shown once per process for each ``key``, whatever the warning filters say."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def _slug(reason: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", reason.split(" (")[0].lower()).strip("_")


@dataclass
class PagingCoverage:
    """Bytes of optimizer state in paged memory and, for the rest, why not."""

    optimizer: str
    """Class name of the optimizer."""
    paged_bytes: int = 0
    paged_tensors: int = 0
    unpaged_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes not paged, by reason."""

    @property
    def total_bytes(self) -> int:
        return self.paged_bytes + sum(self.unpaged_bytes.values())

    @property
    def paged_fraction(self) -> float:
        return self.paged_bytes / self.total_bytes if self.total_bytes else 0.0

    def summary(self) -> str:
        if not self.total_bytes:
            return f"paging: {self.optimizer} has no state yet (it is created at the first step)"
        line = (
            f"paging: {format_bytes(self.paged_bytes)} of {format_bytes(self.total_bytes)} {self.optimizer} state "
            f"paged ({100.0 * self.paged_fraction:.1f}%, {self.paged_tensors} tensors)"
        )
        if self.unpaged_bytes:
            parts = sorted(self.unpaged_bytes.items(), key=lambda kv: -kv[1])
            line += "; not paged: " + ", ".join(f"{format_bytes(n)} {reason}" for reason, n in parts)
        return line

    def metrics(self, prefix: str = "paging/") -> dict[str, float]:
        """Flat metrics: paged/unpaged bytes, the paged fraction, and unpaged bytes per reason."""
        out = {
            f"{prefix}paged_bytes": float(self.paged_bytes),
            f"{prefix}unpaged_bytes": float(sum(self.unpaged_bytes.values())),
            f"{prefix}paged_fraction": self.paged_fraction,
        }
        for reason, n in self.unpaged_bytes.items():
            out[f"{prefix}unpaged_bytes/{_slug(reason)}"] = float(n)
        return out


def paging_coverage(optimizer: torch.optim.Optimizer) -> PagingCoverage:
    """Classify every tensor of the optimizer's state. Reads shapes and flags only, never paged data."""
    coverage = PagingCoverage(optimizer=type(optimizer).__name__)
    bnb = is_bitsandbytes_optimizer(optimizer)
    policy = policy_of(optimizer)
    seen: set[tuple[int, int]] = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                nbytes = value.numel() * value.element_size()
                ident = (value.data_ptr(), nbytes)
                if ident in seen or not nbytes:  # the shared quantization maps; empty states
                    continue
                seen.add(ident)
                if getattr(value, "is_paged", False):
                    coverage.paged_bytes += nbytes
                    coverage.paged_tensors += 1
                    continue
                if not bnb:
                    reason = NOT_BITSANDBYTES
                elif key not in STATE_BUFFERS:
                    reason = BOOKKEEPING
                else:
                    reason = policy.unpaged_reason(optimizer, param) or NOT_REPAGED
                coverage.unpaged_bytes[reason] = coverage.unpaged_bytes.get(reason, 0) + nbytes
    return coverage


def repage_optimizer_state(optimizer: torch.optim.Optimizer, policy: PagingPolicy | None = None) -> int:
    """Copy back into paged buffers the state tensors the policy pages but that are ordinary tensors.

    After ``optimizer.load_state_dict`` (and Lightning moving optimizer state to the device) every
    state is an ordinary tensor, and a resumed run can go out of memory where the fresh run did
    not. Values are copied exactly. Returns how many tensors were re-paged (0 on a CPU).
    """
    if not is_bitsandbytes_optimizer(optimizer):
        return 0
    policy = policy or policy_of(optimizer)
    repaged = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or policy.unpaged_reason(optimizer, param) is not None:
                continue
            for key in STATE_BUFFERS:
                value = state.get(key)
                if (
                    not isinstance(value, torch.Tensor)
                    or getattr(value, "is_paged", False)
                    or not value.numel()
                ):
                    continue
                buffer = policy.paged_buffer(param, tuple(value.shape), value.dtype)
                buffer.copy_(value)
                state[key] = buffer
                repaged += 1
    return repaged
