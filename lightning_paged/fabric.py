"""Lightning Fabric: NF4 QLoRA at ``fabric.setup_module``, the paged optimizer, adapter-only checkpoints.

Two strategies, registered in Fabric's strategy registry as ``"paged_qlora"`` (one device) and
``"paged_qlora_ddp"`` (data parallel), convert each module Fabric sets up to NF4 + LoRA right
before its device move, so DDP wraps the converted model. ``fabric.save``/``fabric.load`` then
hold only the trainable (adapter) weights and the optimizer state.

The helpers a hand-written loop needs besides the strategy are framework-free and shared with
:mod:`lightning_paged.accelerate`: :func:`build_paged_optimizer` (the optimizer by name, over
trainable weights, with its schedule), :func:`adapter_state_dict` / :func:`load_adapter_state_dict`
and :class:`LoopEvictionMonitor` (the eviction monitor's per-step records and summary)::

    fabric = Fabric(accelerator="cuda", devices=1, strategy="paged_qlora")
    fabric.launch()
    model = fabric.setup_module(model)                      # converted here
    optimizer, scheduler = build_paged_optimizer(model, total_steps=1000)
    optimizer = fabric.setup_optimizers(optimizer)
    monitor = fabric_eviction_monitor(fabric, "runs/fabric")
    for batch in loader:
        with monitor.step(batch):
            fabric.backward(model(**batch).loss)
            with monitor.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    monitor.close()
    fabric.save("runs/fabric/adapters.ckpt", {"model": model, "optimizer": optimizer})
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.precision import MixedPrecision, Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy, SingleDeviceStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_info
from lightning.fabric.utilities.types import _DEVICE
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from typing_extensions import override

from lightning_paged.core.adapters import (
    adapter_state_dict,
    broadcast_from_rank_zero,
    load_adapter_state_dict,
)
from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.paged import PagedBytes
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.eviction.sources import MemoryProbe, open_source
from lightning_paged.core.eviction.sources.base import OnceNotifier
from lightning_paged.core.eviction.summary import Summary
from lightning_paged.core.optimizers import OptimizerConfig, build_optimizer, build_scheduler, param_groups
from lightning_paged.core.paging import (
    ManagedMemory,
    PagingPolicy,
    is_bitsandbytes_optimizer,
    repage_optimizer_state,
    warn_once,
)
from lightning_paged.core.qlora import (
    ConversionReport,
    QLoRAConfig,
    convert_to_qlora,
    linear4bit_layers,
    select_target,
)
from lightning_paged.lightning.monitor import LOG_NAME, SUMMARY_NAME, rank_path, record_metrics

_QLORA_FIELDS = {f.name for f in fields(QLoRAConfig)}


def _settings(cls: type[Any], value: Any, where: str) -> Any:
    """A validated settings dataclass from an instance, a mapping of its fields, or None (the defaults)."""
    if isinstance(value, Mapping):
        names = [f.name for f in fields(cls)]
        unknown = [key for key in value if key not in names]
        if unknown:
            raise SettingError(
                f"{where}{unknown[0]}",
                value[unknown[0]],
                f"is not a setting of {cls.__name__}; its settings: " + ", ".join(names),
            )
        value = cls(**value)
    config = cls() if value is None else value
    if not isinstance(config, cls):
        raise SettingError(
            where.rstrip("."), type(value).__name__, f"must be {cls.__name__}(...) or a dict of its fields"
        )
    try:
        config.validate()
    except SettingError as err:
        raise err.located(where) from None
    return config


def qlora_config(value: QLoRAConfig | Mapping[str, Any] | None, where: str = "qlora.") -> QLoRAConfig:
    """A validated :class:`QLoRAConfig` from a config, a mapping of its fields, or None (the defaults)."""
    return _settings(QLoRAConfig, value, where)


def is_qlora(module: nn.Module) -> bool:
    """True when the module holds 4-bit layers, i.e. it was converted already."""
    return bool(linear4bit_layers(module))


def convert_model(
    module: nn.Module,
    config: QLoRAConfig,
    device: torch.device | None,
    model_attr: str | None = None,
    where: str = "qlora.",
) -> ConversionReport | None:
    """Convert ``module`` (or its ``model_attr`` submodule) in place, after taking rank zero's weights.

    Returns None when it holds 4-bit layers already (converted by an earlier call or by hand).
    """
    target = select_target(module, model_attr)
    if is_qlora(target):
        return None
    if device is None:
        first = next(target.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    broadcast_from_rank_zero(target, device)
    try:
        return convert_to_qlora(target, config, device=device)
    except SettingError as err:
        raise (err.located(where) if err.setting in _QLORA_FIELDS else err) from None


# ---------------------------------------------------------------------------------------------
# Adapter-only checkpoints


# ---------------------------------------------------------------------------------------------
# The optimizer


def optimizer_config(
    value: OptimizerConfig | Mapping[str, Any] | None, where: str = "optimizer."
) -> OptimizerConfig:
    """A validated :class:`OptimizerConfig` from a config, a mapping of its fields, or None (the defaults)."""
    return _settings(OptimizerConfig, value, where)


def build_paged_optimizer(
    module: nn.Module,
    config: OptimizerConfig | Mapping[str, Any] | None = None,
    *,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    memory: ManagedMemory | None = None,
) -> tuple[Optimizer, LambdaLR]:
    """The optimizer named in ``config`` over the module's trainable weights, and its schedule.

    Call it on the converted model (after ``fabric.setup_module``): before the conversion the LoRA
    weights do not exist. No weight decay on biases and norm weights. Step the scheduler once per
    optimizer step; ``total_steps`` is needed by the linear and cosine schedules, ``warmup_steps``
    overrides the config's (Accelerate counts scheduler steps per process). A bitsandbytes
    optimizer gets the paging policy (adapters paged too, unless ``page_adapters`` is off) and
    puts its state back into paged memory after every ``load_state_dict``. ``memory`` replaces
    the unified-memory primitives (CPU tests).
    """
    config = optimizer_config(config)
    groups = param_groups(module.named_parameters(), config.weight_decay)
    if not groups:
        raise SettingError(
            "model",
            type(module).__name__,
            "has no trainable parameters; build the optimizer after the conversion "
            "(fabric.setup_module or prepare_paged_qlora), which adds the LoRA adapters",
        )
    if not is_qlora(module):
        warn_once(
            "optimizer-before-conversion",
            f"build_paged_optimizer: {type(module).__name__} has no 4-bit layers, so the optimizer covers all "
            "its trainable weights. For QLoRA, set the model up first (fabric.setup_module).",
        )
    policy = PagingPolicy(page_small=config.page_adapters, memory=memory or ManagedMemory())
    warmup = config.warmup_steps if warmup_steps is None else warmup_steps
    try:
        optimizer = build_optimizer(config.name, groups, paging=policy, **config.optimizer_kwargs())
        scheduler = build_scheduler(optimizer, config.scheduler, warmup, total_steps)
    except SettingError as err:
        raise err.located("optimizer.") from None
    if is_bitsandbytes_optimizer(optimizer):
        _repage_after_load(optimizer)
    return optimizer, scheduler


def _repage_after_load(optimizer: Optimizer) -> None:
    """Loading a state dict turns paged state into ordinary tensors; put it back after each load."""
    load = optimizer.load_state_dict

    def load_state_dict(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        load(state_dict, *args, **kwargs)
        repage_optimizer_state(optimizer)

    optimizer.load_state_dict = load_state_dict  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# The strategies


class _QLoRAFabricMixin:
    """Conversion at the device move, the stale-optimizer check and adapter-only checkpoints."""

    qlora: QLoRAConfig
    model_attr: str | None
    conversion_report: ConversionReport | None

    def _init_qlora(self, qlora: QLoRAConfig | Mapping[str, Any] | None, model_attr: str | None) -> None:
        self.qlora = qlora_config(qlora)
        self.model_attr = model_attr
        self.conversion_report = None
        self._qlora_modules: list[nn.Module] = []

    def _check_precision(self) -> None:
        precision = self.precision  # type: ignore[attr-defined]
        if type(precision) is Precision or isinstance(precision, MixedPrecision):
            return
        raise SettingError(
            "precision",
            type(precision).__name__,
            f"conflicts with {type(self).__name__}, which owns dtypes: 4-bit matmuls run in "
            f"qlora.compute_dtype={self.qlora.compute_dtype!r} and casting the quantized model would corrupt "
            "it. Leave Fabric's precision at '32-true' (the default) or use 'bf16-mixed', and set "
            "qlora.compute_dtype instead",
        )

    def _convert(self, module: nn.Module, device: torch.device | None) -> None:
        if any(module is seen for seen in self._qlora_modules):
            return
        self._check_precision()
        report = convert_model(module, self.qlora, device, self.model_attr)
        self._qlora_modules.append(module)
        if report is not None:
            self.conversion_report = report
            rank_zero_info(report.summary())

    def module_to_device(self, module: nn.Module) -> None:
        # Fabric moves a module (setup_module, to_device) right before the strategy wraps it.
        self._convert(module, self.root_device)  # type: ignore[attr-defined]
        super().module_to_device(module)  # type: ignore[misc]

    def setup_module(self, module: nn.Module) -> Any:
        self._convert(module, None)  # setup_module(..., move_to_device=False): quantize where it is
        return super().setup_module(module)  # type: ignore[misc]

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self._check_optimizer(optimizer)
        return super().setup_optimizer(optimizer)  # type: ignore[misc]

    def _check_optimizer(self, optimizer: Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        adapters = {id(p) for m in self._qlora_modules for p in m.parameters() if p.requires_grad}
        frozen = sum(not p.requires_grad for p in params)
        if frozen or (adapters and not any(id(p) in adapters for p in params)):
            raise SettingError(
                "optimizer",
                type(optimizer).__name__,
                "was built before the model was converted: it holds "
                + (f"{frozen} frozen base weights" if frozen else "none of the LoRA adapter weights")
                + " and would train nothing. Set the model up first, then build the optimizer over it: "
                "model = fabric.setup_module(model); optimizer, scheduler = build_paged_optimizer(model); "
                "optimizer = fabric.setup_optimizers(optimizer)",
            )

    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        inner = module.module if isinstance(module, DistributedDataParallel) else module
        if is_qlora(inner):
            return adapter_state_dict(inner)
        return super().get_module_state_dict(module)  # type: ignore[misc]

    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        inner = module.module if isinstance(module, DistributedDataParallel) else module
        if is_qlora(inner):
            load_adapter_state_dict(inner, state_dict, strict=strict)
            return
        super().load_module_state_dict(module, state_dict, strict=strict)  # type: ignore[misc]


class PagedQLoRAFabricStrategy(_QLoRAFabricMixin, SingleDeviceStrategy):
    """NF4 QLoRA on one device for Lightning Fabric (``Fabric(strategy="paged_qlora")``).

    ``fabric.setup_module(model)`` (or ``fabric.setup``) converts the model before moving it to the
    device: every ``nn.Linear`` except ``qlora.skip_modules`` becomes a frozen bitsandbytes
    ``Linear4bit`` with a trainable LoRA adapter, quantized on the device one layer at a time.
    Build the optimizer afterwards, over the converted model (:func:`build_paged_optimizer`); an
    optimizer built before is refused by ``setup_optimizers``. ``fabric.save`` stores only the
    trainable weights of a converted model and ``fabric.load`` restores them into one.

    Args:
        qlora: The conversion settings; None takes :class:`QLoRAConfig`'s defaults.
        model_attr: What to convert: None (default) the module given to ``setup_module``, ``"auto"`` its
            ``model`` attribute when that is a torch module, or a dotted attribute path.
        device: The device; by default the one Fabric's ``accelerator``/``devices`` select.
    """

    strategy_name = "paged_qlora"

    def __init__(
        self,
        qlora: QLoRAConfig | Mapping[str, Any] | None = None,
        model_attr: str | None = None,
        device: _DEVICE | None = None,
        accelerator: Any = None,
        checkpoint_io: Any = None,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision=precision,
        )
        self._init_qlora(qlora, model_attr)
        self._explicit_device = device is not None
        self._parallel_devices: list[torch.device] | None = None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """Set by Fabric from ``accelerator``/``devices`` when the strategy is chosen by name."""
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if not self._explicit_device and devices and len(devices) > 1:
            raise SettingError(
                "devices",
                len(devices),
                "is more than one device, which paged_qlora cannot use; use strategy='paged_qlora_ddp' "
                "for data parallel training, or devices=1",
            )
        self._parallel_devices = devices

    @property
    @override
    def root_device(self) -> torch.device:
        if not self._explicit_device and self._parallel_devices:
            return torch.device(self._parallel_devices[0])
        return self._root_device

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="NF4 QLoRA (bitsandbytes 4-bit + PEFT LoRA) on one device"
        )


class PagedQLoRAFabricDDPStrategy(_QLoRAFabricMixin, DDPStrategy):
    """NF4 QLoRA with data parallelism for Lightning Fabric (``Fabric(strategy="paged_qlora_ddp")``).

    As :class:`PagedQLoRAFabricStrategy`, one model replica per process. Before quantizing, every
    rank takes rank zero's base weights: DDP broadcasts the packed 4-bit data but not its
    quantization constants, so ranks must quantize identical weights. Call ``fabric.launch()``
    before ``setup_module`` (the process group must exist).

    Args:
        qlora: The conversion settings; None takes :class:`QLoRAConfig`'s defaults.
        model_attr: What to convert (see :class:`PagedQLoRAFabricStrategy`).
        find_unused_parameters: Needed when some adapted layer is not used in every forward.
        process_group_backend: ``"nccl"``, ``"gloo"``; by default the device's.
        timeout: Collective timeout.
        start_method: How processes start: ``"popen"`` re-runs the script (``torchrun``-like).
    """

    strategy_name = "paged_qlora_ddp"

    def __init__(
        self,
        qlora: QLoRAConfig | Mapping[str, Any] | None = None,
        model_attr: str | None = None,
        find_unused_parameters: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
        )
        self._init_qlora(qlora, model_attr)

    @override
    def setup_environment(self) -> None:
        self._check_precision()
        super().setup_environment()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="NF4 QLoRA (bitsandbytes 4-bit + PEFT LoRA), data parallel"
        )


for _strategy in (PagedQLoRAFabricStrategy, PagedQLoRAFabricDDPStrategy):
    if _strategy.strategy_name not in STRATEGY_REGISTRY:
        _strategy.register_strategies(STRATEGY_REGISTRY)


# ---------------------------------------------------------------------------------------------
# The eviction monitor in a hand-written loop


class LoopEvictionMonitor:
    """The eviction monitor for a hand-written training loop: same JSONL records, same summary.

    What the Lightning ``EvictionMonitor`` callback does from hooks, done by two context managers
    around the loop body: :meth:`step` (the whole training step, given its batch for the sequence
    length) and :meth:`optimizer_step` (around ``optimizer.step()``). Each step becomes one line of
    ``<log_dir>/eviction_events.jsonl`` (``eviction_events.rank<N>.jsonl`` per rank when there are
    several); :meth:`close` (every rank must call it) prints the summary on rank zero and writes it
    to ``<log_dir>/eviction_summary.txt``. :meth:`metrics` gives the last step's figures under
    ``eviction/`` for ``fabric.log_dict`` or ``accelerator.log``.

    Args:
        log_dir: Directory of the event log and the summary.
        device: The training device (the source is chosen for it).
        rank: This process's global rank.
        world_size: Number of processes.
        source: ``"auto"``, ``"cupti"``, ``"pressure"`` or ``"none"``, as for the callback.
        log_path: The event log's path instead of ``<log_dir>/eviction_events.jsonl``.
        long_sequence_threshold: Lengths at or above it count as long; None: above the running 90th percentile.
        seq_len_fn: The batch's padded length, or ``(length, real_tokens)``, for batches of another shape.
        summary_top_k: How many of the slowest steps the summary lists.
        probe: Replaces the pressure source's CUDA memory reader (tests, other devices).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world_size: int = 1,
        source: Literal["auto", "cupti", "pressure", "none"] = "auto",
        log_path: str | os.PathLike[str] | None = None,
        long_sequence_threshold: int | None = None,
        seq_len_fn: Any = None,
        summary_top_k: int = 5,
        probe: MemoryProbe | None = None,
    ) -> None:
        if long_sequence_threshold is not None and (
            not isinstance(long_sequence_threshold, int) or long_sequence_threshold <= 0
        ):
            raise SettingError(
                "long_sequence_threshold", long_sequence_threshold, "must be a positive integer or unset"
            )
        if not isinstance(summary_top_k, int) or summary_top_k < 0:
            raise SettingError("summary_top_k", summary_top_k, "must be an integer >= 0")
        self.log_dir = Path(log_dir)
        self.rank = rank
        self.world_size = world_size
        self.path = rank_path(Path(log_path) if log_path else self.log_dir / LOG_NAME, rank, world_size)
        self.summary: Summary | None = None
        """This rank's summary, once :meth:`close` ran."""
        dev = torch.device(device)
        notify = OnceNotifier(self._warn)
        self.recorder = EvictionRecorder(
            open_source(source, dev, probe=probe, notify=notify),
            self.path,
            long_sequence_threshold=long_sequence_threshold,
            seq_len_fn=seq_len_fn,
            rank=rank,
            top_k=summary_top_k,
            paged_bytes=PagedBytes(dev.index if dev.type == "cuda" else None),
            notify=notify,
        )

    def _warn(self, message: str) -> None:
        if self.rank == 0:
            warnings.warn(f"eviction monitor: {message}", UserWarning, stacklevel=2)

    def step(self, batch: Any = None, **kwargs: Any) -> AbstractContextManager[EvictionRecorder]:
        """Around one whole training step; ``batch`` gives its sequence length (or pass ``seq_len=``)."""
        return self.recorder.step(batch, **kwargs)

    def optimizer_step(self) -> AbstractContextManager[None]:
        """Around ``optimizer.step()`` inside :meth:`step`."""
        return self.recorder.optimizer_step()

    @property
    def last_record(self) -> StepRecord | None:
        """The record of the last finished step."""
        return self.recorder.last_record

    def metrics(self) -> dict[str, float]:
        """The last step's figures as ``eviction/<field>`` (unmeasured ones left out)."""
        record = self.recorder.last_record
        return record_metrics(record) if record is not None else {}

    def close(self) -> str:
        """Stop recording; on rank zero print and write every rank's summary. Returns the text on every rank."""
        if self.summary is None:
            self.summary = self.recorder.close()
        summaries = [self.summary]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.summary.to_dict())
            summaries = [Summary.from_dict(d) for d in gathered]
        text = "\n\n".join(s.render() for s in summaries)
        if self.rank == 0:
            print(text)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / SUMMARY_NAME).write_text(text + "\n", encoding="utf-8")
        return text

    def __enter__(self) -> LoopEvictionMonitor:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.summary is not None:
            return
        if exc_type is None:
            self.close()
        else:  # no collective after a failure: other ranks may not get here
            self.summary = self.recorder.close()


def fabric_eviction_monitor(
    fabric: Fabric, log_dir: str | os.PathLike[str], **settings: Any
) -> LoopEvictionMonitor:
    """A :class:`LoopEvictionMonitor` on Fabric's device and rank; ``settings`` as for that class."""
    return LoopEvictionMonitor(
        log_dir, fabric.device, rank=fabric.global_rank, world_size=fabric.world_size, **settings
    )


__all__ = [
    "LoopEvictionMonitor",
    "PagedQLoRAFabricDDPStrategy",
    "PagedQLoRAFabricStrategy",
    "adapter_state_dict",
    "build_paged_optimizer",
    "fabric_eviction_monitor",
    "load_adapter_state_dict",
]
