"""``ResumableCSVLogger``: one ``metrics.csv`` per run that resumes keep whole, from step 0.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when its directory is reused
(lightning 2.6 ``fabric/loggers/csv_logs.py``, ``_ExperimentWriter._check_log_dir_exists``), so a
run resumed into a fixed ``version`` keeps only the steps after the resume, and it writes rows in
batches of ``flush_logs_every_n_steps`` (100), so a crash loses up to 99 of them.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_paged.core.atomic import atomic_write


class ResumableCSVLogger(CSVLogger):
    """A ``CSVLogger`` whose metrics survive crashes and resumes.

    - Every logged row is written at once (``flush_logs_every_n_steps=1``) and the file is flushed
      again at every checkpoint: a crash loses no logged row, at most the last line it was writing.
    - Under a QLoRA strategy a training step's row is written right after its optimizer step
      (:meth:`write_ahead`), before the step's ``on_train_batch_end`` callbacks write its
      checkpoint: a kill while that checkpoint is written keeps the row. Lightning's own logging of
      the row a moment later then adds only what the callbacks logged since.
    - An existing ``metrics.csv`` is kept. When a fit starts, the rows it will log again are
      dropped: those from its first step on (all of them for a fit from scratch; after a resume,
      the steps the interrupted run logged after its checkpoint), and an unfinished last line.
      The file then holds every logged step once, from step 0, after any number of resumes.
    - Rewrites (a new column, a resume) are atomic: a kill leaves the old file or the new one.

    The QLoRA strategies tell it where a fit starts (:meth:`resume_from_step`) and hand it each
    step's row early; with another strategy it keeps and appends. Arguments are ``CSVLogger``'s.
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 1,
    ) -> None:
        super().__init__(
            save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        self._ahead: tuple[int, dict[str, Any]] | None = None
        """The step and values of the row last written ahead, which Lightning will log again."""

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment  # type: ignore[return-value]

    @rank_zero_only
    def resume_from_step(self, step: int) -> None:
        """A fit continues at logger step ``step``: drop the rows from ``step`` on (it logs them again)."""
        self.save()
        self.experiment.drop_from(step)

    @rank_zero_only
    def write_ahead(self, metrics: dict[str, Any], step: int) -> None:
        """Write a training step's row now and to disk; a later :meth:`log_metrics` of the same values skips them."""
        super().log_metrics(metrics, step)
        self.save()
        self._ahead = (step, dict(metrics))

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._ahead is not None:
            ahead_step, written = self._ahead
            if step == ahead_step:
                metrics = {k: v for k, v in metrics.items() if k not in written or not _same(written[k], v)}
                if not metrics:
                    return
            else:
                self._ahead = None
        super().log_metrics(metrics, step)

    @override
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        self.save()


class _KeepingWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (its columns too) and rewrites it atomically."""

    @override
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            header, rows, unfinished = self._read()
            self.metrics_keys = header
            if unfinished:
                self._write(header, rows)

    def drop_from(self, step: int) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        header, rows, unfinished = self._read()
        kept = [row for row in rows if _step(row) is not None and _step(row) < step]  # type: ignore[operator]
        if unfinished or len(kept) != len(rows):
            self._write(header, kept)

    @override
    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        self._write(fieldnames, self._read()[1])

    def _read(self) -> tuple[list[str], list[dict[str, str]], bool]:
        """Header, complete rows, and whether the file ended in a line a killed run did not finish."""
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            text = file.read()
        unfinished = bool(text) and not text.endswith("\n")
        if unfinished:
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        rows = [row for row in reader if None not in row and None not in row.values()]
        return list(reader.fieldnames or []), rows, unfinished

    def _write(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        if "://" in self.metrics_file_path:
            with self._fs.open(self.metrics_file_path, "wb") as file:
                file.write(data)
        else:
            atomic_write(self.metrics_file_path, lambda file: file.write(data))


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def _same(a: Any, b: Any) -> bool:
    """Equal values, NaN equal to NaN (a step's NaN loss is the same value when logged again)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
