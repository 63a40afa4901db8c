"""``configure_optimizers`` for a LightningModule: a bitsandbytes optimizer by name, paged, over trainable parameters."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paged_optimizer import ConfiguredSettings, optimizer_and_schedule, optimizer_config
from lightning_paged.core.paging import (
    ManagedMemory,
    is_bitsandbytes_optimizer,
    paging_coverage,
    repage_optimizer_state,
)
from lightning_paged.lightning.strategies.base import PLACES

METRIC_PREFIX = "paging/"


class PagedOptimizerMixin(LightningModule):
    """Mix into a LightningModule (before it in the bases) instead of writing ``configure_optimizers``.

    Settings come from one :class:`OptimizerConfig`, which the module takes as a single init
    argument named ``optimizer`` so LightningCLI shows ``--model.optimizer.name``,
    ``--model.optimizer.lr``, ... The rule, first match wins:

    1. ``self.optimizer_config``, when the module sets it (``self.optimizer_config = optimizer``);
    2. ``self.hparams.optimizer``, when the module calls ``save_hyperparameters()``;
    3. the defaults of :class:`OptimizerConfig` (``paged_adamw_8bit``), for a module with no settings.

    Switch LightningCLI's own optimizer off (``auto_configure_optimizers=False``): it builds the
    optimizer over all parameters before any conversion adds the LoRA weights.

    The optimizer sees trainable (``requires_grad``) parameters only, with no weight decay on
    biases and norm weights; the scheduler steps once per optimizer step. Hooks used (call
    ``super()`` if you override them): the first ``on_train_batch_start`` puts optimizer state back into paged
    memory after a checkpoint load; ``on_train_batch_end`` reports paging coverage once, after the
    first optimizer step of each ``fit``, as an INFO line on rank zero and as logged metrics:

    * ``paging/paged_bytes``: bytes of optimizer state in paged (unified) memory;
    * ``paging/unpaged_bytes``: bytes in ordinary memory;
    * ``paging/paged_fraction``: paged share of all optimizer state, 0 to 1;
    * ``paging/unpaged_bytes/<reason>``: unpaged bytes per reason: ``below_threshold``,
      ``paging_unavailable_on_cpu``, ``platform_without_managed_memory``, ``optimizer_not_paged``,
      ``bookkeeping``, ``ordinary_tensor_where_paging_applies``.
    """

    optimizer_config: OptimizerConfig | None = None
    managed_memory: ManagedMemory | None = None
    """Unified-memory primitives for the paging policy; None: bitsandbytes' (a seam for CPU tests)."""
    _paging_report_after: int | None = None

    def resolved_optimizer_config(self) -> OptimizerConfig:
        """The settings by the rule in the class docstring, validated."""
        config: Any = self.optimizer_config
        if config is None:
            config = getattr(self.hparams, "optimizer", None)
        return optimizer_config(config, PLACES.optimizer)

    @override
    def configure_optimizers(self) -> Any:
        config = self.resolved_optimizer_config()
        optimizer, scheduler = optimizer_and_schedule(
            self,
            config,
            total_steps=None
            if config.scheduler == "constant" and not config.warmup_ratio
            else self._total_steps(),
            memory=self.managed_memory,
            where=PLACES.optimizer,
            if_empty=" (requires_grad); nothing to optimize",
        )
        self._configured = ConfiguredSettings(optimizer, scheduler)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _apply_configured_settings(self) -> None:
        """After a resume: the config's optimizer settings over the restored ones (see ``ConfiguredSettings``)."""
        configured = getattr(self, "_configured", None)
        if configured is None or not self.trainer.optimizers or not self.trainer.lr_scheduler_configs:
            return
        configured.apply(self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler)

    def _total_steps(self) -> float | None:
        if self._trainer is None:
            return None
        return self.trainer.estimated_stepping_batches

    def _bnb_optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in self.trainer.optimizers if is_bitsandbytes_optimizer(opt)]

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._repage_pending = True
        self._paging_report_after = self.trainer.global_step

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        # At the first batch of a fit every checkpoint restore has happened (with max_epochs and a
        # schedule, Lightning may restore after on_train_start), so re-paging here sees the loaded state.
        result = super().on_train_batch_start(batch, batch_idx)
        if getattr(self, "_repage_pending", False):
            self._repage_pending = False
            if self.trainer.ckpt_path:
                self._apply_configured_settings()
            repaged = sum(repage_optimizer_state(opt) for opt in self._bnb_optimizers())
            if repaged:
                rank_zero_info(
                    f"paging: {repaged} optimizer state tensors back in paged memory after the checkpoint load"
                )
        return result

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self._paging_report_after is None or self.trainer.global_step <= self._paging_report_after:
            return
        self._paging_report_after = None
        for index, optimizer in enumerate(self.trainer.optimizers):
            coverage = paging_coverage(optimizer)
            rank_zero_info(coverage.summary())
            prefix = METRIC_PREFIX if index == 0 else f"{METRIC_PREFIX}optimizer_{index}/"
            self.log_dict(coverage.metrics(prefix), on_step=True, on_epoch=False, rank_zero_only=True)
