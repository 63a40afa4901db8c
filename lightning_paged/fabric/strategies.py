"""Lightning Fabric strategies: NF4 QLoRA at ``fabric.setup_module`` and adapter-only checkpoints.

Registered in Fabric's strategy registry as ``"paged_qlora"`` (one device) and
``"paged_qlora_ddp"`` (data parallel). Each module Fabric sets up is converted to NF4 + LoRA right
before its device move, so DDP wraps the converted model; ``fabric.save``/``fabric.load`` then
hold only the trainable (adapter) weights and the optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.precision import MixedPrecision, Precision
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy, SingleDeviceStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_paged.compat.lightning import Device as _DEVICE
from lightning_paged.compat.lightning import PathLike as _PATH
from lightning_paged.core.adapter_checkpoint import CHECKPOINT_KEY, AdapterCheckpoint
from lightning_paged.core.adapters import adapter_state_dict, load_adapter_state_dict
from lightning_paged.core.devices import check_one_device, chosen_device
from lightning_paged.core.errors import SettingError
from lightning_paged.core.prepare import Prepared, Shard, prepare_model
from lightning_paged.core.qlora import ConversionReport, QLoRAConfig, is_qlora, qlora_config
from lightning_paged.core.settings import SettingPlaces

PLACES = SettingPlaces(
    qlora="qlora.", strategy="strategy.", optimizer="optimizer.", precision="precision", devices="devices"
)
"""Where a Fabric user's settings live: the strategies' ``qlora`` argument (``qlora.lora_r``), their other
arguments (``strategy.block_class``), the optimizer's settings, and ``Fabric(precision=..., devices=...)``."""
QLORA_WHERE, STRATEGY_WHERE = PLACES.qlora, PLACES.strategy


class _QLoRAFabricMixin:
    """Conversion at the device move, the stale-optimizer check, adapter-only checkpoints with their record."""

    qlora: QLoRAConfig
    model_attr: str | None
    conversion_report: ConversionReport | None

    def _init_qlora(self, qlora: QLoRAConfig | Mapping[str, Any] | None, model_attr: str | None) -> None:
        self.qlora = qlora_config(qlora, QLORA_WHERE)
        self.model_attr = model_attr
        self.conversion_report = None
        self._qlora_modules: list[nn.Module] = []
        self._prepared: list[tuple[nn.Module, Prepared]] = []
        """Each module this strategy converted, with what the conversion took (fingerprint, adapter place)."""

    def _check_precision(self) -> None:
        precision = self.precision  # type: ignore[attr-defined]
        if type(precision) is Precision or isinstance(precision, MixedPrecision):
            return
        raise SettingError(
            PLACES.precision,
            type(precision).__name__,
            f"conflicts with {type(self).__name__}, which owns dtypes: 4-bit matmuls run in "
            f"{QLORA_WHERE}compute_dtype={self.qlora.compute_dtype!r} and casting the quantized model would "
            f"corrupt it. Leave Fabric's precision at '32-true' (the default) or use 'bf16-mixed', and set "
            f"{QLORA_WHERE}compute_dtype instead",
        )

    def _convert(self, module: nn.Module, device: torch.device | None, shard: Shard | None = None) -> None:
        if any(module is seen for seen in self._qlora_modules):
            return
        self._check_precision()
        prepared = prepare_model(
            module, self.qlora, device, model_attr=self.model_attr, where=QLORA_WHERE, shard=shard
        )
        self._qlora_modules.append(module)
        if prepared is not None:
            self._prepared.append((module, prepared))
            self.conversion_report = prepared.report
            rank_zero_info(prepared.report.summary())

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
        inner = _unwrapped(module)
        if is_qlora(inner):
            return adapter_state_dict(inner)
        return super().get_module_state_dict(module)  # type: ignore[misc]

    def load_module_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], strict: bool = True
    ) -> None:
        inner = _unwrapped(module)
        if is_qlora(inner):
            load_adapter_state_dict(inner, state_dict, strict=strict)
            return
        super().load_module_state_dict(module, state_dict, strict=strict)  # type: ignore[misc]

    # --- checkpoints: the adapters' record written beside them, checked before they are loaded ---

    def _converted_in(self, state: Any) -> list[tuple[str, Prepared]]:
        """The state's entries that hold a module this strategy converted, with what its conversion took."""
        if not isinstance(state, Mapping):
            return []
        found = []
        for key, value in state.items():
            if isinstance(value, nn.Module):
                inner = _unwrapped(value)
                found += [(key, prepared) for module, prepared in self._prepared if module is inner]
        return found

    def save_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """Adapters (and the rest of ``state``) with the record of the first converted module in ``state``."""
        converted = self._converted_in(state)
        if converted:
            key, prepared = converted[0]
            state = {**state, CHECKPOINT_KEY: prepared.checkpoint_record(weights=key).to_dict()}
        self._write_checkpoint(path, state, storage_options, filter)

    def _write_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Any],
        storage_options: Any | None,
        filter: dict[str, Callable[[str, Any], bool]] | None,
    ) -> None:
        super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)  # type: ignore[misc]

    def load_checkpoint(
        self,
        path: _PATH,
        state: nn.Module | Optimizer | dict[str, Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore ``state`` from ``path``; a converted module's record is checked against it first.

        A checkpoint of another base model or other QLoRA settings is refused before anything is
        loaded, naming what differs; one without a record (not written by a lightning_paged
        strategy) is loaded with a warning that it cannot be checked.
        """
        checkpoint = self._read_checkpoint(path, weights_only)
        if not state:
            return checkpoint
        record = AdapterCheckpoint.read(checkpoint, path)
        checkpoint.pop(CHECKPOINT_KEY, None)
        converted = self._converted_in(state)
        if converted and record is None:
            rank_zero_warn(
                f"{path} carries no base-model fingerprint (it was not written by a lightning_paged strategy): "
                "whether it was trained on this base model and settings cannot be checked."
            )
        for key, prepared in converted:
            if record is not None and (key == record.weights or len(converted) == 1):
                record.check(
                    prepared.fingerprint,
                    f"Load it with the base model and {QLORA_WHERE[:-1]} settings of the run that wrote it.",
                    where=QLORA_WHERE,
                )
        return self._restore(checkpoint, state, strict)

    def _read_checkpoint(self, path: _PATH, weights_only: bool | None) -> dict[str, Any]:
        torch.cuda.empty_cache()
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)  # type: ignore[attr-defined]

    def _load_optimizer_state(self, optimizer: Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def _restore(
        self, checkpoint: dict[str, Any], state: nn.Module | Optimizer | dict[str, Any], strict: bool
    ) -> dict[str, Any]:
        """``state`` restored in place from ``checkpoint`` as Fabric's ``Strategy.load_checkpoint`` does; the rest returned."""
        if isinstance(state, nn.Module):
            self.load_module_state_dict(state, checkpoint, strict=strict)
            return {}
        if isinstance(state, Optimizer):
            self._load_optimizer_state(state, checkpoint)
            return {}
        missing = [key for key in state if key not in checkpoint]
        if strict and missing:
            raise KeyError(
                f"The requested state contains a key '{missing[0]}' that does not exist in the loaded checkpoint."
                " To disable strict loading, set `strict=False`."
            )
        for key, target in list(state.items()):
            if key not in checkpoint:
                continue
            value = checkpoint.pop(key)
            if isinstance(target, nn.Module):
                self.load_module_state_dict(target, value, strict=strict)
            elif isinstance(target, Optimizer):
                self._load_optimizer_state(target, value)
            elif callable(getattr(target, "load_state_dict", None)) and callable(
                getattr(target, "state_dict", None)
            ):
                target.load_state_dict(value)
            else:
                state[key] = value
        return checkpoint


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


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
        if not self._explicit_device:
            check_one_device(devices, PLACES.devices)
        self._parallel_devices = devices

    @property
    @override
    def root_device(self) -> torch.device:
        return chosen_device(self._parallel_devices, self._root_device, self._explicit_device)

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
