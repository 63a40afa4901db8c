"""Exact resume for the QLoRA strategies: the data position and the random generators, saved and restored.

Lightning restores the weights, optimizer, schedulers and loop counters, but neither the random
generators (dropout draws from them) nor the place in a shuffled epoch unless the ``DataLoader``
itself is stateful. :class:`ResumeTracker` fills both gaps for a strategy:

- at every save it records the next batch to train (epoch and batch index, from Lightning's own
  progress counters, which do not count the batch Lightning has prefetched) and the generator
  states of every rank;
- on resume it positions each training loader built on a
  :class:`~lightning_paged.core.sampling.ResumableSampler` at that batch, and puts the generator
  states back right before the first resumed batch, after everything that runs between the restore
  and the first step (loader set-up, ``on_train_start``) has drawn its numbers.

The generator states are those at the end of the last training step, not at the moment of the save,
and every training step starts from them, in an uninterrupted run too. What runs between two steps
(the checkpoint itself, validation and the sample it generates, a new epoch's loader) may draw from
the global generators without shifting the training stream: starting a ``DataLoader`` iterator
without a ``generator`` draws its base seed from the global one (torch ``dataloader.py``,
``_BaseDataLoaderIter.__init__``), and a validation that ran after the save in the interrupted run
is skipped by the resumed one. Without this, dropout masks after a resume from a step that also
validated differ from the uninterrupted run's.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_paged.core.atomic import remove_stale_partials
from lightning_paged.core.sampling import (
    capture_rng_state,
    is_resumable,
    restore_rng_state,
    resume_dataloader,
)

_LIGHTNING_MID_EPOCH_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


class ResumeTracker:
    """The resume state of one strategy; ``begin`` at every ``setup``."""

    def __init__(self) -> None:
        self._quiet: Any = None
        self.begin(None)

    def begin(self, trainer: Any) -> None:
        """Forget the loaders and pending state of an earlier ``fit``."""
        self._end_quiet()
        self.trainer = trainer
        self.loaders: list[Any] = []
        self.position: tuple[int, int] | None = None
        self.rng: dict[str, Any] | None = None
        self.training_rng: dict[str, Any] | None = None
        """The generator states at the end of the last training step: where the next one starts."""
        self.resumed = False
        self._started = False

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint saved now must hold to resume exactly (every rank must call this)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        epochs = trainer.fit_loop.epoch_progress.current
        batches_done = trainer.fit_loop.epoch_loop.batch_progress
        if epochs.completed >= epochs.ready:  # between epochs (fit stopped at max_steps counts it done)
            epoch, batches = epochs.completed, 0
        elif batches_done.is_last_batch or batches_done.current.ready >= trainer.num_training_batches:
            epoch, batches = epochs.completed + 1, 0
        else:
            epoch, batches = epochs.completed, batches_done.current.ready
        rng = self.training_rng if self.training_rng is not None else capture_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every_rank: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every_rank, rng)
        else:
            every_rank = [rng]
        return {"epoch": epoch, "batches": batches, "rng": every_rank}

    def restore(self, saved: dict[str, Any] | None, rank: int, world_size: int) -> None:
        """Take the state a checkpoint saved; applied to the loaders and generators before the first step."""
        if saved is None or self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        self.resumed = True
        self.position = (int(saved["epoch"]), int(saved["batches"]))
        rng = saved.get("rng") or []
        if len(rng) == world_size:
            self.rng = rng[rank]
        else:
            rank_zero_warn(
                f"The checkpoint holds random generator states of {len(rng)} processes, this run has "
                f"{world_size}: dropout draws after the resume differ from an uninterrupted run."
            )
        if self.loaders:
            # The training loader was built and iterated before the restore (Lightning does that when
            # configure_optimizers asks for trainer.estimated_stepping_batches): position it and let the
            # fit loop start a new iterator over it.
            self._position_loaders(self.loaders)
            fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)
            self.position = None

    def note_loader(self, loader: Any) -> None:
        """Called for every loader the strategy processes; positions training loaders on resume."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or not trainer.training:
            return
        self.loaders.append(loader)
        if self.position is not None:
            self._position_loaders([loader])

    def after_training_step(self) -> None:
        """Called when a training step's forward pass is done: its generator states start the next one."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self.training_rng = capture_rng_state()

    def before_batch(self) -> None:
        """Put the generator states back: each step draws what it would have drawn in an uninterrupted run.

        The first step of a resume takes the checkpoint's states; every later step (and every step
        of a run that did not resume) the states its previous step ended with.
        """
        if not self._started:
            self._started = True
            self._start_fit()
        self.position = None
        if self.rng is not None:
            restore_rng_state(self.rng)
            self.rng = None
        elif self.training_rng is not None:
            restore_rng_state(self.training_rng)
        self._end_quiet()

    def _start_fit(self) -> None:
        """At the first batch of a fit, once the checkpoint is restored and checked: tidy the run up.

        - Loggers with a ``resume_from_step`` method
          (:class:`~lightning_paged.lightning.csv_logger.ResumableCSVLogger`) drop the rows the fit
          will log again.
        - Temporary files a killed write left in the checkpoint directories and the log directory
          are removed.
        - After a resume, a checkpoint of a step that is already on disk replaces it instead of
          being saved beside it as ``-v1``: ``ModelCheckpoint`` versions a name that exists
          (lightning 2.6 ``callbacks/model_checkpoint.py``, ``_get_metric_interpolated_filepath_name``).
        """
        from lightning.pytorch.callbacks import ModelCheckpoint

        trainer = self.trainer
        if trainer is None:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            resume_from_step = getattr(logger, "resume_from_step", None)
            if callable(resume_from_step):
                resume_from_step(step)
        # Every rank reads log_dir (it broadcasts); without a logger it is default_root_dir: not ours.
        directories = [trainer.log_dir] if trainer.loggers and trainer.log_dir else []
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.dirpath is None:
                continue
            if self.resumed:
                callback._enable_version_counter = False
            directories.append(callback.dirpath)
        if trainer.is_global_zero:
            for directory in dict.fromkeys(str(d) for d in directories if "://" not in str(d)):
                for path in remove_stale_partials(directory):
                    rank_zero_info(f"Removed {path}, left by a write that was killed.")

    def _end_quiet(self) -> None:
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    def _position_loaders(self, loaders: list[Any]) -> None:
        assert self.position is not None
        epoch, batches = self.position
        exact = [resume_dataloader(loader, epoch, batches) for loader in loaders if is_resumable(loader)]
        if len(exact) < len(loaders):
            if batches:
                rank_zero_warn(
                    "A training DataLoader has no ResumableSampler (lightning_paged.core.sampling): resumed "
                    "mid-epoch, it starts its order again, so the batches differ from an uninterrupted run."
                )
            return
        rank_zero_info(f"Resuming the training data at epoch {epoch}, batch {batches}.")
        if batches and self._quiet is None:
            # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader is stateful;
            # the loaders were just positioned exactly, so that warning would be wrong here.
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message=_LIGHTNING_MID_EPOCH_WARNING)
