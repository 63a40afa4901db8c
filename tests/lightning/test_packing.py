"""Packing in the data module and the module: seeded order, bad settings, per-token weighting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import SCRIPTS, quiet_trainer, run_script

sys.path.insert(0, str(SCRIPTS))
from packed_ddp_train import TINY, GradRecorder, train
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lightning_paged.core.errors import SettingError
from lightning_paged.lightning.data import InstructionDataModule
from lightning_paged.lightning.module import CausalLMModule

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- the data module ---------------------------------------------------------------------------------


def packed_module(path: str, **kwargs) -> InstructionDataModule:
    settings = dict(max_length=256, batch_size=4, val_split=0, packing=True, seed=5)
    settings.update(kwargs)
    dm = InstructionDataModule(path, **settings)
    dm.setup("fit")
    return dm


def first_ids(loader) -> list[list[int]]:
    return [batch["input_ids"].sum(-1).tolist() for batch in loader]


def test_data_module_packs_the_shipped_data_and_its_order_follows_seed_and_epoch():
    path = str(EXAMPLES / "instructions.jsonl")
    dm = packed_module(path, val_split=16)
    rows = dm.train_rows
    assert rows is not None and dm.val_rows is not None
    assert sorted(i for row in rows.rows for i in row) == list(range(len(dm.train_data)))
    assert rows.fill_rate > 0.9 and len(dm.val_rows) >= 1
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 256
    order = first_ids(loader)
    assert first_ids(packed_module(path, val_split=16).train_dataloader()) == order
    loader.sampler.set_epoch(1)
    assert first_ids(loader) != order
    assert first_ids(packed_module(path, val_split=16, seed=6).train_dataloader()) != order


def test_packing_bad_inputs_are_clear_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Reverse: abc", "output": "cba"}] * 3)
    with pytest.raises(SettingError, match=r"max_length leaves no room .*prompt_template alone is 34 tokens"):
        packed_module(path, max_length=30)
    with pytest.raises(SettingError, match="group_by_length and packing"):
        InstructionDataModule(path, packing=True, group_by_length=True)
    with pytest.raises(SettingError, match="packing must be true or false"):
        InstructionDataModule(path, packing="yes")  # type: ignore[arg-type]


def test_validation_with_fewer_packed_rows_than_batch_size_is_one_smaller_batch(tmp_path):
    rows = [{"instruction": f"Reverse: {w}", "output": w[::-1]} for w in ["abc", "dog", "tiger"] * 4]
    dm = packed_module(write_jsonl(tmp_path / "d.jsonl", rows), val_split=4, batch_size=8)
    batches = list(dm.val_dataloader())
    assert len(dm.val_rows) == 1 and len(batches) == 1 and batches[0]["input_ids"].shape[0] == 1


# --- the module: logged figures and per-token weighting ------------------------------------------------


def ragged_data(tmp_path: Path) -> str:
    words = ["a", "owl", "horse", "tiger", "elephant", "hippopotamus", "ox", "crocodile"]
    rows = [
        {"instruction": f"Uppercase: {w * (1 + i % 3)}", "output": (w * (1 + i % 3)).upper()}
        for i, w in enumerate(words * 2)
    ]
    return write_jsonl(tmp_path / "d.jsonl", rows)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_gradient_accumulation_weighs_every_response_token_the_same(tmp_path, packing):
    path = ragged_data(tmp_path)
    grads = []
    for batch_size, accumulate in ((4, 1), (2, 2)):
        dm = InstructionDataModule(path, batch_size=batch_size, val_split=0, packing=packing, max_length=128)
        torch.manual_seed(0)
        module = GradRecorder(model_config=TINY)
        trainer = quiet_trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        grads.append(module.grads)
        metrics = trainer.callback_metrics
        assert {"train/tokens", "train/padding_fraction"} <= set(metrics)
        assert 0 <= float(metrics["train/padding_fraction"]) < 1
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_ddp_weighs_every_response_token_of_the_step_the_same(tmp_path):
    """Two ranks, one packed row each, rows with different response-token counts: the gradients equal
    one process's over both rows (the mean over all their response tokens), not the mean of two means."""
    run_script("packed_ddp_train.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    _, single = train(tmp_path, devices=1, batch_size=2)
    for name, value in single.grads.items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], value, atol=1e-6, rtol=1e-4, msg=name)


def plain_causal(module, query, key, value, attention_mask, **kwargs):
    """Causal over the whole row, blind to example boundaries (tests/core/test_packing.py shows it leaks)."""
    return sdpa_attention_forward(module, query, key, value, None, **{**kwargs, "is_causal": True})


def test_packing_with_an_attention_that_ignores_boundaries_stops_fit(tmp_path):
    AttentionInterface.register("plain_causal", plain_causal)
    rows = [{"instruction": f"Uppercase: {w}", "output": w.upper()} for w in ["owl", "horse", "tiger"] * 2]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dm = InstructionDataModule(path, batch_size=2, val_split=0, packing=True, max_length=128)
    module = CausalLMModule(model_config={**TINY, "attn_implementation": "plain_causal"})
    with pytest.raises(SettingError, match="plain_causal"):
        quiet_trainer(max_steps=1).fit(module, datamodule=dm)
