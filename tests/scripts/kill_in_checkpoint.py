"""A callback that SIGKILLs its own process while the checkpoint of one step is being saved.

Used by tests/commands/test_main.py through the real command:
``PYTHONPATH=tests/scripts lightning-paged fit ... --trainer.callbacks+=kill_in_checkpoint.KillWhileSaving
--trainer.callbacks.step 4``. Lightning calls ``on_save_checkpoint`` while it assembles the checkpoint,
after the step's optimizer step and before the file is written.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class KillWhileSaving(pl.Callback):
    """SIGKILL the process inside the save of the checkpoint of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
