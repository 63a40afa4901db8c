"""``InstructionDataModule``: the instruction data of :mod:`lightning_paged.core.instructions` as a LightningDataModule.

The data logic (formats, response-only labels, truncation, the split, packing, batching) is
framework-free in :class:`~lightning_paged.core.instructions.InstructionData`; this module adds
Lightning's hooks and reports on rank zero.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_paged.core.instructions import (
    ALPACA_INPUT,
    ALPACA_PROMPT,
    ROLE_HEADER,
    InstructionData,
)
from lightning_paged.core.packing import IGNORE_INDEX
from lightning_paged.core.sampling import LengthGroupedBatchSampler

__all__ = ["IGNORE_INDEX", "InstructionDataModule", "LengthGroupedBatchSampler"]


class InstructionDataModule(InstructionData, LightningDataModule):
    """Alpaca-style or chat instruction data from a local JSON/JSONL file, with response-only labels."""

    def __init__(
        self,
        data_path: str,
        tokenizer: str = "byte",
        max_length: int = 512,
        batch_size: int = 8,
        val_split: int | float = 0.05,
        group_by_length: bool = False,
        packing: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        prompt_template: str = ALPACA_PROMPT,
        input_template: str = ALPACA_INPUT,
        role_header: str = ROLE_HEADER,
    ) -> None:
        LightningDataModule.__init__(self)
        self.save_hyperparameters()
        InstructionData.__init__(
            self,
            data_path,
            tokenizer,
            max_length,
            batch_size,
            val_split,
            group_by_length,
            packing,
            num_workers,
            seed,
            prompt_template,
            input_template,
            role_header,
        )

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
        """The validation split (the file has no separate test split)."""
        return self.val_loader()

    @override
    def info(self, message: str) -> None:
        rank_zero_info(message)

    @override
    def warn(self, message: str) -> None:
        rank_zero_warn(message)
