"""Base weights are quantized from the compute dtype, byte for byte as transformers' 4-bit loading does."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

from lightning_paged.core.layers4bit import DTYPES, linear4bit_layers
from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float32"])
def test_a_float32_model_is_quantized_from_the_compute_dtype(compute_dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    assert next(model.parameters()).dtype == torch.float32
    convert_to_qlora(model, QLoRAConfig(compute_dtype=compute_dtype, lora_r=4), device="cpu")
    layers = linear4bit_layers(model)
    assert layers
    # bitsandbytes dequantizes to quant_state.dtype in every forward and backward
    assert {layer.weight.quant_state.dtype for layer in layers} == {DTYPES[compute_dtype]}


def test_packed_weights_equal_transformers_4bit_load_at_the_compute_dtype(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)  # float32 files
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    convert_to_qlora(ours, QLoRAConfig(compute_dtype="bfloat16", lora_r=4), device="cpu")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu"
    )
    reference = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    compared = 0
    for name, module in ours.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            other = reference[name.replace(".base_layer", "")]
            assert module.weight.quant_state.dtype == other.weight.quant_state.dtype == torch.bfloat16
            assert torch.equal(module.weight.data, other.weight.data)
            assert torch.equal(module.weight.quant_state.absmax, other.weight.quant_state.absmax)
            compared += 1
    assert compared == len(reference) > 0
