"""A transformers model's own loss, chunked: converted QLoRA models, packed rows, tied and 4-bit heads,
model families that transform their logits, and the fallback for what is not reproduced."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_llama_config
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, LlamaForCausalLM

from lightning_paged.core.causal_lm_loss import causal_lm_loss, head_input, loss_plan
from lightning_paged.core.loss import LogitTransform
from lightning_paged.core.packing import PackCollator, model_inputs
from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

VOCAB = 128


def padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 14), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # prompt
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels[1, -4:] = -100  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch():
    first = {"input_ids": list(range(5, 12)), "labels": [-100, -100, 7, 8, 9, 10, 11]}
    second = {"input_ids": list(range(40, 46)), "labels": [-100, 41, 42, 43, 44, 45]}
    third = {"input_ids": list(range(60, 70)), "labels": list(range(60, 70))}
    return PackCollator(pad_token_id=0)([[first, second], [third]])


def assert_same_loss_and_gradients(model, inputs, chunk_size=4, rtol=1e-5, atol=1e-7):
    params = [p for p in model.parameters() if p.requires_grad]
    expected = model(**inputs).loss
    want = torch.autograd.grad(expected, params)
    loss = causal_lm_loss(model, inputs, chunk_size=chunk_size)
    got = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())))


def qlora_llama(**settings):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    config = QLoRAConfig(compute_dtype="float32", lora_dropout=0.0, **settings)
    convert_to_qlora(model, config, device="cpu")
    return model.train()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_a_qlora_model_with_checkpointing_has_its_own_loss_and_lora_gradients(packed):
    model = qlora_llama()
    assert loss_plan(model).chunked
    batch = packed_batch() if packed else padded_batch()
    assert_same_loss_and_gradients(model, model_inputs(batch, model))


def test_a_4bit_head_with_lora_is_recomputed_chunk_by_chunk():
    model = qlora_llama(skip_modules=[])  # lm_head quantized and adapted too
    plan = loss_plan(model)
    assert plan.chunked and type(plan.head).__name__ == "Linear4bit"
    assert plan.head.lora_A["default"].weight.requires_grad
    assert_same_loss_and_gradients(model, model_inputs(packed_batch(), model))


def test_a_tied_head_trains_the_embedding_as_the_standard_loss_does():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_loss_and_gradients(model, padded_batch(), rtol=1e-5, atol=1e-6)


def test_a_peft_model_and_a_bfloat16_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    assert loss_plan(model).head is base.lm_head
    assert_same_loss_and_gradients(model, padded_batch(), rtol=2e-2, atol=2e-2)


FAMILIES = {
    "gemma2": ({"final_logit_softcapping": 3.0}, LogitTransform(softcap=3.0)),
    "gemma3_text": ({"final_logit_softcapping": 2.5}, LogitTransform(softcap=2.5)),
    "cohere": ({"logit_scale": 0.25}, LogitTransform(multiply=0.25)),
    "granite": ({"logits_scaling": 4.0}, LogitTransform(divide=4.0)),
    "qwen3": ({}, LogitTransform()),
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_families_that_transform_their_logits_are_reproduced(model_type):
    settings, transform = FAMILIES[model_type]
    config = CONFIG_MAPPING[model_type](
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **settings,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    plan = loss_plan(model)
    assert plan.chunked and plan.transform == transform
    assert_same_loss_and_gradients(model, padded_batch())


def test_a_transform_not_reproduced_falls_back_to_the_model_s_own_loss():
    config = CONFIG_MAPPING["recurrent_gemma"](vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2)
    plan = loss_plan(AutoModelForCausalLM.from_config(config))
    assert not plan.chunked
    assert "cap = self.config.logits_soft_cap" in plan.fallback


def test_a_model_with_another_loss_function_runs_it_and_says_why_once():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).train()
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.float().square().mean()
    plan = loss_plan(model)
    assert not plan.chunked and "not ForCausalLMLoss" in plan.fallback
    batch = padded_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        first = causal_lm_loss(model, batch)
        causal_lm_loss(model, batch)
    messages = [str(w.message) for w in caught if "chunked loss is off" in str(w.message)]
    assert len(messages) == 1 and "LlamaForCausalLM computes its loss with <lambda>" in messages[0]
    torch.testing.assert_close(first, model(**batch).loss)
    total = causal_lm_loss(model, batch, plan=plan, reduction="sum")
    torch.testing.assert_close(total, first * (batch["labels"][:, 1:] != -100).sum())


def test_the_head_is_itself_again_after_the_forward_even_when_it_fails():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    head = model.lm_head
    hidden = head_input(model, head, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert hidden.shape == (1, 3, model.config.hidden_size)
    assert "forward" not in head.__dict__
    with pytest.raises(IndexError):
        head_input(model, head, {"input_ids": torch.tensor([[VOCAB + 5]])})
    assert "forward" not in head.__dict__
    assert model(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, VOCAB)
