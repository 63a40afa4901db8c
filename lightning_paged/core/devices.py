"""The device of a single-device QLoRA strategy, chosen by the framework from ``accelerator``/``devices``.

Lightning's Trainer and Fabric give a strategy chosen by name its devices after construction; the
single-device strategies take the first, and refuse several (data parallel is the DDP strategy's).
"""

from __future__ import annotations

import torch

from lightning_paged.core.errors import SettingError

SEVERAL_DEVICES = (
    "is more than one device, which paged_qlora cannot use; use strategy='paged_qlora_ddp' for data "
    "parallel training, or devices=1"
)


def check_one_device(devices: list[torch.device] | None, setting: str) -> None:
    """Refuse more than one device, naming ``setting`` (``trainer.devices`` or ``devices``)."""
    if devices and len(devices) > 1:
        raise SettingError(setting, len(devices), SEVERAL_DEVICES)


def chosen_device(devices: list[torch.device] | None, root: torch.device, explicit: bool) -> torch.device:
    """``root`` when the device was given explicitly, else the first device the framework chose (or ``root``)."""
    return torch.device(devices[0]) if devices and not explicit else root
