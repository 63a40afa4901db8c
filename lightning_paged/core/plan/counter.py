"""Live tensor bytes over time: every storage an operator creates, counted until it is freed.

:class:`LiveBytes` is a dispatch mode. Each operator's outputs are looked at once; a storage it has
not seen is added to the live total, and a weak reference takes it off again when the storage is
freed. It sees what operators return (the fake tensors of a dry run and real tensors alike), never
what a kernel allocates and frees inside itself: a ``workspace`` function adds that for the moment
of the call (see :mod:`lightning_paged.core.plan.cuda`).

Every storage has a category. Those registered with :meth:`LiveBytes.track` (weights, quantization
constants, optimizer state) keep theirs; the others are named after when they were made:
``activations`` (forward, before the output layer), ``loss`` (forward, from the output layer on),
``temporaries`` (backward and the optimizer step). :meth:`LiveBytes.track` also moves a counted
storage to another category after the fact (a parameter's gradient, known once autograd stored it),
and corrects the peaks recorded while it lived. For each phase the counter keeps the highest live
total, its split into categories, and what the CUDA caching allocator would reserve around it.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_paged.core.compat.torch import DispatchMode, tensor_leaves

ACTIVATIONS = "activations"
LOSS = "loss"
TEMPORARIES = "temporaries"
WORKSPACE = "kernel_workspace"
UNALLOCATED = frozenset({"optimizer_paged"})
"""Categories that are not the caching allocator's (managed memory): no rounding, no segments."""

Workspace = Callable[[Any, tuple, dict, Any], int]
"""Bytes an operator allocates and frees inside its kernel on the target device (``func, args, kwargs, out``)."""


def size_class(nbytes: int) -> str:
    """Which pool of the CUDA caching allocator serves an allocation (see ``cuda.allocator_slack``)."""
    if nbytes <= 1 << 20:
        return "small"
    if nbytes < 10 << 20:
        return "mid"
    return "large"


@dataclass
class Peak:
    """The highest live total of one phase and what made it up at that moment."""

    bytes: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)
    """Allocator-served bytes by size class (``small``, ``mid``, ``large``) and ``large_excess``."""
    seq: int = -1
    """Event number of the moment: storages made at or before it and not freed were live then."""


@dataclass
class _Entry:
    nbytes: int
    category: str
    born: int
    excess: int
    ref: Any = None


class LiveBytes(DispatchMode):
    """Counts live storage bytes per phase. Enter it (inside a ``FakeTensorMode`` for a dry run).

    Args:
        round_size: bytes an allocation of ``n`` bytes takes (the CUDA caching allocator rounds to
            512; identity on the host).
        workspace: bytes an operator needs inside its kernel on the target device, added to the live
            total for the moment of the call.
    """

    def __init__(
        self, round_size: Callable[[int], int] | None = None, workspace: Workspace | None = None
    ) -> None:
        super().__init__()
        self.round_size = round_size or (lambda n: n)
        self.workspace = workspace
        self.live = 0
        self.phase = "setup"
        self.region = ACTIVATIONS
        self.peaks: dict[str, Peak] = {}
        self._entries: dict[int, _Entry] = {}
        self._totals: dict[str, int] = {}
        self._classes: dict[str, int] = {}
        self._seq = itertools.count()
        self._host = 0
        self._host_entries: dict[int, Any] = {}
        self.host_bytes = 0
        """Live bytes made under :meth:`on_host` (activation offloading's copies): host memory, not the device's."""
        self.host_peak = 0

    # -- what is live --------------------------------------------------------------------------

    def _add(self, tensor: torch.Tensor, category: str | None) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage
            return
        ident = id(storage)
        if category is None and self._host and ident not in self._entries:
            self._add_host(storage, ident)
            return
        entry = self._entries.get(ident)
        if entry is not None:
            if category is not None and entry.category != category:
                self._move(entry, category)
            return
        raw = int(storage.nbytes())
        nbytes = self.round_size(raw) if raw else 0
        entry = _Entry(nbytes, category or self._creation_category(), next(self._seq), _excess(nbytes))
        entry.ref = weakref.ref(storage, functools.partial(self._forget, ident))
        self._entries[ident] = entry
        self._count(entry, +1)
        self._note_peak(self.live)

    def _add_host(self, storage: Any, ident: int) -> None:
        if ident in self._host_entries:
            return
        nbytes = int(storage.nbytes())
        self._host_entries[ident] = (
            nbytes,
            weakref.ref(storage, functools.partial(self._forget_host, ident)),
        )
        self.host_bytes += nbytes
        self.host_peak = max(self.host_peak, self.host_bytes)

    def _forget_host(self, ident: int, _ref: Any) -> None:
        entry = self._host_entries.pop(ident, None)
        if entry is not None:
            self.host_bytes -= entry[0]

    def _count(self, entry: _Entry, sign: int) -> None:
        self.live += sign * entry.nbytes
        self._totals[entry.category] = self._totals.get(entry.category, 0) + sign * entry.nbytes
        if entry.category not in UNALLOCATED and entry.nbytes:
            for name, n in _class_bytes(entry).items():
                self._classes[name] = self._classes.get(name, 0) + sign * n

    def _creation_category(self) -> str:
        return self.region if self.phase == "forward" else TEMPORARIES

    def _forget(self, ident: int, _ref: Any) -> None:
        self._free(ident)

    def _free(self, ident: int) -> None:
        entry = self._entries.pop(ident, None)
        if entry is not None:
            self._count(entry, -1)
            next(self._seq)

    def _move(self, entry: _Entry, category: str) -> None:
        self._count(entry, -1)
        old, entry.category = entry.category, category
        self._count(entry, +1)
        for peak in self.peaks.values():  # it was live at every peak since it was made
            if peak.seq < entry.born:
                continue
            peak.by_category[old] -= entry.nbytes
            if not peak.by_category[old]:
                del peak.by_category[old]
            peak.by_category[category] = peak.by_category.get(category, 0) + entry.nbytes
            if (old in UNALLOCATED) != (category in UNALLOCATED):
                sign = -1 if category in UNALLOCATED else 1
                for name, n in _class_bytes(entry).items():
                    peak.by_class[name] = peak.by_class.get(name, 0) + sign * n

    def _note_peak(self, total: int, extra: dict[str, int] | None = None) -> None:
        peak = self.peaks.setdefault(self.phase, Peak())
        if total <= peak.bytes:
            return
        peak.bytes = total
        peak.by_category = {k: v for k, v in self._totals.items() if v}
        peak.by_class = dict(self._classes)
        for name, n in (extra or {}).items():
            peak.by_category[name] = peak.by_category.get(name, 0) + n
            peak.by_class[size_class(n)] = peak.by_class.get(size_class(n), 0) + n
        peak.seq = next(self._seq)

    def track(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category``, moving it there if it is counted already."""
        self._add(tensor, category)

    def totals(self) -> dict[str, int]:
        """Live bytes per category now."""
        return {k: v for k, v in self._totals.items() if v}

    @contextmanager
    def on_host(self) -> Iterator[None]:
        """Storages made inside live in host memory (offloaded activations): counted apart, never on the device."""
        self._host += 1
        try:
            yield
        finally:
            self._host -= 1

    # -- phases --------------------------------------------------------------------------------

    @contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        """Attribute what happens inside to phase ``name`` (``forward``, ``backward``, ``optimizer``)."""
        previous, self.phase = self.phase, name
        self.region = ACTIVATIONS
        self._note_peak(self.live)
        try:
            yield
        finally:
            self.phase = previous

    def enter_loss_region(self) -> None:
        """From here until the forward phase ends, new storages are the loss's (logits and after)."""
        if self.phase == "forward":
            self.region = LOSS

    def reset_peaks(self) -> None:
        self.peaks = {}

    # -- the dispatch hook ---------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for leaf in tensor_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf, None)
        if self.workspace is not None:
            extra = self.workspace(func, args, kwargs, out)
            if extra:
                self._note_peak(self.live + extra, {WORKSPACE: extra})
        return out


def _excess(nbytes: int) -> int:
    """Bytes a large allocation's segment adds: the allocator rounds those to 2 MiB."""
    if size_class(nbytes) != "large":
        return 0
    return -(-nbytes // (2 << 20)) * (2 << 20) - nbytes


def _class_bytes(entry: _Entry) -> dict[str, int]:
    out = {size_class(entry.nbytes): entry.nbytes}
    if entry.excess:
        out["large_excess"] = entry.excess
    return out
