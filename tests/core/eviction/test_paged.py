"""Bytes of paged tensors, from metadata only."""

from __future__ import annotations

import torch

from lightning_paged.core.eviction.paged import PagedBytes


def test_paged_bytes_come_from_metadata_only():
    import bitsandbytes.functional as F

    paged = F.GlobalPageManager.get_instance().paged_tensors
    meta = torch.empty(1000, 100, device="meta")  # no storage: reading any element would fail
    meta.page_deviceid = 0
    paged.append(meta)
    try:
        assert PagedBytes(0)() == 400_000
        assert PagedBytes(1)() == 0
    finally:
        paged.remove(meta)
