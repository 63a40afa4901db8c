"""``PagedQLoRAFSDPStrategy``: NF4 QLoRA sharded with FSDP2, registered as ``"paged_qlora_fsdp"``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_paged.compat.lightning import PathLike as _PATH
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fsdp import (
    STRATEGY_DESCRIPTION,
    ShardReport,
    check_precision,
    check_world_size,
    distribute_like,
    gather_full,
    sharding_storage,
)
from lightning_paged.core.fsdp_load import convert_and_shard
from lightning_paged.core.fsdp_optimizer import (
    gathered_optimizer_state,
    load_gathered_optimizer_state,
    model_parameters,
    shard_optimizer,
)
from lightning_paged.core.qlora import ConversionReport, QLoRAConfig
from lightning_paged.core.qlora_config import StorageDtype
from lightning_paged.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_paged.lightning.memory_check import MemoryCheck
from lightning_paged.lightning.strategies.base import (
    PLACES,
    SETTING_PREFIX,
    QLoRAStrategyMixin,
    qlora_settings,
)


class PagedQLoRAFSDPStrategy(QLoRAStrategyMixin, ModelParallelStrategy):
    """NF4 QLoRA with the model sharded across processes by FSDP2 (``"paged_qlora_fsdp"``).

    For a model whose 4-bit weights do not fit one device. At setup every rank takes rank zero's
    base weights, converts them to NF4 + LoRA with the packed weights stored in ``compute_dtype``
    (``quant_storage``), and then ``fully_shard`` splits each repeated block (decoder layer) and the
    root across all processes: each rank keeps 1/world of the 4-bit weights and of the adapters,
    and gathers one block at a time for its forward and backward. The quantization constants stay
    whole on every rank (about 3% of the 4-bit bytes with ``double_quant``).

    Optimizers are those of :class:`~lightning_paged.PagedOptimizerMixin` (or any bitsandbytes
    optimizer from ``configure_optimizers``): each steps its parameters' local shards, with state
    paged by the paging policy. LAMB and LARS, which need whole-parameter norms, are refused.

    Checkpoints are one file written by rank zero, independent of the world size: the gathered
    adapter weights (no base weights), the optimizer state as one process would hold it, the base
    fingerprint and the resume state. They resume at any number of processes, on one device with
    ``paged_qlora``, and ``lightning-paged export`` reads them. The other QLoRA settings are those of
    :class:`~lightning_paged.PagedQLoRAStrategy`; precision: ``"32-true"`` or ``"bf16-mixed"`` only.

    Args:
        quant_storage: Storage type of the packed 4-bit weights; unset takes ``compute_dtype``.
            ``uint8`` is refused: FSDP shards them as floating parameters.
        block_class: Class name of the repeated block to shard (``LlamaDecoderLayer``); by default the
            model's ``_no_split_modules``, else the largest ``nn.ModuleList`` of one class.
        reshard_after_forward: Free each block's gathered weights after its forward and gather
            them again for the backward (less memory, one more all-gather per block).
        memory_check: Before training on a GPU, plan a step of the data's longest batch (this rank's share)
            and ``"warn"`` when it will not fit even with paging, refuse the run (``"error"``), or skip the
            check (``"off"``). See ``docs/plan.md``.
        process_group_backend: ``"nccl"``, ``"gloo"``; by default the accelerator's.
        timeout: Collective timeout.
        **qlora: The other QLoRA settings, :class:`~lightning_paged.QLoRAConfig`'s fields.
    """

    strategy_name = "paged_qlora_fsdp"

    def __init__(
        self,
        quant_storage: StorageDtype | None = None,
        model_attr: str | None = "auto",
        memory_check: MemoryCheck = "warn",
        block_class: str | None = None,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **qlora: Any,
    ) -> None:
        config = qlora_settings(**qlora)
        try:
            config.quant_storage = sharding_storage(quant_storage, config.compute_dtype)  # type: ignore[assignment]
        except SettingError as err:
            raise err.located(SETTING_PREFIX) from None
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.checkpoint_io = AtomicCheckpointIO()
        self._init_qlora(config, model_attr, memory_check)
        self.block_class = block_class
        self.reshard_after_forward = reshard_after_forward
        self.shard_report: ShardReport | None = None

    @override
    def _check_precision(self) -> None:
        super()._check_precision()
        check_precision(getattr(self.precision_plugin, "precision", None), PLACES.precision)

    @override
    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        check_world_size(world, PLACES.devices)
        self._data_parallel_size = world  # one flat mesh: every process holds a shard
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_precision()
        self._resume.begin(trainer)
        module = self.lightning_module
        assert module is not None and self.model is not None and self.accelerator is not None
        if self._converted is not module:
            self._convert(module, self.root_device, self._convert_and_shard)
            module.to(
                self.root_device
            )  # what the module holds beside its model (FSDPModule._apply keeps shards)
            assert self.prepared is not None and self.prepared.shard is not None
            self.shard_report = self.prepared.shard
            rank_zero_info(self.shard_report.summary())
        self.accelerator.setup(trainer)
        # gradient clipping must see the sharded gradients, not the optimizer's local proxies
        self.precision_plugin.main_params = model_parameters  # type: ignore[method-assign,assignment]
        self.model = self.precision_plugin.convert_module(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _convert_and_shard(
        self, target: torch.nn.Module, config: QLoRAConfig, device: torch.device
    ) -> tuple[ConversionReport, ShardReport]:
        """Quantize and shard one block at a time: this rank keeps its shard of each before reading the next."""
        return convert_and_shard(
            target,
            config,
            device,
            self.device_mesh["data_parallel"],
            block_class=self.block_class,
            reshard_after_forward=self.reshard_after_forward,
        )

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        for optimizer in self.optimizers:
            try:
                shard_optimizer(optimizer)
            except SettingError as err:
                raise err.located(PLACES.optimizer) from None

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The trainable weights gathered whole (every rank takes part; rank zero writes them)."""
        module: Any = self.lightning_module
        if self._converted is not module:
            return module.state_dict()
        return gather_full({n: p for n, p in module.named_parameters() if n in self._trainable_keys})

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module: Any = self.lightning_module
        if self._converted is module:
            checkpoint = {**checkpoint, "state_dict": distribute_like(module, checkpoint["state_dict"])}
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The state one process would hold, gathered on rank zero (every rank takes part)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return gathered_optimizer_state(optimizer)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            load_gathered_optimizer_state(optimizer, state)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(checkpoint_path)
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=STRATEGY_DESCRIPTION)
