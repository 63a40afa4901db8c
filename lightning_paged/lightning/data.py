"""``InstructionDataModule``: the fine-tuning data of :mod:`lightning_paged.core.instructions` as a LightningDataModule.

The data logic (formats, chat templates, labels, truncation, the split, packing, batching) is
framework-free in :class:`~lightning_paged.core.instructions.InstructionData`; this module adds
Lightning's hooks and reports on rank zero.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_paged.core.encoding import ALPACA_INPUT, ALPACA_PROMPT, ROLE_HEADER
from lightning_paged.core.formats import FormatSetting
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

    def __init__(
        self,
        data_path: str,
        tokenizer: str = "byte",
        max_length: int = 512,
        batch_size: int = 8,
        val_split: int | float | None = None,
        val_path: str | None = None,
        group_by_length: bool = False,
        packing: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        format: FormatSetting = "auto",
        columns: dict[str, str] | None = None,
        chat_template: str = "auto",
        train_on_inputs: bool = False,
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
            val_path,
            group_by_length,
            packing,
            num_workers,
            seed,
            format,
            columns,
            chat_template,
            train_on_inputs,
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
        """The validation data (there is no separate test set)."""
        return self.val_loader()

    @override
    def info(self, message: str) -> None:
        rank_zero_info(message)

    @override
    def warn(self, message: str) -> None:
        rank_zero_warn(message)
