"""Generation stops at the chat template's end-of-turn token, and an empty answer says why."""

from __future__ import annotations

import torch
from conftest import tiny_llama_config
from transformers import AutoTokenizer, LlamaForCausalLM

from lightning_paged.core.encoding import SampleEncoder
from lightning_paged.core.generation import generate_answer


def always(token_id: int, vocab_size: int) -> LlamaForCausalLM:
    """A real tiny Llama whose every next token is ``token_id``: one constant residual stream, one logit row."""
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab_size, num_hidden_layers=1))
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = 1.0
    return model.train()


def test_generation_stops_at_the_templates_end_of_turn_not_only_at_eos(phi3_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(phi3_tokenizer)
    encoder = SampleEncoder(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    model = always(end, len(tokenizer))
    prompt = encoder.prompt("Uppercase: vivid", "messages")
    assert prompt.text.endswith("<|user|>\nUppercase: vivid<|end|>\n<|assistant|>\n")
    answer = generate_answer(model, tokenizer, prompt, encoder.stop_ids, max_new_tokens=8)
    assert answer.ids == [end] and answer.text == ""
    assert answer.note == "empty: the first token generated was '<|end|>', which ends an answer"
    assert model.training  # back in the mode it was in
    # stopping at the tokenizer's eos alone, as before, runs past the end of the turn to the token limit
    runaway = generate_answer(model, tokenizer, prompt, [tokenizer.eos_token_id], max_new_tokens=8)
    assert runaway.ids == [end] * 8


def test_an_answer_is_the_new_text_without_special_tokens(chatml_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    encoder = SampleEncoder(tokenizer)
    v = tokenizer.encode("V", add_special_tokens=False)[0]
    answer = generate_answer(
        always(v, len(tokenizer)), tokenizer, encoder.prompt("hi", "messages"), encoder.stop_ids, 4
    )
    assert answer.text == "VVVV" and answer.note == "" and answer.ids == [v] * 4
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # special, but no stop token
    answer = generate_answer(
        always(start, len(tokenizer)), tokenizer, encoder.prompt("hi", "messages"), encoder.stop_ids, 2
    )
    assert answer.note == "empty: only special tokens were generated, the first '<|im_start|>'"
