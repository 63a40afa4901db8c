"""Checkpoints of the Lightning strategies: fingerprint checked on resume, exact resume, atomic saves, clear errors."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import SimulatedCrash, crash_at, failing_torch_save, tiny_checkpoint_config, trainable_weights
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lightning_paged.core.atomic import CheckpointReadError, read_checkpoint
from lightning_paged.core.fingerprint import (
    CheckpointMismatchError,
    tensors_fingerprint,
)
from lightning_paged.core.packing import PackCollator, PackedDataset, model_inputs
from lightning_paged.core.sampling import (
    ResumableSampler,
)
from lightning_paged.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_paged.lightning.strategies import PagedQLoRAStrategy

VOCAB = 64


pytestmark = pytest.mark.usefixtures("private_hash_cache")
tiny_config = tiny_checkpoint_config


def samples(n: int = 10, seq: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {"input_ids": (ids := torch.randint(0, VOCAB, (seq,), generator=g)), "labels": ids} for _ in range(n)
    ]


def packed_rows() -> PackedDataset:
    """10 rows of packed examples: 10 of 9-12 tokens, one per row, and 10 of 2-4 in the room left."""
    g = torch.Generator().manual_seed(3)
    lengths = (
        torch.randint(9, 13, (10,), generator=g).tolist() + torch.randint(2, 5, (10,), generator=g).tolist()
    )
    examples = [
        {"input_ids": (ids := torch.randint(0, VOCAB, (n,), generator=g).tolist()), "labels": ids}
        for n in lengths
    ]
    rows = PackedDataset(examples, max_length=16, seed=1)
    assert len(rows) == 10
    return rows


def loader(data, batch_size: int = 3, num_workers: int = 0) -> DataLoader:
    """What the data module does: a resumable shuffled order; worker seeds from a private generator."""
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=ResumableSampler(data, seed=7),
        generator=torch.Generator().manual_seed(0),
        num_workers=num_workers,
        collate_fn=PackCollator(pad_token_id=0) if isinstance(data, PackedDataset) else None,
    )


class LlamaModule(pl.LightningModule):
    """Records every loss and the batches it trained on. ``scheduled``: a schedule over the estimated
    total steps; with ``max_epochs`` set, Lightning then builds and iterates the training loader
    while it sets up the optimizer, before the checkpoint is restored."""

    def __init__(self, scheduled: bool = False, seed: int = 0, model_dir: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = (
            LlamaForCausalLM.from_pretrained(model_dir) if model_dir else LlamaForCausalLM(tiny_config())
        )
        self.scheduled = scheduled
        self.losses: list[float] = []
        self.batches: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**model_inputs(batch)).loss
        self.losses.append(loss.item())
        self.batches.append(batch["input_ids"][:, 0].tolist())
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=2e-2)
        total = self.trainer.estimated_stepping_batches if self.scheduled else 100
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.1, 1 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def strategy(**overrides) -> PagedQLoRAStrategy:
    settings = dict(lora_r=4, lora_dropout=0.1, compute_dtype="float32", gradient_checkpointing=False)
    settings.update(overrides)
    return PagedQLoRAStrategy(**settings)


def trainer(steps: int, callbacks=(), max_epochs: int | None = None, **overrides) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        strategy=strategy(**overrides),
        max_steps=steps,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    "scheduled", [False, True], ids=["loader-built-after-restore", "loader-built-before"]
)
def test_resume_after_crash_mid_epoch_matches_uninterrupted_run(tmp_path, scheduled, packing):
    """10 samples (or packed rows) in batches of 3: 4 batches per epoch. Crash after step 5 (mid-epoch
    1), resume to step 9: the run crosses an epoch boundary before and after the crash. Dropout is on,
    so the random generators must come back too, and the learning-rate schedule is not constant.
    With a worker process, the loader's iterator takes indices from the sampler as soon as it exists."""
    data = packed_rows() if packing else samples()
    epochs, workers = (3, 1) if scheduled else (None, 0)
    straight = LlamaModule(scheduled)
    trainer(9, max_epochs=epochs).fit(straight, loader(data, num_workers=workers))

    first = LlamaModule(scheduled)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=5, save_top_k=-1)
    with pytest.raises(SimulatedCrash):
        trainer(9, callbacks=[saver, crash_at(5)], max_epochs=epochs).fit(
            first, loader(data, num_workers=workers)
        )
    assert first.losses == straight.losses[:5]

    resumed = LlamaModule(scheduled)
    t = trainer(
        9, callbacks=[ModelCheckpoint(dirpath=tmp_path / "after", every_n_train_steps=5)], max_epochs=epochs
    )
    t.fit(resumed, loader(data, num_workers=workers), ckpt_path=tmp_path / "step=5.ckpt")
    assert t.global_step == 9
    assert first.batches + resumed.batches == straight.batches  # same data, same order, nothing skipped
    assert first.losses + resumed.losses == straight.losses  # bit for bit
    for name, value in trainable_weights(straight).items():
        assert torch.equal(trainable_weights(resumed)[name], value), name


def test_checkpoint_carries_fingerprint_settings_and_resume_position(tmp_path):
    module = LlamaModule()
    t = trainer(2)
    t.fit(module, loader(samples()))
    t.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)  # everything we add is weights-only safe
    section = checkpoint["lightning_paged"]
    assert section["fingerprint"]["base"]["kind"] == "tensors"  # built from a config
    assert section["fingerprint"]["base"]["sha256"] == tensors_fingerprint(LlamaModule().model).sha256
    assert section["fingerprint"]["settings"]["lora_r"] == 4
    assert section["qlora"]["lora_dropout"] == 0.1
    assert section["target_prefix"] == "model." and section["task_type"] == "CAUSAL_LM"
    assert (
        section["peft_config"]["r"] == 4
        and sorted(section["peft_config"]["target_modules"])[0] == "down_proj"
    )
    # Lightning counts an epoch stopped by max_steps as done and would resume with the next one; the
    # checkpoint holds the counters of the last batch's end instead, and the epoch's third batch is next.
    assert (section["resume"]["epoch"], section["resume"]["batches"]) == (0, 2)
    fit_loop = checkpoint["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"]["completed"] == 0
    assert fit_loop["epoch_loop.batch_progress"]["current"]["completed"] == 1
    assert fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] == 1
    assert set(section["resume"]["rng"][0]) >= {"torch", "python", "numpy"}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "run.ckpt"
    t = trainer(1)
    t.fit(LlamaModule(), loader(samples()))
    t.save_checkpoint(path)
    return path


@pytest.mark.parametrize(
    ("seed", "overrides", "message"),
    [
        (1, {}, r"written with another base model \(in the checkpoint: built from a config"),
        (0, {"quant_type": "fp4"}, r"another quant_type \('nf4' in the checkpoint, 'fp4' now\)"),
        (0, {"lora_alpha": 16, "double_quant": False}, r"another double_quant .* and another lora_alpha"),
    ],
    ids=["other-base-weights", "other-quant-type", "other-settings"],
)
def test_resume_onto_another_base_or_settings_is_refused(saved_run, seed, overrides, message):
    with pytest.raises(CheckpointMismatchError, match=message):
        trainer(2, **overrides).fit(LlamaModule(seed=seed), loader(samples()), ckpt_path=saved_run)


def test_settings_that_do_not_change_the_weights_may_change_on_resume(saved_run):
    module = LlamaModule()
    t = trainer(2, lora_dropout=0.0, quant_storage="float32")
    t.fit(module, loader(samples()), ckpt_path=saved_run)
    assert t.global_step == 2 and len(module.losses) == 1


class FailSavesFrom(pl.Callback):
    """Makes every checkpoint write from step ``step`` on fail halfway (runs before ModelCheckpoint)."""

    def __init__(self, step: int, monkeypatch) -> None:
        self.step, self.monkeypatch = step, monkeypatch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.monkeypatch.setattr(torch, "save", failing_torch_save(torch.save))


def test_save_failure_during_training_keeps_last_good_checkpoint_resumable(tmp_path, monkeypatch):
    saver = ModelCheckpoint(
        dirpath=tmp_path, filename="latest", every_n_train_steps=1, enable_version_counter=False
    )
    t = trainer(3, callbacks=[saver, FailSavesFrom(2, monkeypatch)])
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    with pytest.raises(OSError, match="No space left"):
        t.fit(LlamaModule(), loader(samples()))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["latest.ckpt"]
    assert read_checkpoint(tmp_path / "latest.ckpt")["global_step"] == 1
    resumed = LlamaModule()
    t = trainer(3)
    t.fit(resumed, loader(samples()), ckpt_path=tmp_path / "latest.ckpt")
    assert t.global_step == 3 and len(resumed.losses) == 2


def test_missing_or_truncated_checkpoint_is_named_clearly(saved_run, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(saved_run.read_bytes()[: saved_run.stat().st_size // 2])
    with pytest.raises(
        CheckpointReadError, match=r"truncated.ckpt \(.* bytes\) cannot be read.*truncated or corrupt"
    ):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        trainer(2).fit(LlamaModule(), loader(samples()), ckpt_path=truncated)
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        trainer(2).fit(LlamaModule(), loader(samples()), ckpt_path=tmp_path / "missing.ckpt")
    (tmp_path / "empty.ckpt").touch()
    with pytest.raises(CheckpointReadError, match="is empty"):
        read_checkpoint(tmp_path / "empty.ckpt")
