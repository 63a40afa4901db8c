"""EvictionMonitor: unified-memory eviction per training step, next to the batch's sequence length."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch.optim import Optimizer
from typing_extensions import override

from lightning_paged.compat import lightning as lightning_compat
from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.breakdown import memory_breakdown
from lightning_paged.core.eviction.prediction import comparison_for
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.run import (
    check_monitor_settings,
    event_log_path,
    record_metrics,
    share_summary,
)
from lightning_paged.core.eviction.sources import MemoryProbe, SourceSetting
from lightning_paged.core.eviction.summary import Summary


class EvictionMonitor(Callback):
    r"""Records, for every training step, how much paged memory the driver moved and how long the batch was.

    Each step becomes one line of a JSONL event log (see ``docs/monitor.md`` for every field), and the
    same figures go to the Trainer's loggers every ``log_every_n_steps``. At the end of ``fit`` a
    summary table is printed on rank zero and written next to the log. On DDP each rank records its
    own device into its own file (``eviction_events.rank<N>.jsonl``).

    The monitor never reads the contents of paged tensors: that would migrate their pages to the host.

    **Logged metrics** (all per step; a metric the active source cannot measure is not logged)

    - ``eviction/seq_len`` — padded sequence length of the batch (a packed batch: its row length)
    - ``eviction/longest_example`` — the longest single example in the batch (packed: the longest of
      the examples sharing its rows)
    - ``eviction/tokens`` — real tokens in the batch (sum of ``attention_mask``, or a packed batch's
      ``num_tokens``)
    - ``eviction/long_sequence`` — 1 when the step counts as a long-sequence step, else 0; judged on
      ``seq_len``, so a packed row of many short examples counts as long as one long example would:
      both make the step's activations as large
    - ``eviction/evicted_bytes`` — bytes the driver evicted from the GPU to host memory
    - ``eviction/paged_in_bytes`` — bytes migrated from host memory to the GPU
    - ``eviction/gpu_page_faults`` — GPU page-fault groups on managed memory (CUPTI only)
    - ``eviction/thrashing_events`` — thrashing records (CUPTI only)
    - ``eviction/optimizer_step_s`` — wall time of ``optimizer.step()``
    - ``eviction/step_s`` — wall time of the whole training step
    - ``eviction/device_free_bytes`` — lowest free device memory seen during the step
    - ``eviction/alloc_retries`` — caching-allocator retries during the step
    - ``eviction/ooms`` — out-of-memory errors during the step
    - ``eviction/paged_bytes_total`` — bytes of optimizer state in paged memory (sizes only)
    - ``eviction/paged_capacity_bytes`` — managed memory allocated for it (paging-pool slabs whole)

    With the ``pressure`` source the eviction and page-in figures are estimates; the log marks them
    with ``"estimated": true``.

    Example::

        from lightning import Trainer
        from lightning_paged.lightning.monitor import EvictionMonitor

        trainer = Trainer(callbacks=[EvictionMonitor(long_sequence_threshold=2048)])
    """

    def __init__(
        self,
        source: SourceSetting = "auto",
        log_path: str | None = None,
        long_sequence_threshold: int | None = None,
        seq_len_fn: Callable[[Any], int | tuple[int, int | None]] | None = None,
        log_metrics: bool = True,
        summary_top_k: int = 5,
    ) -> None:
        """
        Args:
            source: Where eviction events come from. ``"auto"``: CUPTI unified-memory counters when
                cupti-python is installed and CUPTI supports them here, else memory-pressure estimates on
                a CUDA device, else none (CPU). ``"cupti"`` or ``"pressure"`` force one (with a warning and
                the same fallback when it cannot run); ``"none"`` records lengths and times only.
            log_path: JSONL event log. Default: ``eviction_events.jsonl`` in the Trainer's log directory
                (``trainer.log_dir``, else ``default_root_dir``). Runs append to an existing file.
            long_sequence_threshold: Sequence lengths at or above this count as long. Unset: a step is
                long when its length is above the 90th percentile of the lengths seen so far.
            seq_len_fn: For batches that are not a mapping with ``input_ids``/``attention_mask`` or a
                tensor: a function from the batch to its padded length, or to ``(length, real_tokens)``.
            log_metrics: Also send the figures to the Trainer's loggers under ``eviction/``.
            summary_top_k: How many of the slowest steps the end-of-fit summary lists.
        """
        super().__init__()
        check_monitor_settings(source, long_sequence_threshold, summary_top_k)
        if seq_len_fn is not None and not callable(seq_len_fn):
            raise SettingError("seq_len_fn", seq_len_fn, "must be a function of the batch (an import path)")
        self.source = source
        self.log_path = log_path
        self.long_sequence_threshold = long_sequence_threshold
        self.seq_len_fn = seq_len_fn
        self.log_metrics = log_metrics
        self.summary_top_k = summary_top_k
        self.probe: MemoryProbe | None = None
        """Replaces the pressure source's CUDA reader (tests, other devices). Set before ``fit``."""
        self.recorder: EvictionRecorder | None = None
        self.summary: Summary | None = None
        self.path: Path | None = None
        self._log_dir: Path | None = None

    def before_cuda_init(self, device: torch.device) -> None:
        """Configure CUPTI's unified-memory counters before the CUDA context exists, as NVIDIA's samples do.

        The QLoRA strategies call this from ``setup_environment``, before the device set-up creates
        the context; without them the source configures when the fit starts. A refusal is kept and
        reported once when the source starts, which then falls back to the pressure source.
        """
        if (
            self.source not in ("auto", "cupti")
            or device.type != "cuda"
            or getattr(torch.version, "hip", None)
        ):
            return
        from lightning_paged.core.eviction.sources.cupti_setup import configure_counters, cupti_importable

        if cupti_importable():
            configure_counters(device.index or 0)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        log_dir = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank calls it
        self._log_dir = Path(log_dir)
        self.path = event_log_path(self._log_dir, self.log_path, trainer.global_rank, trainer.world_size)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self.summary = None
        self.recorder = EvictionRecorder.open(
            self.source,
            trainer.strategy.root_device,
            self.path,
            notify=_warn,
            probe=self.probe,
            long_sequence_threshold=self.long_sequence_threshold,
            seq_len_fn=self.seq_len_fn,
            rank=trainer.global_rank,
            top_k=self.summary_top_k,
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.recorder is not None:
            self.recorder.begin_step(batch, step=trainer.fit_loop.epoch_loop.total_batch_idx)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.recorder is not None:
            self.recorder.begin_optimizer_step()

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.recorder is None:
            return
        record = self.recorder.end_step()
        if (
            self.log_metrics
            and trainer.loggers
            and lightning_compat.logger_connector(trainer).should_update_logs
        ):
            metrics = record_metrics(record)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=lightning_compat.batches_that_stepped(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.recorder is None:
            return
        self.summary = self.recorder.close()
        self.recorder = None
        self.summary.memory = _memory(trainer, pl_module)
        text = share_summary(self.summary, trainer.global_rank, trainer.world_size, self._log_dir)
        if trainer.is_global_zero:
            comparison = comparison_for(self.path) if self.path is not None else None
            rank_zero_info(text if comparison is None else f"{text}\n\n{comparison}")

    @override
    def state_dict(self) -> dict[str, Any]:
        """The run id, so that a resumed run's records continue the same run in the log."""
        return {"run_id": self.recorder.run_id} if self.recorder is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after on_fit_start, once the recorder exists.
        run_id = state_dict.get("run_id")
        if isinstance(run_id, str) and self.recorder is not None:
            self.recorder.run_id = run_id

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            self.summary = self.recorder.close()
            self.recorder = None


def _warn(message: str) -> None:
    rank_zero_warn(f"EvictionMonitor: {message}")


def _memory(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any] | None:
    """The sizes a step's memory is made of, for the summary (None for a model without a transformers config)."""
    qlora = getattr(trainer.strategy, "qlora", None)
    breakdown = memory_breakdown(
        pl_module,
        trainer.optimizers,
        loss=getattr(pl_module, "loss_in_use", "standard"),
        chunk_size=getattr(pl_module, "loss_chunk_size", 256),
        offload=bool(getattr(qlora, "offload_activations", False)),
    )
    return None if breakdown is None else breakdown.to_dict()
