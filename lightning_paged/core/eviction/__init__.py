"""Unified-memory eviction monitoring, framework-free: sources, the per-step recorder, the log and summary."""

from lightning_paged.core.eviction.log import JsonlWriter, read_jsonl
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.records import StepCounters, StepRecord
from lightning_paged.core.eviction.seqlen import LongSequenceDetector, batch_length
from lightning_paged.core.eviction.sources import (
    CuptiSource,
    EventSource,
    MemorySample,
    NullSource,
    PressureSource,
    SourceSetting,
    open_source,
)
from lightning_paged.core.eviction.summary import Summary, summarize

__all__ = [
    "CuptiSource",
    "EventSource",
    "EvictionRecorder",
    "JsonlWriter",
    "LongSequenceDetector",
    "MemorySample",
    "NullSource",
    "PressureSource",
    "SourceSetting",
    "StepCounters",
    "StepRecord",
    "Summary",
    "batch_length",
    "open_source",
    "read_jsonl",
    "summarize",
]
