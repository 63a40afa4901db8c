"""``PagedQLoRADDPStrategy``: NF4 QLoRA with data parallelism, registered as ``"paged_qlora_ddp"``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_paged.core.adapters import broadcast_from_rank_zero
from lightning_paged.core.errors import SettingError
from lightning_paged.core.layers4bit import ComputeDtype, StorageDtype
from lightning_paged.core.loading import deferred_directory
from lightning_paged.core.qlora import QLoRAConfig, QuantType, select_target
from lightning_paged.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_paged.lightning.strategies.base import SETTING_PREFIX, QLoRAStrategyMixin, qlora_config_from

_D = QLoRAConfig()


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
        find_unused_parameters: Needed when some adapted layer is not used in every forward.
        process_group_backend: ``"nccl"``, ``"gloo"``; by default the accelerator's.
        timeout: Collective timeout.
        start_method: Must be ``"popen"``.
    """

    strategy_name = "paged_qlora_ddp"

    def __init__(
        self,
        quant_type: QuantType = _D.quant_type,
        double_quant: bool = _D.double_quant,
        compute_dtype: ComputeDtype = _D.compute_dtype,
        quant_storage: StorageDtype = _D.quant_storage,
        skip_modules: list[str] | None = None,
        lora_r: int = _D.lora_r,
        lora_alpha: int = _D.lora_alpha,
        lora_dropout: float = _D.lora_dropout,
        target_modules: str | list[str] = _D.target_modules,
        use_rslora: bool = _D.use_rslora,
        use_dora: bool = _D.use_dora,
        gradient_checkpointing: bool = _D.gradient_checkpointing,
        upcast_non_quantized: bool = _D.upcast_non_quantized,
        model_attr: str | None = "auto",
        find_unused_parameters: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        config = qlora_config_from(locals())
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
        self._init_qlora(config, model_attr)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_precision()
        module = self.lightning_module
        assert module is not None
        if self._converted is not module:
            target = select_target(module, self.model_attr)
            if deferred_directory(target) is None:  # a directory model: each rank reads the files
                broadcast_from_rank_zero(target, self.root_device)
        self._convert(module, self.root_device)
        super().setup(trainer)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="NF4 QLoRA (bitsandbytes 4-bit + PEFT LoRA), data parallel"
        )
