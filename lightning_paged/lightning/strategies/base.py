"""What the single-device and DDP QLoRA strategies share: convert at setup, adapter-only checkpoints.

Checkpoints also carry, under ``checkpoint["lightning_paged"]``, the fingerprint of the base model
and settings (a resume onto another base or other settings is refused, naming what differs), the
adapter's PEFT config (for ``lightning-paged export``) and what an exact resume needs (data
position and random generator states, see :mod:`lightning_paged.lightning.resume`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_paged.compat import lightning as lightning_compat
from lightning_paged.compat.lightning import PathLike as _PATH
from lightning_paged.core.adapter_checkpoint import CHECKPOINT_KEY, AdapterCheckpoint
from lightning_paged.core.adapters import check_optimizers, load_adapter_state_dict
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import Fingerprint
from lightning_paged.core.layers4bit import linear4bit_layers, restore_training_layout
from lightning_paged.core.offload import ActivationOffload
from lightning_paged.core.prepare import Prepared, Shard, prepare_model
from lightning_paged.core.qlora import ConversionReport, QLoRAConfig, select_layers, select_target
from lightning_paged.core.qlora_config import QLORA_FIELDS, qlora_config_from_init_args
from lightning_paged.core.settings import SettingPlaces, args_section, field_docs, settings_from_mapping
from lightning_paged.lightning.resume import ResumeTracker

PLACES = SettingPlaces(
    qlora="trainer.strategy.init_args.",
    strategy="trainer.strategy.init_args.",
    optimizer="model.optimizer.",
    precision="trainer.precision",
    devices="trainer.devices",
)
"""Where a Lightning user's settings live in a LightningCLI config: the strategies' init arguments
(their QLoRA settings among them, flat), the module's ``optimizer`` argument
(:class:`~lightning_paged.PagedOptimizerMixin`) and the Trainer's ``precision`` and ``devices``."""
SETTING_PREFIX = PLACES.strategy

__all__ = [
    "CHECKPOINT_KEY",
    "PLACES",
    "SETTING_PREFIX",
    "QLoRAStrategyMixin",
    "qlora_config_from",
    "qlora_settings",
]


def qlora_settings(**qlora: Any) -> QLoRAConfig:
    """A strategy's QLoRA settings from its ``**qlora`` init arguments: :class:`QLoRAConfig`'s fields.

    LightningCLI follows ``**qlora`` to ``QLoRAConfig(**qlora)`` here and shows every field as a flat,
    typed and documented init argument with its true default (``--trainer.strategy.init_args.lora_r``).
    """
    if not set(qlora) <= set(QLORA_FIELDS):  # refused, naming the first unknown setting and every known one
        return settings_from_mapping(QLoRAConfig, qlora, SETTING_PREFIX)
    return settings_from_mapping(QLoRAConfig, QLoRAConfig(**qlora), SETTING_PREFIX)


def qlora_config_from(settings: Mapping[str, Any]) -> QLoRAConfig:
    """The QLoRA settings of a strategy's saved init arguments (a run's config; ``None`` keeps a default)."""
    return qlora_config_from_init_args(settings, SETTING_PREFIX)


class QLoRAStrategyMixin:
    """Converts the LightningModule's model to NF4 QLoRA at the top of ``setup``.

    That point comes after the module's own ``setup``/``configure_model`` and before the device
    move, DDP wrapping and optimizer creation. Checkpoints hold only the trainable (adapter)
    weights, so they are restored after setup, once the adapters exist. The QLoRA settings are
    flat init arguments of both strategies, one per :class:`QLoRAConfig` field; their
    descriptions below are QLoRAConfig's, added at import (LightningCLI's ``--help`` reads them
    from here for both strategies).
    """

    qlora: QLoRAConfig
    model_attr: str | None
    conversion_report: ConversionReport | None

    def _init_qlora(self, config: QLoRAConfig, model_attr: str | None, memory_check: str = "warn") -> None:
        from lightning_paged.lightning.memory_check import MEMORY_CHECKS

        if memory_check not in MEMORY_CHECKS:
            raise SettingError(
                "memory_check",
                memory_check,
                f"must be one of {', '.join(MEMORY_CHECKS)}",
                where=SETTING_PREFIX,
            )
        self.qlora = config
        self.model_attr = model_attr
        self.memory_check = memory_check
        self.memory_probe: Any = None
        """Replaces the CUDA device's memory reader of the memory check (a CPU test's ``FakeProbe``)."""
        self.conversion_report = None
        self._converted: Any = None  # the LightningModule converted, once setup ran
        self._layers4bit: list[torch.nn.Module] = []
        self._trainable_keys: set[str] = set()
        self.prepared: Prepared | None = None
        """What the conversion did and took (fingerprint, adapter place), once setup ran."""
        self._resume = ResumeTracker()
        self.step_offload: ActivationOffload | None = None
        """Saved-tensor hooks around each training step, for a model without checkpointing to offload from."""

    @property
    def fingerprint(self) -> Fingerprint | None:
        """The base model and settings the adapters are trained on, once setup converted the model."""
        return self.prepared.fingerprint if self.prepared is not None else None

    def setup_environment(self) -> None:
        """Let callbacks prepare before CUDA: the base class's device set-up creates the CUDA context.

        A callback with a ``before_cuda_init(device)`` method (the eviction monitor configures its
        CUPTI counters there, as NVIDIA's samples do) gets the root device first.
        """
        trainer = lightning_compat.attached_trainer(self)
        for callback in getattr(trainer, "callbacks", None) or []:
            hook = getattr(callback, "before_cuda_init", None)
            if callable(hook):
                hook(self.root_device)  # type: ignore[attr-defined]
        super().setup_environment()  # type: ignore[misc]

    def _check_precision(self) -> None:
        precision = self.precision_plugin  # type: ignore[attr-defined]
        if type(precision) is Precision or isinstance(precision, MixedPrecision):
            return
        name = getattr(precision, "precision", type(precision).__name__)
        raise SettingError(
            PLACES.precision,
            name,
            f"conflicts with {type(self).__name__}, which owns dtypes: 4-bit matmuls run in "
            f"compute_dtype={self.qlora.compute_dtype!r} and casting the quantized model would corrupt it. "
            "Leave precision at '32-true' (the default) or use 'bf16-mixed', and set "
            f"{SETTING_PREFIX}compute_dtype instead",
        )

    def check_module(self, module: pl.LightningModule) -> None:
        """Refuse now what ``setup`` would refuse after ``fit`` has started writing logs and configs.

        The precision plugin and the layer selection (``skip_modules``, ``target_modules``); a
        module whose layers do not exist yet (built in ``configure_model``) is checked at setup only.
        """
        self._check_precision()
        try:
            target = select_target(module, self.model_attr)
        except SettingError:
            return  # setup reports it, once configure_model has run
        if not any(isinstance(m, torch.nn.Linear) for m in target.modules()):
            return
        try:
            select_layers(target, self.qlora)
        except SettingError as err:
            raise err.located(SETTING_PREFIX) from None

    def _convert(self, module: pl.LightningModule, device: torch.device, shard: Shard | None = None) -> None:
        """Convert ``module``'s target once, through the core's one entry (``shard``: convert and shard).

        The random generators are reset to the seed of ``seed_everything`` right before the
        conversion (Lightning's ``reset_seed``; nothing without it), as the parallel strategies already
        do at set-up (lightning ``strategies/ddp.py`` and ``model_parallel.py``, ``_setup_distributed``):
        the adapters start from the same values on one device as on several.
        """
        if self._converted is module:
            return
        from lightning_paged.lightning.memory_check import check_memory

        check_memory(self, module, device, self.memory_check, self.memory_probe)
        prepared = prepare_model(
            module,
            self.qlora,
            device,
            model_attr=self.model_attr,
            where=SETTING_PREFIX,
            others_where=SETTING_PREFIX,
            shard=shard,
            before_conversion=reset_seed,
        )
        if prepared is None:
            raise SettingError(
                "model",
                type(select_target(module, self.model_attr)).__name__,
                "holds 4-bit layers already (converted by hand); a QLoRA strategy converts the model itself: "
                "give it the unconverted model",
                where=SETTING_PREFIX,
            )
        self.prepared = prepared
        self.conversion_report = prepared.report
        self._converted = module
        self._layers4bit = linear4bit_layers(module)
        self._trainable_keys = {n for n, p in module.named_parameters() if p.requires_grad}
        rank_zero_info(prepared.report.summary())
        if prepared.report.offload_requested and prepared.report.offload is None:
            self.step_offload = ActivationOffload()
            rank_zero_info(
                "offload_activations: every activation a training step saves for its backward pass waits in "
                "host memory instead (no checkpointed layers to offload the inputs of)"
            )

    def setup(self, trainer: pl.Trainer) -> None:
        self._resume.begin(trainer)
        super().setup(trainer)  # type: ignore[misc]

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Refuse an optimizer built before the conversion (it holds no adapter): see ``check_optimizers``."""
        super().setup_optimizers(trainer)  # type: ignore[misc]
        module = self.lightning_module  # type: ignore[attr-defined]
        if self._converted is module and module is not None:
            warning = check_optimizers(self.optimizers, module)  # type: ignore[attr-defined]
            if warning:
                rank_zero_warn(warning)

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    def process_dataloader(self, dataloader: object) -> object:
        dataloader = super().process_dataloader(dataloader)  # type: ignore[misc]
        self._resume.note_loader(dataloader)
        return dataloader

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if self._converted is self.lightning_module:  # type: ignore[attr-defined]
            checkpoint[CHECKPOINT_KEY] = self.checkpoint_metadata(checkpoint)
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    def checkpoint_metadata(self, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
        """This strategy's record in a checkpoint (every rank must call it: it gathers RNG states).

        The fit loop's counters in ``checkpoint`` are settled first: see :mod:`lightning_paged.lightning.resume`.
        """
        assert self.prepared is not None
        return self.prepared.checkpoint_record(resume=self._resume.state(checkpoint)).to_dict()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Only the trainable weights: the frozen base is rebuilt from the model source on load."""
        module: Any = self.lightning_module  # type: ignore[attr-defined]
        if self._converted is not module:
            return module.state_dict()
        return {n: p.detach() for n, p in module.named_parameters() if n in self._trainable_keys}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module: Any = self.lightning_module  # type: ignore[attr-defined]
        if self._converted is not module:
            module.load_state_dict(checkpoint["state_dict"], strict=strict)
            return
        record = AdapterCheckpoint.read(checkpoint)
        self._check_record(record)
        load_adapter_state_dict(module, checkpoint["state_dict"], strict=strict)
        if record is not None:
            self._resume.restore(record.resume, self.global_rank, self.world_size)  # type: ignore[attr-defined]

    def _check_record(self, record: AdapterCheckpoint | None) -> None:
        if record is None:
            rank_zero_warn(
                "The checkpoint carries no base-model fingerprint (it was not written by a lightning_paged "
                "strategy): whether it was trained on this base model and settings cannot be checked."
            )
            return
        assert self.fingerprint is not None
        record.check(
            self.fingerprint,
            "Resume with the base model and strategy settings of the run that wrote it, or start a new run.",
        )

    def teardown(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        if module is None or not any(p.is_meta for p in module.parameters()):
            super().teardown()  # type: ignore[misc]
            return
        # The run stopped before setup read the weights of an empty (directory) model: moving it
        # back to the host would fail on its meta tensors and hide the error that stopped the run.
        self._lightning_module = None
        try:
            super().teardown()  # type: ignore[misc]
        finally:
            self._lightning_module = module

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Validation or generation on CPU repacks 4-bit weights for inference (NOTES §3).
        restore_training_layout(self._layers4bit)
        self._resume.before_batch()
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.step_offload or contextlib.nullcontext():
            output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        self._resume.after_training_step()
        return output

    def optimizer_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(*args, **kwargs)  # type: ignore[misc]
        self._resume.after_optimizer_step()
        return output


QLoRAStrategyMixin.__doc__ = (QLoRAStrategyMixin.__doc__ or "").rstrip() + args_section(
    field_docs(QLoRAConfig)
)
