"""The eviction monitor on a Fabric run's device and rank."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric import Fabric

from lightning_paged.core.eviction.loop import LoopEvictionMonitor


def fabric_eviction_monitor(
    fabric: Fabric, log_dir: str | os.PathLike[str], **settings: Any
) -> LoopEvictionMonitor:
    """A :class:`LoopEvictionMonitor` on Fabric's device and rank; ``settings`` as for that class."""
    return LoopEvictionMonitor(
        log_dir, fabric.device, rank=fabric.global_rank, world_size=fabric.world_size, **settings
    )


__all__ = ["LoopEvictionMonitor", "fabric_eviction_monitor"]
