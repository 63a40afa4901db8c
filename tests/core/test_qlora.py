"""The framework-free conversion: settings from what users write, and a module turned into NF4 + LoRA."""

from __future__ import annotations

import typing
from dataclasses import fields

import bitsandbytes as bnb
import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import SETTINGS
from lightning_paged.core.qlora import (
    QUANT_TYPES,
    QLoRAConfig,
    QuantType,
    convert_to_qlora,
    qlora_config,
    qlora_config_from_init_args,
    select_target,
)
from lightning_paged.core.qlora_config import DTYPES, STORAGE_DTYPES, ComputeDtype, StorageDtype

FAST = QLoRAConfig(compute_dtype="float32", gradient_checkpointing=False, lora_dropout=0.0)


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def test_conversion_quantizes_every_linear_but_the_skipped_and_trains_only_adapters():
    model = tiny()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    report = convert_to_qlora(model, FAST, device="cpu")
    assert report.skipped == ["lm_head"] and sorted(report.quantized) == sorted(set(linears) - {"lm_head"})
    assert all(isinstance(model.get_submodule(n).base_layer, bnb.nn.Linear4bit) for n in report.adapted)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < report.quantized_bytes < report.replaced_16bit_bytes / 3  # about 4.5 bits in place of 16
    assert "linear layers quantized to 4-bit" in report.summary() and "KiB" in report.summary()


def test_settings_from_a_mapping_name_an_unknown_key_and_a_bad_value():
    assert qlora_config({"lora_r": 8}) == QLoRAConfig(lora_r=8)
    assert qlora_config(None) == QLoRAConfig()
    with pytest.raises(
        SettingError, match=r"^qlora\.lora_rank is not a setting of QLoRAConfig; its settings: "
    ):
        qlora_config({"lora_rank": 8})
    with pytest.raises(SettingError, match=r"^qlora\.quant_type must be one of nf4, fp4; got 'nf8'"):
        qlora_config({"quant_type": "nf8"})
    with pytest.raises(SettingError, match=r"^qlora must be QLoRAConfig\(\.\.\.\) or a dict of its fields"):
        qlora_config(8)  # type: ignore[arg-type]


def test_settings_from_flat_init_arguments_keep_defaults_for_none_and_ignore_other_keys():
    config = qlora_config_from_init_args(
        {"lora_r": 4, "skip_modules": None, "model_attr": "auto", "device": None},
        "trainer.strategy.init_args.",
    )
    assert config == QLoRAConfig(lora_r=4)
    with pytest.raises(
        SettingError, match=r"^trainer\.strategy\.init_args\.lora_dropout must be in \[0, 1\)"
    ):
        qlora_config_from_init_args({"lora_dropout": 1.5}, "trainer.strategy.init_args.")


def test_closed_choices_come_from_their_literal_and_fingerprinted_fields_from_the_dataclass():
    assert QUANT_TYPES == typing.get_args(QuantType) == ("nf4", "fp4")
    assert tuple(DTYPES) == typing.get_args(ComputeDtype)
    assert tuple(STORAGE_DTYPES) == typing.get_args(StorageDtype)
    assert all(DTYPES[name] == getattr(torch, name) for name in DTYPES)
    marked = {f.name for f in fields(QLoRAConfig) if f.metadata.get("fingerprint")}
    assert set(SETTINGS) == marked
    assert {"lora_dropout", "quant_storage", "gradient_checkpointing"}.isdisjoint(marked)


def test_select_target_rule():
    model = tiny()

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

    holder = Holder()
    assert select_target(holder, "auto") is model
    assert select_target(holder, None) is holder
    assert select_target(holder, "model.model") is model.model
    with pytest.raises(SettingError, match="is a LlamaConfig, not a torch module"):
        select_target(holder, "model.config")
