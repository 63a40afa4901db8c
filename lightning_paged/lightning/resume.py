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

Two more things make the resumed run's bookkeeping that of an uninterrupted run:

- **Loop counters.** Lightning resumes exactly only from the counters it saves at
  ``on_train_batch_end``. A checkpoint written later in the same step (``on_validation_end``, the end
  of an epoch, ``on_train_end`` after ``max_steps`` stopped a fit mid-epoch, a ``save_checkpoint``
  after ``fit``) holds counters from which lightning 2.6 numbers the resumed steps one too high, and
  after an epoch end or a stop mid-epoch starts a new epoch with the data of the one after it
  (``loops/training_epoch_loop.py``: ``reset`` and the ``restarted_on_last`` branch of ``advance``;
  ``loops/fit_loop.py``: ``on_advance_start``). Every checkpoint saved by a QLoRA strategy holds the
  counters of ``on_train_batch_end`` of its last trained batch instead (:func:`settle_loops`).
- **The step's metrics row.** Lightning hands a step's metrics to the loggers after its
  ``on_train_batch_end`` callbacks, where the checkpoint of the step is written. Loggers with a
  ``write_ahead`` method (:class:`~lightning_paged.lightning.csv_logger.ResumableCSVLogger`) get the
  row right after the optimizer step instead, so a kill while the checkpoint is written keeps it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist
from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_paged.compat import lightning as lightning_compat
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
        self.steps_before_batch: int | None = None
        """Lightning's logger step (``_batches_that_stepped``) when the last training batch started."""
        self.resumed = False
        self._started = False

    def state(self, checkpoint: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """What a checkpoint saved now must hold to resume exactly (every rank must call this).

        The fit loop's counters in ``checkpoint["loops"]`` are first settled (:func:`settle_loops`);
        the data position is read from them.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        loops = (checkpoint or {}).get("loops") or {}
        fit_loop = loops.get("fit_loop") or trainer.fit_loop.state_dict()
        if self.steps_before_batch is not None:
            settle_loops(fit_loop, self.steps_before_batch)
        epoch, batches = data_position(fit_loop, trainer.num_training_batches)
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
            fetcher = lightning_compat.data_fetcher(self.trainer.fit_loop)
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

    def after_optimizer_step(self) -> None:
        """Hand the step's metrics row to the loggers that write it ahead, before its callbacks run.

        The row is the one Lightning logs after the step's ``on_train_batch_end`` callbacks (same
        metrics, ``epoch`` and step, and only when Lightning will log it); those loggers then skip
        what they already wrote. Metrics are read on rank zero only: reading a step's values runs
        no collective.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or not trainer.is_global_zero:
            return
        loggers = [logger for logger in trainer.loggers if callable(getattr(logger, "write_ahead", None))]
        module = trainer.lightning_module
        if not loggers or module is None or not module.automatic_optimization:
            return
        if not lightning_compat.logging_started(trainer):
            return
        connector = lightning_compat.logger_connector(trainer)
        if not (connector.should_update_logs or trainer.fast_dev_run):
            return
        row = convert_tensors_to_scalars(connector.metrics["log"])
        if not row:
            return
        step = row.pop("step", None)
        if step is None:
            row.setdefault("epoch", trainer.current_epoch)
            step = lightning_compat.batches_that_stepped(trainer)
        for logger in loggers:
            logger.write_ahead(row, int(step))

    def before_batch(self) -> None:
        """Put the generator states back: each step draws what it would have drawn in an uninterrupted run.

        The first step of a resume takes the checkpoint's states; every later step (and every step
        of a run that did not resume) the states its previous step ended with.
        """
        if not self._started:
            self._started = True
            self._start_fit()
        if self.trainer is not None:
            self.steps_before_batch = lightning_compat.batches_that_stepped(self.trainer)
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
        step = lightning_compat.batches_that_stepped(trainer)
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
                lightning_compat.keep_checkpoint_names(callback)
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


def settle_loops(fit_loop: dict[str, Any], steps_before_batch: int) -> None:
    """Put a checkpoint's fit-loop counters in the form Lightning saves at ``on_train_batch_end``.

    Saved later in the step (validation end, epoch end, ``on_train_end``) the last trained batch is
    already counted as completed, and after the epoch loop ended the epoch too, and the logger step
    has moved on. Those counts are taken back: Lightning's restore then counts them again itself, as
    it does for a checkpoint of ``on_train_batch_end``, and continues the same epoch at the next
    batch (or, after the epoch's last batch, with the next epoch). ``steps_before_batch`` is the
    logger step when the last trained batch started. Counters in any other form (nothing trained yet
    in the epoch, already that form) are left as they are. Validation progress is left too: it only
    tells Lightning whether to finish an interrupted validation.
    """
    batches = fit_loop.get("epoch_loop.batch_progress")
    epochs = fit_loop.get("epoch_progress")
    counters = fit_loop.get("epoch_loop.state_dict")
    if not (isinstance(batches, dict) and isinstance(epochs, dict) and isinstance(counters, dict)):
        return
    batch_counts = [batches["current"], batches["total"]]
    if batches["current"]["processed"] < 1 or any(len(set(c.values())) != 1 for c in batch_counts):
        return  # nothing trained in this epoch yet, or on_train_batch_end's form already
    for counts in batch_counts:
        counts["completed"] -= 1
    for counts in (epochs["current"], epochs["total"]):
        counts["processed"] = counts["completed"] = min(counts["completed"], counts["started"] - 1)
    counters["_batches_that_stepped"] = steps_before_batch


def data_position(fit_loop: dict[str, Any], batches_per_epoch: float) -> tuple[int, int]:
    """``(epoch, batch)`` of the next batch to train, from (settled) fit-loop counters."""
    epochs = fit_loop["epoch_progress"]["current"]
    batches = fit_loop["epoch_loop.batch_progress"]
    if epochs["completed"] >= epochs["ready"]:  # between epochs
        return epochs["completed"], 0
    if batches["is_last_batch"] or batches["current"]["ready"] >= batches_per_epoch:
        return epochs["completed"] + 1, 0
    return epochs["completed"], batches["current"]["ready"]
