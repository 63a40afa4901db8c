"""The memory check before ``fit``: plan the longest batch, and warn (or refuse) when it will not fit.

The QLoRA strategies call :func:`check_memory` at setup, before the model is converted. On a CUDA
device (or with a ``memory_probe`` standing in for one) rank zero plans one training step of the
data module's longest batch (``batch_size`` x ``max_length``) with
:func:`~lightning_paged.core.plan.plan_memory` and every rank gets its verdict (a broadcast every
rank calls):

- it fits: nothing is said;
- it fits only with paging: one line says how much paged state a long step evicts, and the plan's
  eviction per sequence length is written beside the eviction monitor's log for its report;
- it does not fit even with paging: a warning, once, naming the levers that would make it fit
  (``memory_check="error"`` refuses the run instead, with the same message).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_paged.compat import lightning as lightning_compat
from lightning_paged.core.errors import UsageError
from lightning_paged.core.plan import MemoryPlan, plan_memory
from lightning_paged.core.selection import select_target
from lightning_paged.core.units import format_bytes

MemoryCheck = Literal["warn", "error", "off"]
"""What the check before ``fit`` does with a run that will not fit even with paging."""
MEMORY_CHECKS: tuple[str, ...] = get_args(MemoryCheck)
SETTING = "trainer.strategy.init_args.memory_check"
PREDICTION_LENGTHS = (4, 2, 4 / 3)
"""The check plans ``max_length`` divided by these too when a long step pages: for the report."""
_warned: set[str] = set()


def longest_batch(datamodule: Any) -> tuple[int, int, bool] | None:
    """``(batch_size, max_length, packed)`` of a data module that says them (``InstructionDataModule`` does)."""
    batch_size, max_length = getattr(datamodule, "batch_size", None), getattr(datamodule, "max_length", None)
    if not isinstance(batch_size, int) or not isinstance(max_length, int):
        return None
    return batch_size, max_length, bool(getattr(datamodule, "packing", False))


def check_memory(
    strategy: Any, module: Any, device: torch.device, mode: str, probe: Any = None
) -> MemoryPlan | None:
    """Plan the run's longest batch on ``device`` and act on the verdict (see the module doc). Every rank calls it."""
    if mode == "off" or (device.type != "cuda" and probe is None):
        return None
    trainer = lightning_compat.attached_trainer(strategy)
    shape = longest_batch(getattr(trainer, "datamodule", None))
    target = select_target(module, getattr(strategy, "model_attr", "auto"))
    config = getattr(target, "config", None)
    if trainer is None or shape is None or config is None:
        rank_zero_info(
            "Memory check skipped: it needs a transformers model and a data module that says its batch_size "
            "and max_length (lightning_paged.InstructionDataModule does)."
        )
        return None
    plan = None
    if strategy.global_rank == 0:
        plan = _plan(strategy, module, trainer, config, shape, probe, device)
    verdict = strategy.broadcast(plan.to_dict() if plan is not None else None)
    if verdict is None:
        return None
    _act(verdict, mode, trainer)
    return plan


def _plan(
    strategy: Any,
    module: Any,
    trainer: Any,
    config: Any,
    shape: tuple[int, int, bool],
    probe: Any,
    device: torch.device,
) -> MemoryPlan | None:
    from lightning_paged.core.eviction.sources.pressure import CudaMemoryProbe

    batch_size, max_length, packed = shape
    probe = probe or CudaMemoryProbe(device.index or 0, use_nvml=False)
    resolve = getattr(module, "resolved_optimizer_config", None)
    settings: dict[str, Any] = dict(
        qlora=strategy.qlora,
        optimizer=resolve() if callable(resolve) else None,
        batch_size=batch_size,
        packed=packed,
        accumulate_grad_batches=int(trainer.accumulate_grad_batches),
        device_memory=int(probe.sample().total),
        world_size=int(trainer.world_size),
        sharded="fsdp" in str(getattr(strategy, "strategy_name", "")),
        **_loss_settings(module),
    )
    try:
        plan = plan_memory(config, seq_len=max_length, search=False, **settings)
        if not plan.fits_with_paging:  # the levers name the longest sequence that fits
            plan = plan_memory(config, seq_len=max_length, **settings)
        elif not plan.fits:
            lengths = sorted({max(1, int(max_length / d)) for d in PREDICTION_LENGTHS})
            plan = plan_memory(config, seq_len=max_length, seq_lens=lengths, search=False, **settings)
    except Exception as err:  # a plan that cannot run never stops training
        rank_zero_warn(f"Memory check skipped: the plan could not run ({type(err).__name__}: {err}).")
        return None
    _write_prediction(trainer, plan)
    return plan


def _loss_settings(module: Any) -> dict[str, Any]:
    """The module's loss settings as the plan takes them (``CausalLMModule``'s ``loss``, ``loss_chunk_size``)."""
    out: dict[str, Any] = {}
    if getattr(module, "loss_kind", None) is not None:
        out["loss"] = module.loss_kind
    if isinstance(getattr(module, "loss_chunk_size", None), int):
        out["loss_chunk_size"] = module.loss_chunk_size
    return out


def _write_prediction(trainer: Any, plan: MemoryPlan) -> None:
    """The plan's eviction per length, beside the eviction monitor's log (for its report)."""
    from lightning_paged.core.eviction.prediction import write_prediction
    from lightning_paged.lightning.monitor import EvictionMonitor

    if plan.evicted_bytes <= 0:
        return
    for callback in getattr(trainer, "callbacks", None) or []:
        path = getattr(callback, "path", None)
        if isinstance(callback, EvictionMonitor) and path is not None:
            points = [
                {"seq_len": p.seq_len, "peak_bytes": p.peak_bytes, "evicted_bytes": p.evicted_bytes}
                for p in plan.by_seq_len
            ]
            write_prediction(Path(path).parent, points, plan.device_memory)


def message(verdict: dict[str, Any], mode: str = "warn") -> str:
    """What is said of a plan that does not fit even with paging, with its levers."""
    levers: Sequence[str] = verdict.get("levers") or []
    need = min(p["peak_bytes"] for p in verdict["by_seq_len"] if p["seq_len"] == verdict["seq_len"])
    return (
        f"Memory plan: a training step of {verdict['batch_size']} x {verdict['seq_len']} tokens needs about "
        f"{format_bytes(need)} on a device of {format_bytes(verdict['device_memory'])}, and does not fit even "
        f"with every paged byte evicted. "
        + ("Levers: " + "; ".join(levers) + ". " if levers else "")
        + f"Set {SETTING} to {'warn' if mode == 'error' else 'error'} to "
        + ("try anyway" if mode == "error" else "refuse such runs")
        + ", or 'off' to skip this check; 'lightning-paged plan' shows the whole plan."
    )


def _act(verdict: dict[str, Any], mode: str, trainer: Any) -> None:
    if verdict["fits"]:
        return
    if verdict["fits_with_paging"]:
        rank_zero_info(
            f"Memory plan: {verdict['batch_size']} x {verdict['seq_len']} tokens fits only with paging: about "
            f"{format_bytes(verdict['evicted_bytes'])} of optimizer state evicted per long step and paged back in "
            f"(about {verdict['pcie_seconds']:.2f} s over PCIe)."
        )
        return
    text = message(verdict, mode)
    if mode == "error":
        raise UsageError(text)
    if text not in _warned:
        _warned.add(text)
        rank_zero_warn(text)
