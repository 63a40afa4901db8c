"""``RunConfigCallback``: the resolved config saved beside the logs once a fit has really started.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` at ``setup`` of every command (``fit``,
``validate``, ``test``), before the checkpoint is loaded and checked: a refused resume
or a ``validate`` run has then already replaced the run's config. This one writes only for ``fit``,
at ``on_train_start`` (after the checkpoint restore and its checks), atomically.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import SaveConfigCallback
from typing_extensions import override

from lightning_paged.core.atomic import atomic_write


class RunConfigCallback(SaveConfigCallback):
    """Saves the LightningCLI config to ``<log_dir>/config.yaml`` when training starts (``fit`` only)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet: the config is written at ``on_train_start``."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # broadcasts the directory: every rank calls it
        assert log_dir is not None
        if trainer.is_global_zero:
            path = os.path.join(log_dir, self.config_filename)
            if not self.overwrite and get_filesystem(log_dir).isfile(path):
                raise RuntimeError(
                    f"{path} exists; pass save_config_kwargs={{'overwrite': True}} to replace it"
                )
            if "://" in str(log_dir):
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
            else:
                text = self.parser.dump(self.config, skip_none=False)
                atomic_write(path, lambda file: file.write(text.encode("utf-8")))
            self.save_config(trainer, pl_module, "fit")
        self.already_saved = bool(trainer.strategy.broadcast(True))
