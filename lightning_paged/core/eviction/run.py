"""What every eviction monitor does around its recorder: settings, file names, metrics and the summary.

The Lightning callback and the loop monitor of Fabric and Accelerate share these, so both write
the same files under the same names, log the same metric keys and refuse the same bad settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.eviction.sources import SOURCE_SETTINGS
from lightning_paged.core.eviction.summary import Summary

PREFIX = "eviction/"
"""Prefix of every logged metric."""
LOG_NAME = "eviction_events.jsonl"
"""The event log's name in the log directory."""
SUMMARY_NAME = "eviction_summary.txt"
"""The summary's name in the log directory."""
METRIC_FIELDS = (
    "seq_len",
    "longest_example",
    "tokens",
    "long_sequence",
    "evicted_bytes",
    "paged_in_bytes",
    "gpu_page_faults",
    "thrashing_events",
    "optimizer_step_s",
    "step_s",
    "device_free_bytes",
    "alloc_retries",
    "ooms",
    "paged_bytes_total",
    "paged_capacity_bytes",
)
"""The record fields logged as metrics, each as ``eviction/<field>``."""


def check_monitor_settings(source: str, long_sequence_threshold: int | None, summary_top_k: int) -> None:
    """Raise :class:`SettingError` naming the first bad monitor setting."""
    if source not in SOURCE_SETTINGS:
        raise SettingError("source", source, f"must be one of {', '.join(SOURCE_SETTINGS)}")
    if long_sequence_threshold is not None and (
        not isinstance(long_sequence_threshold, int) or long_sequence_threshold <= 0
    ):
        raise SettingError(
            "long_sequence_threshold", long_sequence_threshold, "must be a positive integer or unset"
        )
    if not isinstance(summary_top_k, int) or summary_top_k < 0:
        raise SettingError("summary_top_k", summary_top_k, "must be an integer >= 0")


def rank_path(path: Path, rank: int, world_size: int) -> Path:
    """``path`` itself on one process; ``<stem>.rank<N><suffix>`` per rank when there are several."""
    if world_size <= 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def record_metrics(record: StepRecord) -> dict[str, float]:
    """The logger metrics of a record: ``eviction/<field>``, unmeasured fields left out."""
    metrics = {}
    for name in METRIC_FIELDS:
        value = getattr(record, name)
        if value is not None:
            metrics[PREFIX + name] = float(value)
    return metrics


def gather_summaries(summary: Summary, world_size: int) -> list[Summary]:
    """Every rank's summary on every rank (just this one without a process group). A collective."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [summary]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary.to_dict())
    return [Summary.from_dict(d) for d in gathered]


def write_summary(summaries: list[Summary], log_dir: Path | None) -> str:
    """The summaries' text, also written to ``<log_dir>/eviction_summary.txt`` when ``log_dir`` is given."""
    text = "\n\n".join(s.render() for s in summaries)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / SUMMARY_NAME).write_text(text + "\n", encoding="utf-8")
    return text


def event_log_path(
    log_dir: Path, log_path: str | os.PathLike[str] | None, rank: int, world_size: int
) -> Path:
    """This rank's event log: ``log_path``, else ``<log_dir>/eviction_events.jsonl``; per rank when several."""
    return rank_path(Path(log_path) if log_path else log_dir / LOG_NAME, rank, world_size)


def share_summary(summary: Summary, rank: int, world_size: int, log_dir: Path | None) -> str:
    """Every rank's summary as one text, on every rank (a collective); rank zero also writes it to ``log_dir``."""
    return write_summary(gather_summaries(summary, world_size), log_dir if rank == 0 else None)
