"""The one entry every front door calls to make a model NF4 QLoRA: :func:`prepare_model`.

The top floor of the conversion (``docs/architecture.md``). For the three Lightning strategies, the
three Fabric strategies and :func:`~lightning_paged.accelerate.prepare_paged_qlora` alike it

1. selects what to convert (``model_attr``; a module converted by hand is left as it is);
2. gives every rank rank zero's weights, unless the model waits for its weights from a directory,
   which every rank reads itself (DDP broadcasts packed 4-bit data but not its quantization constants);
3. takes the fingerprint of the base weights and settings, before anything is quantized;
4. converts in memory, or loads while converting (a directory model), or converts and shards one
   block at a time (``shard``, the FSDP strategies);
5. returns the report, the fingerprint and the adapter's place and PEFT config: everything a
   checkpoint record (:class:`~lightning_paged.core.adapter_checkpoint.AdapterCheckpoint`) needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lightning_paged.core.adapter_checkpoint import AdapterCheckpoint
from lightning_paged.core.adapters import broadcast_from_rank_zero
from lightning_paged.core.deferred import deferred_directory
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import Fingerprint, fingerprint
from lightning_paged.core.fsdp import ShardReport
from lightning_paged.core.qlora import ConversionReport, LayerSource, convert_to_qlora, is_qlora
from lightning_paged.core.qlora_config import QLORA_FIELDS, QLoRAConfig
from lightning_paged.core.selection import select_target

Shard = Callable[[nn.Module, QLoRAConfig, torch.device], tuple[ConversionReport, ShardReport]]
"""Converts and shards the target at once (``convert_and_shard`` bound to a mesh)."""


@dataclass
class AdapterPlace:
    """Where the adapters are and what they are: what ``lightning-paged export`` needs besides the weights."""

    model_attr: str | None
    """Which submodule was converted, as the front door was told (``select_target``'s rule)."""
    target_prefix: str
    """The converted module's name within the module the front door holds, with a trailing dot (or ``""``)."""
    peft_config: dict[str, Any] | None
    """The adapters' PEFT ``LoraConfig``, as a dict of plain values."""
    task_type: str | None
    """``"CAUSAL_LM"`` for a causal LM (PEFT's task type of the exported adapter), else None."""


@dataclass
class Prepared:
    """What :func:`prepare_model` did."""

    target: nn.Module
    """The converted module."""
    report: ConversionReport
    fingerprint: Fingerprint
    """Of the base weights before quantization and the settings that change what the adapters mean."""
    config: QLoRAConfig
    adapter: AdapterPlace
    shard: ShardReport | None = None
    """This rank's shard report, when the model was sharded as it was converted."""

    def checkpoint_record(self, weights: str = "state_dict", resume: Any = None) -> AdapterCheckpoint:
        """The record a checkpoint of this model carries (``weights``: where its adapter weights are)."""
        return AdapterCheckpoint(
            fingerprint=self.fingerprint,
            qlora=asdict(self.config),
            model_attr=self.adapter.model_attr,
            target_prefix=self.adapter.target_prefix,
            peft_config=self.adapter.peft_config,
            task_type=self.adapter.task_type,
            weights=weights,
            resume=resume,
        )


def prepare_model(
    module: nn.Module,
    config: QLoRAConfig,
    device: torch.device | None = None,
    *,
    model_attr: str | None = "auto",
    where: str = "qlora.",
    others_where: str | None = None,
    shard: Shard | None = None,
    before_conversion: Callable[[], None] | None = None,
    layers: LayerSource | None = None,
) -> Prepared | None:
    """Convert ``module`` (or its ``model_attr`` submodule) to NF4 QLoRA in place; see the module for the steps.

    ``device``: where to quantize (None: where the model is; the host for a directory model).
    ``where``: the QLoRA settings' place in the user's config, put in front of a refused
    setting's name; ``others_where``: that of the front door's other settings (``model_attr``,
    ``block_class``), None to leave them as they are. ``shard`` converts and shards at once instead of the whole-model conversion.
    ``before_conversion`` runs after the fingerprint, right before anything draws random numbers
    (a front door's re-seeding). ``layers`` makes each 4-bit layer instead of quantizing the
    module's own weights (the memory plan's layers on the meta device): the weights do not come
    from the module, so nothing is broadcast (the plan runs on rank zero alone). Returns None when
    the target holds 4-bit layers already (converted by hand or by an earlier call).
    """
    try:
        target = select_target(module, model_attr)
    except SettingError as err:
        raise _located(err, where, others_where) from None
    if is_qlora(target):
        return None
    # Ranks quantize rank zero's weights; a directory model's ranks read the files, a layer source makes them.
    if deferred_directory(target) is None and layers is None:
        device = device if device is not None else _device_of(target)
        broadcast_from_rank_zero(target, device)
    taken = fingerprint(target, config)  # of the weights before quantization
    if before_conversion is not None:
        before_conversion()
    shard_report = None
    try:
        if shard is not None:
            report, shard_report = shard(target, config, device if device is not None else _device_of(target))
        else:
            report = convert_to_qlora(target, config, device=device, layers=layers)
    except SettingError as err:
        raise _located(err, where, others_where) from None
    return Prepared(target, report, taken, config, adapter_place(module, target, model_attr), shard_report)


def _located(err: SettingError, where: str, others_where: str | None) -> SettingError:
    if err.setting in QLORA_FIELDS:
        return err.located(where)
    return err if others_where is None else err.located(others_where)


def _device_of(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def adapter_place(module: nn.Module, target: nn.Module, model_attr: str | None) -> AdapterPlace:
    """Where ``target``'s adapters sit within ``module``, and their PEFT config."""
    prefix = next((f"{name}." if name else "" for name, m in module.named_modules() if m is target), "")
    peft_config = getattr(target, "peft_config", {}).get("default")
    config = json.loads(json.dumps(peft_config.to_dict(), default=list)) if peft_config is not None else None
    return AdapterPlace(
        model_attr=model_attr,
        target_prefix=prefix,
        peft_config=config,
        task_type="CAUSAL_LM" if type(target).__name__.endswith("ForCausalLM") else None,
    )
