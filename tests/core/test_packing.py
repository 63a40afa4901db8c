"""Padding-free packing: rows of whole examples that never see each other, with the unpacked loss;
the monitor's record of a packed step."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.recorder import EvictionRecorder
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.eviction.sources import open_source
from lightning_paged.core.packing import (
    IGNORE_INDEX,
    PackCollator,
    PadCollator,
    check_packing_support,
    fill_rate,
    flash_boundaries,
    model_inputs,
    pack_examples,
)

VOCAB = 64
PAD = 0


def examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    """Random token ids; the first third of each example is prompt (label -100), the rest response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def llama(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- the packing itself ------------------------------------------------------------------------------


def test_first_fit_decreasing_keeps_examples_whole_and_rows_within_max_length():
    rng = random.Random(1)
    lengths = [min(2048, max(2, int(rng.lognormvariate(math.log(150), 1.0)))) for _ in range(3000)]
    rows = pack_examples(lengths, 2048, seed=3)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))  # every example exactly once, none split
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    assert fill_rate(rows, lengths, 2048) > 0.95  # long-tailed lengths fill rows almost completely
    assert pack_examples(lengths, 2048, seed=3) == rows  # deterministic from the seed
    assert pack_examples(lengths, 2048, seed=4) != rows
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than max_length=8"):
        pack_examples([3, 9], 8)


def test_collator_restarts_positions_and_masks_each_examples_first_label():
    data = examples([3, 4, 2])
    batch = PackCollator(PAD)([[data[0], data[1]], [data[2]]])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 0, 0, 0, 0]]
    assert batch["input_ids"][1, 2:].eq(PAD).all() and batch["labels"][1, 2:].eq(IGNORE_INDEX).all()
    assert int(batch["num_tokens"]) == 9 and "attention_mask" not in batch
    # the second example's first token is predicted by the first example's last: not a target
    assert batch["labels"][0, 3] == IGNORE_INDEX
    assert batch["labels"][0, 4:].tolist() == data[1]["labels"][1:]


# --- the model sees each example alone -----------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_the_examples_one_by_one(attn):
    model = llama(attn)
    data = examples([7, 12, 5, 9, 15, 4])
    rows = [[data[0], data[1], data[2]], [data[3], data[4]], [data[5]]]
    packed = model(**model_inputs(PackCollator(PAD)(rows), model))
    packed.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total, targets = 0.0, 0
    for example in data:  # each alone, padded to itself: the unpacked path
        batch = PadCollator(PAD)([example])
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = model(**model_inputs(batch)).loss * n
        loss.backward()
        total, targets = total + loss.item(), targets + n
    assert packed.loss.item() == pytest.approx(total / targets, abs=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad / targets, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_an_example_boundary(attn):
    model = llama(attn)
    data = examples([6, 8, 5])
    changed = examples([8], seed=9)[0]
    before = model(**model_inputs(PackCollator(PAD)([data]))).logits
    after = model(**model_inputs(PackCollator(PAD)([[data[0], changed, data[2]]]))).logits
    torch.testing.assert_close(after[:, :6], before[:, :6], atol=0, rtol=0)  # before it: causal anyway
    torch.testing.assert_close(after[:, 14:], before[:, 14:], atol=1e-6, rtol=0)  # after it: unchanged
    assert not torch.allclose(after[:, 6:14], before[:, 6:14])
    alone = model(**model_inputs(PadCollator(PAD)([data[2]]))).logits
    torch.testing.assert_close(before[:, 14:], alone, atol=1e-5, rtol=0)


def plain_causal(module, query, key, value, attention_mask, **kwargs):
    """A kernel outside transformers' mask functions: causal over the whole row, blind to boundaries."""
    return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})


def test_an_attention_implementation_that_ignores_boundaries_is_refused():
    AttentionInterface.register("plain_causal", plain_causal)
    model = llama("plain_causal")
    data = examples([6, 5])
    packed = model(**model_inputs(PackCollator(PAD)([data]))).logits[:, 6:]
    alone = model(**model_inputs(PadCollator(PAD)([data[1]]))).logits
    assert not torch.allclose(packed, alone, atol=1e-3)  # it really would leak across the boundary
    with pytest.raises(SettingError, match=r"model_config.attn_implementation .*'plain_causal'.*sdpa"):
        check_packing_support(model)
    for ok in ("sdpa", "eager", "flash_attention_2"):
        check_packing_support(llama(ok) if ok != "flash_attention_2" else _with_attn(ok))


def _with_attn(name: str):
    class Config:
        _attn_implementation = name

    class Model:
        config = Config()

    return Model()


def test_flash_attention_gets_the_boundaries_of_the_flattened_batch():
    batch = PackCollator(PAD)([examples([3, 4]), examples([2])])
    inputs = model_inputs(batch, _with_attn("flash_attention_2"))
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert inputs["cu_seq_lens_q"].tolist() == cu_q.tolist() == [0, 3, 7, 9, 10, 11, 12, 13, 14]
    assert inputs["max_length_q"] == int(max_q) == 4 and inputs["attention_mask"] is None
    assert not inputs["use_cache"] and "cu_seq_lens_q" not in model_inputs(batch, llama())
    assert flash_boundaries(batch["position_ids"])["cu_seq_lens_k"] is not None


# --- the eviction monitor ----------------------------------------------------------------------------


def test_monitor_records_row_length_and_longest_example_of_a_packed_step():
    recorder = EvictionRecorder(open_source("none", torch.device("cpu")), long_sequence_threshold=15)
    packed = PackCollator(PAD)([examples([6, 8, 5]), examples([9, 3])])
    padded = PadCollator(PAD)(examples([6, 11]))
    records = []
    for batch in (packed, padded):
        with recorder.step(batch):
            pass
        records.append(recorder.last_record)
    packed_record, padded_record = records
    assert (packed_record.seq_len, packed_record.longest_example, packed_record.tokens) == (19, 9, 31)
    # the flag follows the row length: rows of 19 tokens make activations that large, however short
    # the examples in them are
    assert packed_record.long_sequence and not padded_record.long_sequence
    assert (padded_record.seq_len, padded_record.longest_example, padded_record.tokens) == (11, 11, 17)
    assert "longest" in recorder.summary().render()
    old_line = {k: v for k, v in packed_record.to_dict().items() if k != "longest_example"}
    assert StepRecord.from_dict(old_line).longest_example is None
