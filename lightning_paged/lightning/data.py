"""``InstructionDataModule``: the fine-tuning data of :mod:`lightning_paged.core.instructions` as a LightningDataModule.

The data logic (formats, chat templates, labels, truncation, the split, packing, batching) is
framework-free in :class:`~lightning_paged.core.instructions.InstructionData`; this module adds
Lightning's hooks and reports on rank zero.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_paged.core.encoding import ALPACA_INPUT, ALPACA_PROMPT, ROLE_HEADER
from lightning_paged.core.instructions import InstructionData
from lightning_paged.core.packing import IGNORE_INDEX
from lightning_paged.core.sampling import LengthGroupedBatchSampler

__all__ = [
    "ALPACA_INPUT",
    "ALPACA_PROMPT",
    "IGNORE_INDEX",
    "ROLE_HEADER",
    "InstructionDataModule",
    "LengthGroupedBatchSampler",
]


class InstructionDataModule(InstructionData, LightningDataModule):
    """Instruction, chat or text data from a local file, with labels on what the model should learn."""

    def __init__(self, data_path: str, *args: Any, **settings: Any) -> None:
        """Arguments are :class:`~lightning_paged.core.instructions.InstructionData`'s, typed and documented once there."""
        LightningDataModule.__init__(self)
        given = inspect.signature(InstructionData.__init__).bind(self, data_path, *args, **settings)
        given.apply_defaults()
        self.save_hyperparameters({k: v for k, v in given.arguments.items() if k != "self"})
        super().__init__(data_path, *args, **settings)

    __init__.__doc__ = InstructionData.__init__.__doc__  # one description of the settings, for --help too

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.load()

    @override
    def train_dataloader(self) -> DataLoader:
        return self.train_loader()

    @override
    def val_dataloader(self) -> DataLoader | list:
        return self.val_loader()

    @override
    def test_dataloader(self) -> DataLoader | list:
        """The validation data (there is no separate test set)."""
        return self.val_loader()

    @override
    def info(self, message: str) -> None:
        rank_zero_info(message)

    @override
    def warn(self, message: str) -> None:
        rank_zero_warn(message)
