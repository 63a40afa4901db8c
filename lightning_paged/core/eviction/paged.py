"""Total size of bitsandbytes' paged tensors, read from metadata only.

bitsandbytes lists every paged (``cudaMallocManaged``) buffer in
``functional.GlobalPageManager.get_instance().paged_tensors`` and never frees them. Their sizes come
from ``Tensor.nbytes`` (shape times element size): no element is read, so no page migrates to the
host. Reading a value, a norm or a copy of such a tensor from Python would.
"""

from __future__ import annotations

import sys


class PagedBytes:
    """Callable giving the bytes of paged tensors on one device (all devices when ``device_index`` is None).

    bitsandbytes is looked up in ``sys.modules`` rather than imported: a run that never imported it
    has no paged tensors, and the monitor should not pay for the import. The sum is cached until the
    list grows (bitsandbytes only appends to it).
    """

    def __init__(self, device_index: int | None = None) -> None:
        self.device_index = device_index
        self._seen = 0
        self._total = 0

    def __call__(self) -> int:
        functional = sys.modules.get("bitsandbytes.functional")
        manager = getattr(functional, "GlobalPageManager", None)
        if manager is None:
            return 0
        tensors = manager.get_instance().paged_tensors
        if len(tensors) != self._seen:
            self._seen = len(tensors)
            self._total = sum(
                t.nbytes
                for t in list(tensors)
                if self.device_index is None
                or getattr(t, "page_deviceid", self.device_index) == self.device_index
            )
        return self._total
