"""What the single-device and DDP QLoRA strategies share: convert at setup, adapter-only checkpoints.

Checkpoints also carry, under ``checkpoint["lightning_paged"]``, the fingerprint of the base model
and settings (a resume onto another base or other settings is refused, naming what differs), the
adapter's PEFT config (for ``lightning-paged export``) and what an exact resume needs (data
position and random generator states, see :mod:`lightning_paged.lightning.resume`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_paged.core.adapters import check_optimizers, load_adapter_state_dict
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import (
    Fingerprint,
    describe_differences,
    fingerprint,
    mismatch_error,
)
from lightning_paged.core.layers4bit import linear4bit_layers, restore_training_layout
from lightning_paged.core.qlora import (
    ConversionReport,
    QLoRAConfig,
    convert_to_qlora,
    qlora_config_from_init_args,
    select_layers,
    select_target,
)
from lightning_paged.core.settings import args_section, field_docs
from lightning_paged.lightning.resume import ResumeTracker

SETTING_PREFIX = "trainer.strategy.init_args."
CHECKPOINT_KEY = "lightning_paged"
"""Where the strategies keep their section of a Lightning checkpoint."""
CHECKPOINT_FORMAT = 1


def qlora_config_from(settings: Mapping[str, Any]) -> QLoRAConfig:
    """A :class:`QLoRAConfig` from a strategy's init arguments (``None`` keeps a field's default)."""
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

    def _init_qlora(self, config: QLoRAConfig, model_attr: str | None) -> None:
        self.qlora = config
        self.model_attr = model_attr
        self.conversion_report = None
        self._converted: Any = None  # the LightningModule converted, once setup ran
        self._layers4bit: list[torch.nn.Module] = []
        self._trainable_keys: set[str] = set()
        self.fingerprint: Fingerprint | None = None
        self._adapter_info: dict[str, Any] = {}
        self._resume = ResumeTracker()

    def setup_environment(self) -> None:
        """Let callbacks prepare before CUDA: the base class's device set-up creates the CUDA context.

        A callback with a ``before_cuda_init(device)`` method (the eviction monitor configures its
        CUPTI counters there, as NVIDIA's samples do) gets the root device first.
        """
        module = getattr(self, "_lightning_module", None)
        trainer = getattr(module, "_trainer", None)
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
            "trainer.precision",
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

    def _convert(
        self,
        module: pl.LightningModule,
        device: torch.device,
        convert: Callable[[torch.nn.Module], ConversionReport] | None = None,
    ) -> None:
        """Convert ``module``'s target once (``convert`` instead of the whole-model conversion).

        The random generators are first reset to the seed of ``seed_everything`` (Lightning's
        ``reset_seed``; nothing without it), as the parallel strategies already do at set-up
        (lightning ``strategies/ddp.py`` and ``model_parallel.py``, ``_setup_distributed``): the
        adapters start from the same values on one device as on several.
        """
        if self._converted is module:
            return
        target = select_target(module, self.model_attr)
        self.fingerprint = fingerprint(target, self.qlora)  # of the weights before quantization
        reset_seed()
        try:
            report = (convert or (lambda t: convert_to_qlora(t, self.qlora, device=device)))(target)
        except SettingError as err:
            raise err.located(SETTING_PREFIX) from None
        self._adapter_info = _adapter_info(module, target)
        self.conversion_report = report
        self._converted = module
        self._layers4bit = linear4bit_layers(module)
        self._trainable_keys = {n for n, p in module.named_parameters() if p.requires_grad}
        rank_zero_info(report.summary())

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
        """This strategy's section of a checkpoint (every rank must call it: it gathers RNG states).

        The fit loop's counters in ``checkpoint`` are settled first: see :mod:`lightning_paged.lightning.resume`.
        """
        assert self.fingerprint is not None
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint.to_dict(),
            "qlora": asdict(self.qlora),
            "model_attr": self.model_attr,
            **self._adapter_info,
            "resume": self._resume.state(checkpoint),
        }

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
        saved = checkpoint.get(CHECKPOINT_KEY)
        self._check_fingerprint(saved)
        load_adapter_state_dict(module, checkpoint["state_dict"], strict=strict)
        if saved is not None:
            self._resume.restore(saved.get("resume"), self.global_rank, self.world_size)  # type: ignore[attr-defined]

    def _check_fingerprint(self, saved: Mapping[str, Any] | None) -> None:
        if saved is None or "fingerprint" not in saved:
            rank_zero_warn(
                "The checkpoint carries no base-model fingerprint (it was not written by a lightning_paged "
                "strategy): whether it was trained on this base model and settings cannot be checked."
            )
            return
        assert self.fingerprint is not None
        differences = describe_differences(Fingerprint.from_dict(saved["fingerprint"]), self.fingerprint)
        if differences:
            raise mismatch_error(
                differences,
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


def _adapter_info(module: torch.nn.Module, target: torch.nn.Module) -> dict[str, Any]:
    """What ``lightning-paged export`` needs to turn the checkpoint's adapter weights into a PEFT adapter."""
    import json

    prefix = next((f"{name}." if name else "" for name, m in module.named_modules() if m is target), "")
    peft_config = getattr(target, "peft_config", {}).get("default")
    config = json.loads(json.dumps(peft_config.to_dict(), default=list)) if peft_config is not None else None
    return {
        "target_prefix": prefix,
        "peft_config": config,
        "task_type": "CAUSAL_LM" if type(target).__name__.endswith("ForCausalLM") else None,
    }
