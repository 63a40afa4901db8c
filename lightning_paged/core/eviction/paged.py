"""Bytes of optimizer state in bitsandbytes' paged tensors, and the managed memory they take, from metadata only.

bitsandbytes lists every paged (``cudaMallocManaged``) buffer in
``functional.GlobalPageManager.get_instance().paged_tensors`` and never frees them. Most are one
state tensor each; the paging pool's slabs (``core/paging.py``) are 64 MiB allocations that hold
many small states and record the bytes of state carved from them in their ``live_bytes``
attribute. Sizes come from ``Tensor.nbytes`` (shape times element size) and that attribute: no
element is read, so no page migrates to the host. Reading a value, a norm or a copy of such a
tensor from Python would.
"""

from __future__ import annotations

import sys

from lightning_paged.core.paging import LIVE_BYTES


class PagedBytes:
    """Callable giving the bytes of state in paged tensors on one device (all devices when ``device_index`` is None).

    :meth:`capacity` gives the managed memory allocated for them (whole pool slabs). bitsandbytes is
    looked up in ``sys.modules`` rather than imported: a run that never imported it has no paged
    tensors, and the monitor should not pay for the import.
    """

    def __init__(self, device_index: int | None = None) -> None:
        self.device_index = device_index

    def _tensors(self) -> list:
        functional = sys.modules.get("bitsandbytes.functional")
        manager = getattr(functional, "GlobalPageManager", None)
        if manager is None:
            return []
        return [
            t
            for t in list(manager.get_instance().paged_tensors)
            if self.device_index is None
            or getattr(t, "page_deviceid", self.device_index) == self.device_index
        ]

    def __call__(self) -> int:
        """Bytes of state held in paged tensors: a whole tensor each, a pool slab's ``live_bytes``."""
        return sum(int(getattr(t, LIVE_BYTES, t.nbytes)) for t in self._tensors())

    def capacity(self) -> int:
        """Bytes of managed memory allocated for paged tensors (pool slabs counted whole)."""
        return sum(t.nbytes for t in self._tensors())
