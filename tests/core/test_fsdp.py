"""Sharding helpers of core/fsdp.py that need no process group: storage, block discovery, 8-bit state cuts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

from lightning_paged import SettingError
from lightning_paged.core.fingerprint import CheckpointMismatchError
from lightning_paged.core.fsdp import find_blocks, sharding_storage
from lightning_paged.core.fsdp_optimizer import _cut_blocks


def test_storage_for_sharding_is_the_compute_dtype_unless_a_floating_one_is_given():
    assert sharding_storage(None, "float16") == "float16"
    assert sharding_storage("float32", "bfloat16") == "float32"
    with pytest.raises(SettingError, match=r"quant_storage must be a floating type under FSDP"):
        sharding_storage("uint8", "bfloat16")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_blocks_are_found_from_no_split_modules_or_the_largest_module_list():
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    assert [type(b).__name__ for b in find_blocks(llama)] == ["LlamaDecoderLayer"] * 3

    plain = nn.Module()
    plain.small = nn.ModuleList([_Block(), _Block()])
    plain.layers = nn.ModuleList([_Block() for _ in range(3)])
    assert find_blocks(plain) == list(plain.layers)
    assert len(find_blocks(plain, block_class="_Block")) == 5

    with pytest.raises(SettingError, match=r"block_class names no module class.*found: _Block"):
        find_blocks(plain, block_class="DecoderLayer")
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(SettingError, match=r"_no_split_modules and for an nn\.ModuleList"):
        find_blocks(flat)


def test_8bit_block_maxima_are_cut_for_another_world_size_only_where_blocks_line_up():
    full = torch.arange(8.0)  # 8 blocks of 256 elements
    # saved as two shards of 4 blocks, loaded on one rank and on four: boundaries line up
    assert _cut_blocks(full, [1024, 1024], [2048], 0, "p").tolist() == full.tolist()
    assert _cut_blocks(full, [1024, 1024], [512] * 4, 2, "p").tolist() == [4.0, 5.0]
    # same layout: taken as saved, even when shards end mid-block
    odd = torch.arange(4.0)
    assert _cut_blocks(odd, [300, 300], [300, 300], 1, "p").tolist() == [2.0, 3.0]
    with pytest.raises(CheckpointMismatchError, match=r"resume with 2 processes"):
        _cut_blocks(odd, [300, 300], [600], 0, "p")


def test_ademamix_block_maxima_are_cut_along_their_last_axis():
    # AdEMAMix's absmax1 is (2, blocks): one row per moving average, blocks along the parameter
    full = torch.arange(16.0).reshape(2, 8)
    assert _cut_blocks(full, [1024, 1024], [512] * 4, 1, "p").tolist() == [[2.0, 3.0], [10.0, 11.0]]


def test_float16_mixed_precision_is_refused_by_name_in_one_line():
    from lightning_paged.core.fsdp import check_precision

    check_precision("bf16-mixed", "trainer.precision")
    check_precision("32-true", "trainer.precision")
    with pytest.raises(SettingError) as refused:
        check_precision("16-mixed", "trainer.precision")
    message = str(refused.value)
    assert (
        message.startswith("trainer.precision cannot be used with paged_qlora_fsdp") and "\n" not in message
    )
    assert "'bf16-mixed'" in message


def test_the_sharded_load_refuses_fused_experts_it_would_leave_unquantized_before_changing_anything():
    from transformers import AutoModelForCausalLM

    from lightning_paged import QLoRAConfig
    from lightning_paged.core.fsdp_load import convert_and_shard
    from lightning_paged.testing import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = QLoRAConfig(quant_storage="bfloat16", lora_dropout=0.0)
    with pytest.raises(
        SettingError, match=r"^quantize_experts is not supported by the sharded \(FSDP\) load"
    ):
        convert_and_shard(model, settings, torch.device("cpu"), mesh=None)
    settings.quantize_experts, settings.lora_on_experts = False, True
    with pytest.raises(
        SettingError, match=r"^lora_on_experts is not supported by the sharded.*Set lora_on_experts"
    ):
        convert_and_shard(model, settings, torch.device("cpu"), mesh=None)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
