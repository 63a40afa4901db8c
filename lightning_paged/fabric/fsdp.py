"""Lightning Fabric: NF4 QLoRA sharded with FSDP2 (``Fabric(strategy="paged_qlora_fsdp")``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import timedelta
from functools import partial
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import STRATEGY_REGISTRY, ModelParallelStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_paged.compat.lightning import PathLike as _PATH
from lightning_paged.core import fsdp, fsdp_optimizer
from lightning_paged.core.adapters import adapter_state_dict
from lightning_paged.core.atomic import read_checkpoint, save_checkpoint_file
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fsdp_load import convert_and_shard
from lightning_paged.core.qlora import QLORA_FIELDS, ConversionReport, QLoRAConfig, is_qlora, select_target
from lightning_paged.fabric.strategies import PLACES, QLORA_WHERE, STRATEGY_WHERE, _QLoRAFabricMixin


def _with_sharding_storage(qlora: QLoRAConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    settings = asdict(qlora) if isinstance(qlora, QLoRAConfig) else dict(qlora or {})
    compute = settings.get("compute_dtype", QLoRAConfig.compute_dtype)
    try:
        settings["quant_storage"] = fsdp.sharding_storage(settings.get("quant_storage"), compute)
    except SettingError as err:
        raise err.located(QLORA_WHERE) from None
    return settings


class PagedQLoRAFabricFSDPStrategy(_QLoRAFabricMixin, ModelParallelStrategy):
    """NF4 QLoRA sharded across processes by FSDP2, for Lightning Fabric (``"paged_qlora_fsdp"``).

    The Fabric counterpart of :class:`~lightning_paged.PagedQLoRAFSDPStrategy`, through the same
    core. ``fabric.setup_module(model)`` converts the model to NF4 + LoRA with the packed weights
    stored in ``qlora.compute_dtype`` and shards it over all processes one repeated block at a time,
    each rank keeping its shard of a block before the next is read (a directory model is read from
    its files by every rank; a model that holds its weights takes rank zero's first). Build the optimizer afterwards (:func:`build_paged_optimizer`):
    ``fabric.setup_optimizers`` makes a bitsandbytes optimizer step the local shards.
    ``fabric.save`` writes one file from rank zero with the adapters and optimizer state gathered
    whole (any world size can load it); ``fabric.load`` gives each rank its shard and re-pages.

    Args:
        qlora: The conversion settings; ``quant_storage`` unset takes the compute dtype, ``"uint8"`` is refused.
        model_attr: What to convert (see :class:`PagedQLoRAFabricStrategy`).
        block_class: Class name of the repeated block to shard; by default found from the model.
        reshard_after_forward: Free each block's gathered weights after its forward.
        process_group_backend: ``"nccl"``, ``"gloo"``; by default the device's.
        timeout: Collective timeout.
    """

    strategy_name = "paged_qlora_fsdp"

    def __init__(
        self,
        qlora: QLoRAConfig | Mapping[str, Any] | None = None,
        model_attr: str | None = None,
        block_class: str | None = None,
        reshard_after_forward: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            parallelize_fn=self._parallelize,
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._init_qlora(_with_sharding_storage(qlora), model_attr)
        self.block_class = block_class
        self.reshard_after_forward = reshard_after_forward
        self.shard_report: fsdp.ShardReport | None = None

    @override
    def setup_environment(self) -> None:
        self._check_precision()
        fsdp.check_precision(getattr(self.precision, "precision", None), PLACES.precision)
        world = self.num_nodes * self.num_processes
        fsdp.check_world_size(world, PLACES.devices)
        self._data_parallel_size = world  # one flat mesh: every process holds a shard
        super().setup_environment()

    @override
    def module_to_device(self, module: nn.Module) -> None:
        """Nothing: ``setup_module`` converts and shards in one pass (``ModelParallelStrategy`` moves nothing here)."""

    def _parallelize(self, module: nn.Module, mesh: Any) -> nn.Module:
        target = select_target(module, self.model_attr)
        if is_qlora(target):  # converted by hand beforehand: shard it as it is
            module.to(self.root_device)
            try:
                self.shard_report = fsdp.shard_model(
                    target,
                    mesh["data_parallel"],
                    block_class=self.block_class,
                    reshard_after_forward=self.reshard_after_forward,
                )
            except SettingError as err:
                raise err.located(STRATEGY_WHERE) from None
            self._qlora_modules.append(module)
        else:  # quantized and sharded one block at a time (core/fsdp_load.py)
            self._convert(
                module, self.root_device, partial(self._convert_and_shard, mesh=mesh["data_parallel"])
            )
            self.shard_report = self._prepared[-1][1].shard
        assert self.shard_report is not None
        rank_zero_info(self.shard_report.summary())
        module.to(self.root_device)  # what the module holds beside its model (FSDPModule._apply keeps shards)
        return module

    def _convert_and_shard(
        self, target: nn.Module, config: QLoRAConfig, device: torch.device, mesh: Any
    ) -> tuple[ConversionReport, fsdp.ShardReport]:
        try:
            return convert_and_shard(
                target,
                config,
                device,
                mesh,
                block_class=self.block_class,
                reshard_after_forward=self.reshard_after_forward,
            )
        except SettingError as err:
            raise (err if err.setting in QLORA_FIELDS else err.located(STRATEGY_WHERE)) from None

    @override
    def setup_module(self, module: nn.Module) -> Any:
        return ModelParallelStrategy.setup_module(self, module)  # converts and shards in _parallelize

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        # fabric.clip_gradients must see the sharded gradients, not the optimizer's local proxies
        self.precision.main_params = fsdp_optimizer.model_parameters  # type: ignore[method-assign,assignment]
        optimizer = super().setup_optimizer(optimizer)
        try:
            fsdp_optimizer.shard_optimizer(optimizer)
        except SettingError as err:
            raise err.located(PLACES.optimizer) from None
        return optimizer

    @override
    def get_module_state_dict(self, module: nn.Module) -> dict[str, Any]:
        if is_qlora(module):
            return fsdp.gather_full(adapter_state_dict(module))
        return super().get_module_state_dict(module)

    @override
    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        super().load_module_state_dict(module, fsdp.distribute_like(module, state_dict), strict=strict)

    @override
    def get_optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return fsdp_optimizer.gathered_optimizer_state(optimizer)

    @override
    def _write_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Any],
        storage_options: Any | None,
        filter: dict[str, Callable[[str, Any], bool]] | None,
    ) -> None:
        """One file from rank zero: adapters and optimizer state gathered whole (every rank takes part)."""
        path = self.broadcast(path)
        converted = self._convert_stateful_objects_in_state(state, filter=filter or {})
        if self.is_global_zero:
            save_checkpoint_file(converted, path)
        self.barrier()

    @override
    def _read_checkpoint(self, path: _PATH, weights_only: bool | None) -> dict[str, Any]:
        """Every rank reads the file; ``load_module_state_dict`` keeps its shard of each weight."""
        return read_checkpoint(self.broadcast(path), weights_only=weights_only)

    @override
    def _load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        fsdp_optimizer.load_gathered_optimizer_state(optimizer, state)  # re-paged by its optimizer

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=fsdp.STRATEGY_DESCRIPTION)


if PagedQLoRAFabricFSDPStrategy.strategy_name not in STRATEGY_REGISTRY:
    PagedQLoRAFabricFSDPStrategy.register_strategies(STRATEGY_REGISTRY)
