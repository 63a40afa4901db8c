"""``PagedQLoRAStrategy``: NF4 QLoRA on one device, registered as ``"paged_qlora"``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_paged.compat.lightning import Device as _DEVICE
from lightning_paged.core.devices import check_one_device, chosen_device
from lightning_paged.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_paged.lightning.memory_check import MemoryCheck
from lightning_paged.lightning.strategies.base import PLACES, QLoRAStrategyMixin, qlora_settings


class PagedQLoRAStrategy(QLoRAStrategyMixin, SingleDeviceStrategy):
    """Train the LightningModule's model as NF4 QLoRA on one device.

    At setup, before the device move and optimizer creation, every ``nn.Linear`` of the model
    (except ``skip_modules``) becomes a frozen bitsandbytes ``Linear4bit`` and gets a trainable
    LoRA adapter. What is converted: ``model_attr="auto"`` takes the module's ``model`` attribute
    when it is a torch module (a LightningModule holding a transformers model), else the whole
    LightningModule.

    Dtypes are the strategy's: 4-bit matmuls run in ``compute_dtype``, embeddings/head/biases are
    held in it, norms and adapters in float32. ``Trainer(precision=...)`` may stay ``"32-true"`` or
    be ``"bf16-mixed"``; true half precision is refused (casting would corrupt the 4-bit weights).

    Every field of :class:`~lightning_paged.QLoRAConfig` is an init argument of the same name,
    type and default (``quant_type``, ``lora_r``, ...), described there: ``**qlora`` goes to
    ``QLoRAConfig(**qlora)``, and LightningCLI shows each as ``--trainer.strategy.init_args.<field>``.

    Args:
        model_attr: Which module to convert: ``"auto"``, ``None`` (the LightningModule) or an attribute path.
        memory_check: Before training on a GPU, plan a step of the data's longest batch and ``"warn"`` when it
            will not fit even with paging (naming what would make it fit), refuse the run (``"error"``), or skip
            the check (``"off"``). See ``docs/plan.md``.
        device: The device; by default the one the Trainer's ``accelerator``/``devices`` select.
        **qlora: The QLoRA settings, :class:`~lightning_paged.QLoRAConfig`'s fields.
    """

    strategy_name = "paged_qlora"

    def __init__(
        self,
        model_attr: str | None = "auto",
        memory_check: MemoryCheck = "warn",
        device: _DEVICE | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
        **qlora: Any,
    ) -> None:
        config = qlora_settings(**qlora)
        super().__init__(
            device=device if device is not None else "cpu",
            accelerator=accelerator,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO(),
            precision_plugin=precision_plugin,
        )
        self._init_qlora(config, model_attr, memory_check)
        self._explicit_device = device is not None
        # Filled by the Trainer from accelerator/devices when the strategy is built from its name.
        self.parallel_devices: list[torch.device] | None = None

    @property
    @override
    def root_device(self) -> torch.device:
        return chosen_device(self.parallel_devices, self._root_device, self._explicit_device)

    @override
    def setup_environment(self) -> None:
        if not self._explicit_device:
            check_one_device(self.parallel_devices, PLACES.devices)
        super().setup_environment()

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        self._check_precision()
        assert self.model is not None
        self._convert(self.lightning_module, self.root_device)  # type: ignore[arg-type]
        super().setup(trainer)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            cls.strategy_name, cls, description="NF4 QLoRA (bitsandbytes 4-bit + PEFT LoRA) on one device"
        )
