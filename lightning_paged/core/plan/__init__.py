"""Memory planning: a training step's peak device memory, predicted before the run.

:func:`plan_memory` is the entry point (``lightning-paged plan`` and the check before ``fit`` call
it); :class:`MemoryPlan` its answer. How: :mod:`~lightning_paged.core.plan.fake` (the model on fake
tensors), :mod:`~lightning_paged.core.plan.counter` (live bytes over time),
:mod:`~lightning_paged.core.plan.step` (one training step, measured), :mod:`~lightning_paged.core.plan.cuda`
(what a GPU adds), :mod:`~lightning_paged.core.plan.engine` and :mod:`~lightning_paged.core.plan.planner`
(dry runs to a plan), :mod:`~lightning_paged.core.plan.measure` (the same step for real, the yardstick).
"""

from lightning_paged.core.plan.counter import LiveBytes
from lightning_paged.core.plan.engine import (
    PLAN_TARGETS,
    DryRun,
    PlanTarget,
    plan_memory,
    resolve_model_config,
)
from lightning_paged.core.plan.measure import MeasuredStep, RealRun, measure_run
from lightning_paged.core.plan.result import COMPONENTS, MemoryPlan, SeqLenPlan
from lightning_paged.core.plan.step import StepLoss

__all__ = [
    "COMPONENTS",
    "PLAN_TARGETS",
    "DryRun",
    "LiveBytes",
    "MeasuredStep",
    "MemoryPlan",
    "PlanTarget",
    "RealRun",
    "SeqLenPlan",
    "StepLoss",
    "measure_run",
    "plan_memory",
    "resolve_model_config",
]
