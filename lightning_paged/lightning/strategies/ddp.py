"""``PagedQLoRADDPStrategy``: NF4 QLoRA with data parallelism, registered as ``"paged_qlora_ddp"``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_paged.core.errors import SettingError
from lightning_paged.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_paged.lightning.memory_check import MemoryCheck
from lightning_paged.lightning.strategies.base import SETTING_PREFIX, QLoRAStrategyMixin, qlora_settings


class PagedQLoRADDPStrategy(QLoRAStrategyMixin, DDPStrategy):
    """NF4 QLoRA on several devices or processes, one model replica each (``"paged_qlora_ddp"``).

    The QLoRA settings are those of :class:`~lightning_paged.PagedQLoRAStrategy`. A model loaded
    from a directory is read from its files by every rank itself (same files, same bytes); a model
    built from a config takes rank zero's base weights before quantizing: DDP broadcasts the
    packed 4-bit data later but not its quantization constants, so ranks must quantize identical
    weights.

    Only the ``"popen"`` start method (plain ``ddp``, ``torchrun``, SLURM) is accepted: ``spawn`` and
    ``fork`` load rank zero's weights back into the parent's unconverted model, silently dropping
    the trained adapters.

    Args:
        model_attr: Which module to convert: ``"auto"``, ``None`` (the LightningModule) or an attribute path.
        memory_check: Before training on a GPU, plan a step of the data's longest batch and ``"warn"`` when it
            will not fit even with paging (naming what would make it fit), refuse the run (``"error"``), or skip
            the check (``"off"``). See ``docs/plan.md``.
        find_unused_parameters: Needed when some adapted layer is not used in every forward.
        process_group_backend: ``"nccl"``, ``"gloo"``; by default the accelerator's.
        timeout: Collective timeout.
        start_method: Must be ``"popen"``.
        **qlora: The QLoRA settings, :class:`~lightning_paged.QLoRAConfig`'s fields.
    """

    strategy_name = "paged_qlora_ddp"

    def __init__(
        self,
        model_attr: str | None = "auto",
        memory_check: MemoryCheck = "warn",
        find_unused_parameters: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        **qlora: Any,
    ) -> None:
        config = qlora_settings(**qlora)
        if start_method != "popen":
            raise SettingError(
                "start_method",
                start_method,
                "must be 'popen': with spawn or fork, Lightning loads rank zero's weights back into the "
                "parent's unconverted model and the trained LoRA adapters are silently lost. "
                "Use strategy='paged_qlora_ddp' (not ddp_spawn/ddp_fork/ddp_notebook)",
                where=SETTING_PREFIX,
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method="popen",
            find_unused_parameters=find_unused_parameters,
        )
        self._init_qlora(config, model_attr, memory_check)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_precision()
        module = self.lightning_module
        assert module is not None
        self._convert(module, self.root_device)  # on rank zero's weights, or each rank from a directory
        super().setup(trainer)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="NF4 QLoRA (bitsandbytes 4-bit + PEFT LoRA), data parallel"
        )
