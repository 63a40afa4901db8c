"""Hugging Face Accelerate: NF4 QLoRA, the paged optimizer and adapter-only ``save_state`` in one call.

:func:`prepare_paged_qlora` converts the model on ``accelerator.device``, builds the paged
optimizer and its schedule over the adapter weights, passes all three through
``accelerator.prepare`` and registers the save/load pre-hooks that keep ``accelerator.save_state``
checkpoints adapter-only::

    accelerator = Accelerator()
    model, optimizer, scheduler = prepare_paged_qlora(accelerator, model, total_steps=1000)
    monitor = accelerate_eviction_monitor(accelerator, "runs/accelerate")
    for batch in loader:
        with monitor.step(batch):
            accelerator.backward(model(**batch).loss)
            with monitor.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    monitor.close()
    accelerator.save_state("runs/accelerate/state")

``accelerate`` is an optional extra (``pip install lightning-paged[accelerate]``): it is imported
inside the functions that need it. The optimizer, checkpoint and monitor helpers are the
framework-free ones of :mod:`lightning_paged.core`, which :mod:`lightning_paged.fabric` uses too.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_paged.core.adapter_checkpoint import RECORD_FILE, AdapterCheckpoint, read_directory_weights
from lightning_paged.core.adapters import load_adapter_state_dict
from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.loop import LoopEvictionMonitor
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paged_optimizer import build_paged_optimizer, optimizer_config
from lightning_paged.core.paging import ManagedMemory
from lightning_paged.core.prepare import Prepared, prepare_model
from lightning_paged.core.qlora import QLoRAConfig, is_qlora, qlora_config
from lightning_paged.core.settings import SettingPlaces

if TYPE_CHECKING:
    from accelerate import Accelerator

PLACES = SettingPlaces(
    qlora="qlora.",
    strategy="",
    optimizer="optimizer.",
    precision="mixed_precision",
    devices="num_processes",
)
"""Where an Accelerate user's settings live: :func:`prepare_paged_qlora`'s ``qlora`` and ``optimizer``
arguments (``qlora.lora_r``, ``optimizer.lr``) and its own arguments (``model_attr``)."""
_UNSUPPORTED = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA")
_hooked: weakref.WeakSet[Any] = weakref.WeakSet()
_prepared: weakref.WeakKeyDictionary[nn.Module, Prepared] = weakref.WeakKeyDictionary()
"""What the conversion of each model :func:`prepare_paged_qlora` converted took (fingerprint, adapter place)."""


class PreparedQLoRA(NamedTuple):
    """What :func:`prepare_paged_qlora` returns, in ``accelerator.prepare``'s order."""

    model: nn.Module
    """The converted model, prepared (wrapped in DDP when there are several processes)."""
    optimizer: Any
    """The paged optimizer over the adapter weights, as an ``AcceleratedOptimizer``."""
    scheduler: Any
    """Its learning-rate schedule, as an ``AcceleratedScheduler``; step it once per optimizer step."""


def prepare_paged_qlora(
    accelerator: Accelerator,
    model: nn.Module,
    qlora: QLoRAConfig | Mapping[str, Any] | None = None,
    optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
    *,
    model_attr: str | None = None,
    total_steps: int | None = None,
    memory: ManagedMemory | None = None,
) -> PreparedQLoRA:
    """Convert ``model`` to NF4 + LoRA, build the paged optimizer, and prepare both with ``accelerator``.

    Args:
        accelerator: The ``accelerate.Accelerator``; single process or DDP (``MULTI_GPU``, ``MULTI_CPU``).
        model: The model, on the host or on the device; converted in place, on ``accelerator.device``.
            With several processes every rank first takes rank zero's weights.
        qlora: The conversion settings; None takes :class:`QLoRAConfig`'s defaults.
        optimizer: The optimizer settings (name, lr, schedule); None takes :class:`OptimizerConfig`'s
            defaults (``paged_adamw_8bit``). Not an optimizer: it is built here, after the conversion.
        model_attr: What to convert: None the model itself, or a dotted attribute path of a submodule.
        total_steps: Optimizer steps of the run, needed by the linear and cosine schedules. Given per
            process: Accelerate steps the scheduler once per process, and the schedule is scaled to that.
        memory: Replaces the unified-memory primitives of the paging policy (CPU tests).

    ``accelerator.save_state`` then writes only the trainable weights of the model (and the
    optimizer state, which covers only them) and, beside them, the record of the base model and
    settings they were trained on (``lightning_paged.json``); ``accelerator.load_state`` refuses a
    checkpoint of another base model or other QLoRA settings, naming what differs, before it loads
    anything. ``lightning-paged export STATE_DIR --out DIR`` turns such a directory into a PEFT
    adapter (or, with ``--merge``, a merged model).
    """
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    if kind.upper() in _UNSUPPORTED:
        raise SettingError(
            "distributed_type",
            kind,
            "is not supported by prepare_paged_qlora: sharded 4-bit weights and paged or 8-bit optimizer "
            "state do not work there; run one process or plain DDP (accelerate launch --multi_gpu)",
        )
    if isinstance(optimizer, Optimizer):
        raise SettingError(
            "optimizer",
            type(optimizer).__name__,
            "must be an OptimizerConfig (or a dict of its fields), not an optimizer: one built before the "
            "conversion holds the replaced base weights and none of the LoRA adapters",
        )
    settings = qlora_config(qlora, PLACES.qlora)
    opt_settings = optimizer_config(optimizer, PLACES.optimizer)
    prepared = prepare_model(model, settings, accelerator.device, model_attr=model_attr, where=PLACES.qlora)
    if prepared is not None:
        _prepared[model] = prepared
        accelerator.print(prepared.report.summary())
    per_step = accelerator.num_processes if _scheduler_steps_per_process(accelerator) else 1
    built, scheduler = build_paged_optimizer(
        model,
        opt_settings,
        total_steps=total_steps * per_step if total_steps is not None else None,
        warmup_steps=_warmup(opt_settings, total_steps) * per_step,
        memory=memory,
    )
    register_adapter_checkpoint_hooks(accelerator)
    prepared_model, prepared_optimizer, prepared_scheduler = accelerator.prepare(model, built, scheduler)
    return PreparedQLoRA(prepared_model, prepared_optimizer, prepared_scheduler)


def _warmup(settings: OptimizerConfig, total_steps: int | None) -> int:
    try:
        return settings.warmup(total_steps)
    except SettingError as err:
        raise err.located("optimizer.") from None


def _scheduler_steps_per_process(accelerator: Accelerator) -> bool:
    """Accelerate steps a prepared scheduler ``num_processes`` times per optimizer step in this mode."""
    return bool(accelerator.step_scheduler_with_optimizer and not accelerator.split_batches)


def register_adapter_checkpoint_hooks(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` keep converted models adapter-only (once per accelerator)."""
    if accelerator in _hooked:
        return
    accelerator.register_save_state_pre_hook(_save_adapters_only)
    accelerator.register_load_state_pre_hook(_load_adapters_only)
    _hooked.add(accelerator)


def _save_adapters_only(models: list[nn.Module], weights: list[dict[str, Any]], output_dir: str) -> None:
    """Accelerate's save pre-hook: only the trainable weights of converted models, and their record beside them."""
    for index, model in enumerate(models[: len(weights)]):
        if is_qlora(model):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[index] = {k: v for k, v in weights[index].items() if k in trainable}
            prepared = _prepared.get(_unwrapped(model))
            if prepared is not None:
                record = prepared.checkpoint_record(weights=_weights_stem(index))
                record.write_file(Path(output_dir), _record_name(index))


def _load_adapters_only(models: list[nn.Module], input_dir: str) -> None:
    """Accelerate's load pre-hook: check each converted model's record, then load every model's weights here.

    Accelerate would load strictly and fail on the missing base weights. All models are loaded here
    (not only converted ones) so each keeps the file of its own index; nothing is loaded before
    every record is checked.
    """
    if not any(is_qlora(model) for model in models):
        return
    directory = Path(input_dir)
    for index, model in enumerate(models):
        prepared = _prepared.get(_unwrapped(model))
        if prepared is None:
            continue
        record = AdapterCheckpoint.read_file(directory, _record_name(index))
        if record is None:
            warnings.warn(
                f"{directory} carries no base-model fingerprint ({_record_name(index)}; it was not written by "
                "prepare_paged_qlora's hooks): whether it was trained on this base model and settings cannot be "
                "checked.",
                stacklevel=2,
            )
            continue
        record.check(
            prepared.fingerprint,
            f"Load it with the base model and {PLACES.qlora[:-1]} settings of the run that wrote it.",
            where=PLACES.qlora,
        )
    for index, model in enumerate(models):
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        state = read_directory_weights(directory, _weights_stem(index), device)
        if is_qlora(model):
            load_adapter_state_dict(model, state)
        else:
            model.load_state_dict(state)
    models.clear()


def _unwrapped(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)  # DistributedDataParallel's
    return inner if isinstance(inner, nn.Module) else model


def _weights_stem(index: int) -> str:
    """The stem of model ``index``'s weight file in a ``save_state`` directory (``model``, ``model_1``)."""
    return f"model_{index}" if index else "model"


def _record_name(index: int) -> str:
    """The record file of model ``index`` (``lightning_paged.json``, ``lightning_paged_1.json``)."""
    stem, dot, suffix = RECORD_FILE.rpartition(".")
    return f"{stem}_{index}{dot}{suffix}" if index else RECORD_FILE


def accelerate_eviction_monitor(
    accelerator: Accelerator, log_dir: str | os.PathLike[str], **settings: Any
) -> LoopEvictionMonitor:
    """A :class:`~lightning_paged.fabric.LoopEvictionMonitor` on the accelerator's device and process index."""
    return LoopEvictionMonitor(
        log_dir,
        accelerator.device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        **settings,
    )


__all__ = [
    "PreparedQLoRA",
    "accelerate_eviction_monitor",
    "prepare_paged_qlora",
    "register_adapter_checkpoint_hooks",
]
