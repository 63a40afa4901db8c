"""The one entry every front door calls: select, rank zero's weights, fingerprint, convert, adapter place."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from lightning_paged.core.adapter_checkpoint import AdapterCheckpoint
from lightning_paged.core.errors import SettingError
from lightning_paged.core.fingerprint import tensors_fingerprint
from lightning_paged.core.prepare import prepare_model
from lightning_paged.core.qlora import QLoRAConfig, is_qlora

FAST = QLoRAConfig(compute_dtype="float32", gradient_checkpointing=False, lora_dropout=0.0)


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny()


def test_prepare_converts_once_fingerprints_before_quantizing_and_says_where_the_adapters_are():
    holder = Holder()
    before = tensors_fingerprint(holder.model)
    assert not is_qlora(holder)
    prepared = prepare_model(holder, FAST, torch.device("cpu"))
    assert prepared is not None and is_qlora(holder) and prepared.target is holder.model
    assert prepared.fingerprint.base == before  # the 16-bit weights, not the 4-bit ones
    assert prepared.fingerprint.settings["lora_r"] == FAST.lora_r
    assert prepared.adapter.target_prefix == "model." and prepared.adapter.task_type == "CAUSAL_LM"
    assert prepared.adapter.peft_config is not None and prepared.adapter.peft_config["r"] == FAST.lora_r
    assert prepared.report.trainable_params == sum(p.numel() for p in holder.parameters() if p.requires_grad)
    assert prepare_model(holder, FAST, None) is None  # already converted: left as it is


def test_the_record_of_a_prepared_model_round_trips_and_names_what_differs():
    prepared = prepare_model(tiny(), FAST, torch.device("cpu"), model_attr=None)
    assert prepared is not None
    record = prepared.checkpoint_record(weights="model")
    again = AdapterCheckpoint.from_dict(record.to_dict())
    assert again == record and again.weights == "model" and again.settings() == FAST
    other = prepare_model(
        tiny(), QLoRAConfig(**{**FAST.__dict__, "lora_r": 8}), torch.device("cpu"), model_attr=None
    )
    assert other is not None
    assert record.differences(other.fingerprint, where="qlora.") == [
        "another qlora.lora_r (16 in the checkpoint, 8 now)"
    ]


def test_prepare_names_a_bad_setting_where_the_user_wrote_it():
    with pytest.raises(SettingError, match=r"^qlora\.target_modules match no linear layer"):
        prepare_model(tiny(), QLoRAConfig(target_modules=["nothing_here"]), torch.device("cpu"))
    with pytest.raises(SettingError, match=r"^model_attr names no attribute"):
        prepare_model(tiny(), FAST, torch.device("cpu"), model_attr="missing")
    with pytest.raises(SettingError, match=r"^strategy\.model_attr names no attribute"):
        prepare_model(tiny(), FAST, torch.device("cpu"), model_attr="missing", others_where="strategy.")
