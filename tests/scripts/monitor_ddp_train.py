"""Run by tests/lightning/test_monitor.py: two CPU processes (gloo, plain ``ddp``) train with an EvictionMonitor.

The subprocess launcher re-runs this script for rank 1, so it must be a script, not a test body.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lightning"))
from test_monitor import LENGTHS, TinyLM, batches

from lightning_paged.lightning.monitor import EvictionMonitor


def main(root: str) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        callbacks=[EvictionMonitor(source="none")],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(TinyLM(), train_dataloaders=DataLoader(batches(LENGTHS), batch_size=None))


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # gloo can abort at exit without it (see end_process_group)
        torch.distributed.destroy_process_group()
