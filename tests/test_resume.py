"""Resume loses nothing: exact with dropout whatever the validation cadence, metrics and configs kept."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_paged.lightning.data import InstructionDataModule
from lightning_paged.lightning.module import CausalLMModule
from lightning_paged.lightning.strategies import PagedQLoRAStrategy

MODEL_CONFIG = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=96,
)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PAGED_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    words = ["tiger", "lion", "cat", "dog", "owl", "fox", "bee", "elk", "yak", "emu", "ant", "cow"]
    rows = [{"instruction": f"Uppercase: {w}", "output": w.upper()} for w in words * 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Record(pl.Callback):
    """The loss of every training step, in order."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class SimulatedCrash(RuntimeError):
    pass


class CrashAfter(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise SimulatedCrash(f"crash after step {self.step}")


def make_module(sample: bool) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(
        model_config=dict(MODEL_CONFIG),
        optimizer={"name": "adamw", "lr": 1e-2, "scheduler": "cosine", "warmup_steps": 2},
        sample_prompt="Uppercase: yak" if sample else None,
        sample_max_new_tokens=3,
    )


def make_trainer(steps: int, val_every: int, callbacks: list) -> pl.Trainer:
    strategy = PagedQLoRAStrategy(
        lora_r=4, lora_dropout=0.1, compute_dtype="float32", gradient_checkpointing=False
    )
    return pl.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=steps,
        val_check_interval=val_every,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def adapters(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("val_every", "save_every", "crash_after", "sample"),
    [(3, 3, 3, False), (3, 3, 3, True), (2, 3, 3, False)],
    ids=["validation-at-the-checkpoint", "with-sample-generation", "validation-cadence-not-dividing"],
)
def test_resume_with_dropout_is_exact_whatever_the_validation_cadence(
    tmp_path, data_file, val_every, save_every, crash_after, sample
):
    """12 training samples in batches of 4: 3 batches an epoch. Dropout on; validation draws from
    the global generator when its loader starts (a loader without its own generator)."""
    steps = 7

    def data() -> InstructionDataModule:
        return InstructionDataModule(str(data_file), max_length=80, batch_size=4, val_split=8)

    straight = Record()
    first_module = make_module(sample)
    make_trainer(steps, val_every, [straight]).fit(first_module, data())

    crashed = Record()
    saver = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=save_every, save_top_k=-1
    )
    with pytest.raises(SimulatedCrash):
        make_trainer(steps, val_every, [crashed, saver, CrashAfter(crash_after)]).fit(
            make_module(sample), data()
        )
    assert crashed.losses == straight.losses[:crash_after]

    resumed = Record()
    module = make_module(sample)
    make_trainer(steps, val_every, [resumed]).fit(
        module, data(), ckpt_path=tmp_path / f"step={crash_after}.ckpt"
    )
    assert crashed.losses + resumed.losses == straight.losses  # bit for bit
    for name, value in adapters(first_module).items():
        assert torch.equal(adapters(module)[name], value), name
