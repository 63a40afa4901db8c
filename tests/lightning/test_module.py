"""CausalLMModule: building the model, response-only loss, training with a plain Trainer, the sample."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer, tiny_llama_config
from transformers import LlamaForCausalLM

from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.lightning.data import IGNORE_INDEX, InstructionDataModule
from lightning_paged.lightning.module import CausalLMModule

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**kwargs)


def test_model_from_config_covers_the_byte_tokenizer():
    module = CausalLMModule(model_config=TINY)
    config = module.model.config
    assert config.vocab_size == 259 == module.model.get_input_embeddings().num_embeddings
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (256, 257, 258)
    assert config.hidden_size == 64 and config.num_hidden_layers == 1
    assert module.resolved_optimizer_config() == OptimizerConfig()  # no settings: the defaults


def test_loss_is_on_response_tokens_only(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Reverse: abc", "output": "cba"}] * 2)
    dm = InstructionDataModule(path, val_split=0, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    module = CausalLMModule(model_config=TINY)
    logits = module(batch["input_ids"], batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    assert keep.sum() == 2 * len("cba<eos>".replace("<eos>", "x"))  # response bytes + end of sequence
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][keep], targets[keep])
    torch.testing.assert_close(module._loss(batch), expected)
    everything = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten()
    )
    assert not torch.isclose(module._loss(batch), everything)


def test_trains_with_a_plain_trainer_and_logs_its_metrics(tmp_path):
    rows = [
        {"instruction": f"Uppercase: {w}", "output": w.upper()} for w in ["cat", "horse", "tiger", "owl"] * 4
    ]
    dm = InstructionDataModule(write_jsonl(tmp_path / "d.jsonl", rows), val_split=4, batch_size=4)
    torch.manual_seed(0)
    module = CausalLMModule(model_config=TINY, optimizer=OptimizerConfig(name="adamw", lr=3e-3))
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    t = trainer(max_steps=6, val_check_interval=3, limit_val_batches=1)
    t.fit(module, dm)
    metrics = t.callback_metrics
    assert math.isfinite(metrics["train/loss"].item()) and math.isfinite(metrics["val/loss"].item())
    assert metrics["train/tokens"].item() > 4 * 20  # four samples of more than 20 tokens each
    changed = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    t.test(module, dm, verbose=False)
    assert math.isfinite(t.callback_metrics["test/loss"].item())


def test_learns_and_the_sample_uses_the_data_prompt_format(tmp_path):
    """Two instructions, learned by heart: after training, the greedy sample answers the one asked."""
    rows = [{"instruction": "Say hi", "output": "world"}, {"instruction": "Say no", "output": "stop"}] * 4
    dm = InstructionDataModule(write_jsonl(tmp_path / "d.jsonl", rows), val_split=2, batch_size=4)
    torch.manual_seed(0)
    module = CausalLMModule(
        model_config={**TINY, "num_hidden_layers": 2},
        optimizer=OptimizerConfig(name="adamw", lr=3e-3),
        sample_prompt="Say hi",
        sample_max_new_tokens=8,
    )
    t = trainer(max_steps=120, val_check_interval=60, check_val_every_n_epoch=None, limit_val_batches=1)
    t.fit(module, dm)
    assert t.callback_metrics["train/loss"].item() < 0.5
    assert module.last_sample == "world"
    assert module.model.training  # generation put the model back in train mode
    assert module.generate_sample("Say no") == "stop"


def test_loads_a_local_model_directory_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    CausalLMModule(model_config=TINY).model.save_pretrained(tmp_path / "tiny")
    module = CausalLMModule(model_name_or_path=str(tmp_path / "tiny"))
    assert next(module.model.parameters()).dtype == torch.bfloat16
    assert module.model.config.vocab_size == 259
    LlamaForCausalLM(tiny_llama_config(vocab_size=128)).save_pretrained(tmp_path / "small")
    with pytest.raises(
        SettingError, match=r"^model_name_or_path gives a vocabulary of 128 tokens, fewer than"
    ):
        CausalLMModule(model_name_or_path=str(tmp_path / "small"))


def test_bad_model_settings_are_clear_errors(tmp_path):
    with pytest.raises(SettingError, match=r"^model_name_or_path and model_config: give exactly one"):
        CausalLMModule()
    with pytest.raises(SettingError, match=r"^model_name_or_path and model_config: give exactly one"):
        CausalLMModule(model_name_or_path=str(tmp_path), model_config=TINY)
    with pytest.raises(
        SettingError, match=r"^model_name_or_path is not a local directory.*nothing is downloaded"
    ):
        CausalLMModule(model_name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(SettingError, match=r"^model_name_or_path has no config.json"):
        CausalLMModule(model_name_or_path=str(tmp_path))
    with pytest.raises(SettingError, match=r"^model_config.model_type must name .*did you mean llama"):
        CausalLMModule(model_config={**TINY, "model_type": "lama"})
    with pytest.raises(
        SettingError, match=r"^model_config.hidden_sise is not a llama setting; did you mean 'hidden_size'"
    ):
        CausalLMModule(model_config={**TINY, "hidden_sise": 64})
    with pytest.raises(
        SettingError, match=r"^model_config.vocab_size gives a vocabulary of 128 tokens, fewer"
    ):
        CausalLMModule(model_config={**TINY, "vocab_size": 128})
    with pytest.raises(SettingError, match=r"^tokenizer is not a local directory"):
        CausalLMModule(model_config=TINY, tokenizer=str(tmp_path / "missing"))
    with pytest.raises(SettingError, match=r"^sample_max_new_tokens must be a positive integer"):
        CausalLMModule(model_config=TINY, sample_max_new_tokens=0)


class LossLog(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.losses.append(trainer.callback_metrics["train/loss"].item())


def test_the_chunked_and_the_standard_loss_train_and_evaluate_alike(tmp_path):
    """The default chunked loss gives the standard loss's values and updates, in training and validation."""
    rows = [{"instruction": f"Uppercase: {w}", "output": w.upper()} for w in ["cat", "horse", "owl"] * 4]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    runs = {}
    for kind in ("chunked", "standard"):
        torch.manual_seed(0)
        module = CausalLMModule(
            model_config=TINY, optimizer=OptimizerConfig(name="sgd", lr=0.5), loss=kind, loss_chunk_size=7
        )
        initial = module.model.lm_head.weight.detach().clone()
        logger = LossLog()
        t = trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, callbacks=[logger])
        t.fit(module, InstructionDataModule(path, val_split=3, batch_size=3, seed=0))
        runs[kind] = (logger.losses, t.callback_metrics["val/loss"].item(), dict(module.named_parameters()))
    (losses, val, params), (std_losses, std_val, std_params) = runs["chunked"], runs["standard"]
    assert losses == pytest.approx(std_losses, rel=1e-5) and val == pytest.approx(std_val, rel=1e-5)
    assert not torch.equal(params["model.lm_head.weight"], initial)
    for name, param in params.items():  # the head's weight included: it trains here, no QLoRA
        torch.testing.assert_close(param, std_params[name], rtol=1e-4, atol=1e-6)


def test_a_model_the_chunked_loss_does_not_reproduce_runs_its_own_loss_and_says_why(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Reverse: abc", "output": "cba"}] * 2)
    dm = InstructionDataModule(path, val_split=0, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = CausalLMModule(model_config=TINY)
    module.model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.float().abs().mean()
    with pytest.warns(
        UserWarning, match=r"chunked loss is off.*LlamaForCausalLM computes its loss with <lambda>"
    ):
        loss = module._loss(batch)
    torch.testing.assert_close(loss, module.model(**batch).loss)


def test_bad_loss_settings_are_clear_errors():
    with pytest.raises(SettingError, match=r"^loss must be one of chunked, standard; got 'fused'"):
        CausalLMModule(model_config=TINY, loss="fused")  # type: ignore[arg-type]
    with pytest.raises(SettingError, match=r"^loss_chunk_size must be a positive number of tokens"):
        CausalLMModule(model_config=TINY, loss_chunk_size=0)
