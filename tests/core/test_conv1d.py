"""GPT-2's Conv1D: quantized transposed like transformers' 4-bit load, LoRA exported with fan_in_fan_out, embeddings kept tied."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lightning_paged import QLoRAConfig, SettingError, convert_to_qlora
from lightning_paged.core.errors import ExportError
from lightning_paged.core.export import adapter_from_model, merge_adapter, save_adapter
from lightning_paged.testing import tiny_config

FAST = QLoRAConfig(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False, compute_dtype="float32"
)


def gpt2():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        tiny_config("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    )


def trained(model):
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return ids


def test_conv1d_layers_become_4bit_with_lora_and_the_embedding_stays_tied():
    import bitsandbytes as bnb

    model = gpt2()
    weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # in x out
    report = convert_to_qlora(model, FAST, device="cpu")
    assert report.quantized == [
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    layer = model.transformer.h[0].attn.c_attn.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and (layer.in_features, layer.out_features) == weight.shape
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert dense.shape == weight.t().shape and (dense - weight.t()).norm() < 0.2 * weight.norm()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.peft_config["default"].fan_in_fan_out


def test_quantizing_a_tied_output_layer_is_refused_instead_of_untying_it():
    with pytest.raises(
        SettingError, match=r"^skip_modules leaves lm_head to quantize, but its weight is .*wte's too"
    ):
        convert_to_qlora(gpt2(), QLoRAConfig(skip_modules=[]), device="cpu")


def test_exported_adapter_applies_to_the_16bit_conv1d_model_and_merges_transposed(tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = gpt2()
    original = copy.deepcopy(model)
    convert_to_qlora(model, FAST, device="cpu")
    ids = trained(model)
    for name, module in model.named_modules():  # the 16-bit model with the same (dequantized) base weights
        if isinstance(module, bnb.nn.Linear4bit):
            dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            original.get_submodule(name.removesuffix(".base_layer")).weight.data = dense.t().contiguous()
    original.save_pretrained(tmp_path / "base")
    adapter = adapter_from_model(model)
    save_adapter(adapter, tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        peft = PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(peft(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)

    merge_adapter(adapter, tmp_path / "base", tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(tmp_path / "base" / "model.safetensors")
    a, b = adapter.pairs()["transformer.h.0.mlp.c_fc"]
    want = base["transformer.h.0.mlp.c_fc.weight"] + adapter.scale * (b @ a).t()
    torch.testing.assert_close(merged["transformer.h.0.mlp.c_fc.weight"], want)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_merging_a_conv1d_adapter_onto_a_prequantized_base_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    gpt2().save_pretrained(tmp_path / "base")
    AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "base"),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    ).save_pretrained(tmp_path / "base-4bit")
    model = gpt2()
    convert_to_qlora(model, FAST, device="cpu")
    with pytest.raises(ExportError, match=r"pre-quantized 4-bit base .*Conv1D.*Merge onto the 16-bit model"):
        merge_adapter(adapter_from_model(model), tmp_path / "base-4bit", tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
