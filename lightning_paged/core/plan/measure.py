"""The yardstick of a plan: the same training step run for real on the host, counted the same way.

:func:`measure_run` builds the model with random weights on the CPU
(:func:`~lightning_paged.core.models.causal_lm`), converts it with
:func:`~lightning_paged.core.prepare.prepare_model`, and measures one training step of it with
:func:`~lightning_paged.core.plan.step.measure_step` under the same counter a dry run uses. A
``--target cpu`` plan of the same settings must come out at the same peak: that is what the accuracy
test (``tests/core/plan``) and ``bench/plan_accuracy.py`` check.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from lightning_paged.core.causal_lm_loss import batch_loss
from lightning_paged.core.models import causal_lm
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paged_optimizer import optimizer_and_schedule
from lightning_paged.core.paging import ManagedMemory
from lightning_paged.core.plan.counter import LiveBytes
from lightning_paged.core.plan.fake import planning_batch
from lightning_paged.core.plan.step import StepLoss, measure_step
from lightning_paged.core.prepare import prepare_model
from lightning_paged.core.qlora_config import QLoRAConfig


@dataclass
class MeasuredStep:
    """Live tensor bytes of one real training step on the host."""

    peak_bytes: int
    """The highest live total over the step."""
    phase: str
    """Where it peaked."""
    by_phase: dict[str, int]
    by_category: dict[str, int]
    """The split at the peak."""


class RealRun:
    """A converted model with random weights and its optimizer, measured at as many batch shapes as asked.

    On the CPU by default; ``device="cuda"`` runs it on a GPU (``bench/plan_gpu.py``). ``memory``
    stands in for managed memory (``lightning_paged.testing.HostMemory`` pages on the host, as a GPU
    would); None takes bitsandbytes' managed memory, which a CPU does not have (a paged optimizer's
    state then stays ordinary).
    """

    def __init__(
        self,
        config: Any,
        qlora: QLoRAConfig,
        optimizer: OptimizerConfig,
        *,
        micro_batches: int = 1,
        step_loss: StepLoss | None = None,
        memory: ManagedMemory | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        torch.manual_seed(seed)
        self.config = config
        self.device = torch.device(device)
        self.model = causal_lm(config)
        prepare_model(self.model, qlora, self.device, model_attr=None)
        self.model.to(self.device).train()  # the buffers (rotary tables) too
        constant = replace(optimizer, scheduler="constant", warmup_steps=0)
        self.optimizer, _ = optimizer_and_schedule(self.model, constant, total_steps=None, memory=memory)
        self.micro_batches = micro_batches
        self.step_loss: StepLoss = step_loss or batch_loss

    def measure(self, batch_size: int, seq_len: int, packed: bool = False) -> MeasuredStep:
        """Run one training step on a ``batch_size`` x ``seq_len`` batch and count it."""
        batch = planning_batch(batch_size, seq_len, int(self.config.vocab_size), packed)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        counter = LiveBytes()
        with counter:
            measured = measure_step(
                self.model, self.optimizer, self.step_loss, batch, counter, self.micro_batches
            )
        phase, peak = measured.peak()
        return MeasuredStep(
            peak_bytes=peak.bytes,
            phase=phase,
            by_phase={name: p.bytes for name, p in measured.peaks.items()},
            by_category=dict(peak.by_category),
        )


def measure_run(
    config: Any,
    qlora: QLoRAConfig,
    optimizer: OptimizerConfig,
    batch_size: int,
    seq_len: int,
    *,
    packed: bool = False,
    micro_batches: int = 1,
    step_loss: StepLoss | None = None,
    memory: ManagedMemory | None = None,
    seed: int = 0,
) -> MeasuredStep:
    """Run and measure one training step of ``config``'s model for real on the CPU (see :class:`RealRun`)."""
    run = RealRun(
        config, qlora, optimizer, micro_batches=micro_batches, step_loss=step_loss, memory=memory, seed=seed
    )
    return run.measure(batch_size, seq_len, packed)
