"""Resume loses nothing: exact with dropout whatever the validation cadence, metrics and configs kept."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from conftest import SimulatedCrash, crash_at, trainable_weights
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


pytestmark = pytest.mark.usefixtures("private_hash_cache")


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


def make_module(sample: bool) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(
        model_config=dict(MODEL_CONFIG),
        optimizer={"name": "adamw", "lr": 1e-2, "scheduler": "cosine", "warmup_steps": 2},
        sample_prompt="Uppercase: yak" if sample else None,
        sample_max_new_tokens=3,
    )


def make_trainer(steps: int, val_every: float, callbacks: list, **overrides) -> pl.Trainer:
    strategy = PagedQLoRAStrategy(
        lora_r=4, lora_dropout=0.1, compute_dtype="float32", gradient_checkpointing=False
    )
    settings: dict = dict(
        accelerator="cpu",
        strategy=strategy,
        max_steps=steps,
        val_check_interval=val_every,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(overrides)
    return pl.Trainer(**settings)


@pytest.mark.parametrize(
    ("val_every", "save_every", "crash_after", "sample", "packing"),
    [(3, 3, 3, True, False), (2, 3, 3, False, False), (3, 3, 3, True, True)],
    ids=["validation-and-sample-at-the-checkpoint", "validation-cadence-not-dividing", "packed"],
)
def test_resume_with_dropout_is_exact_whatever_the_validation_cadence(
    tmp_path, data_file, val_every, save_every, crash_after, sample, packing
):
    """12 training samples in batches of 4: 3 batches an epoch. Dropout on; validation draws from
    the global generator when its loader starts (a loader without its own generator)."""
    steps = 7

    def data() -> InstructionDataModule:
        if packing:  # whole samples packed into rows of at most 160 tokens, one row a batch
            return InstructionDataModule(
                str(data_file), max_length=160, batch_size=1, val_split=8, packing=True
            )
        return InstructionDataModule(str(data_file), max_length=80, batch_size=4, val_split=8)

    straight = Record()
    first_module = make_module(sample)
    make_trainer(steps, val_every, [straight]).fit(first_module, data())

    crashed = Record()
    saver = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=save_every, save_top_k=-1
    )
    with pytest.raises(SimulatedCrash):
        make_trainer(steps, val_every, [crashed, saver, crash_at(crash_after)]).fit(
            make_module(sample), data()
        )
    assert crashed.losses == straight.losses[:crash_after]

    resumed = Record()
    module = make_module(sample)
    make_trainer(steps, val_every, [resumed]).fit(
        module, data(), ckpt_path=tmp_path / f"step={crash_after}.ckpt"
    )
    assert crashed.losses + resumed.losses == straight.losses  # bit for bit
    for name, value in trainable_weights(first_module).items():
        assert torch.equal(trainable_weights(module)[name], value), name


# --- whenever a checkpoint was written in its step, the resumed run numbers and trains as one run ------


def _rows(log_dir) -> tuple[list[tuple[int, str, str]], list[int]]:
    """(step, epoch, loss) of every train/loss row, and the steps of the val/loss rows."""
    rows = _csv_rows(log_dir / "metrics.csv")
    train = [(int(r["step"]), r["epoch"], r["train/loss"]) for r in rows if r.get("train/loss")]
    return train, [int(r["step"]) for r in rows if r.get("val/loss")]


_UNINTERRUPTED: dict[tuple, tuple] = {}
"""Rows and adapter weights of the uninterrupted runs, by (steps, validation cadence)."""


@pytest.mark.parametrize(
    ("first", "last", "val_every", "saver"),
    [
        (7, 10, 3, {"every_n_train_steps": 100}),
        (7, 10, 3, {"monitor": "val/loss", "save_top_k": -1}),
        (8, 10, 1.0, {}),
        (8, 10, 1.0, {"every_n_train_steps": 100}),
    ],
    ids=[
        "on-train-end-mid-epoch-after-validation",
        "on-validation-end",
        "on-train-epoch-end",
        "on-train-end-at-an-epoch-end",
    ],
)
def test_a_resume_logs_every_step_once_numbered_and_trained_as_one_run(
    tmp_path, data_file, first, last, val_every, saver
):
    """4 training batches an epoch; validation every 3 batches of an epoch runs at steps 3, 7 and 10.
    ``last.ckpt`` is written at the moment of each case, not at ``on_train_batch_end``: Lightning
    alone resumes those one logger step too far, and after an epoch end or a mid-epoch stop with the
    data of the following epoch (the issue's case: stopped at ``max_steps`` after validation)."""
    from lightning_paged.lightning.csv_logger import ResumableCSVLogger

    def fit(directory, steps: int, callbacks: list, ckpt_path=None) -> CausalLMModule:
        torch.manual_seed(0)  # a constant learning rate: the schedule must not depend on max_steps
        module = CausalLMModule(model_config=dict(MODEL_CONFIG), optimizer={"name": "adamw", "lr": 1e-2})
        logger = ResumableCSVLogger(directory, name="logs", version="v")
        data = InstructionDataModule(str(data_file), max_length=80, batch_size=4, val_split=8)
        trainer = make_trainer(steps, val_every, callbacks, logger=logger, log_every_n_steps=1)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module

    key = (last, val_every)  # the uninterrupted run is the same for cases that share these
    if key not in _UNINTERRUPTED:
        module = fit(tmp_path / "straight", last, [])
        _UNINTERRUPTED[key] = (_rows(tmp_path / "straight" / "logs" / "v"), trainable_weights(module))
    expected, weights = _UNINTERRUPTED[key]
    run = tmp_path / "run"

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, **saver)

    fit(run, first, [checkpoint()])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == first
    resumed = fit(run, last, [checkpoint()], ckpt_path=run / "checkpoints" / "last.ckpt")

    got = _rows(run / "logs" / "v")
    assert [step for step, _, _ in got[0]] == list(range(last))
    assert got == expected  # steps, epochs, losses bit for bit, validation steps
    for name, value in weights.items():
        assert torch.equal(trainable_weights(resumed)[name], value), name


# --- metrics, event log and checkpoint files across resumes ---------------------------------------


def _csv_rows(path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_resumes_keep_every_metric_once_remove_partials_and_make_no_duplicates(tmp_path, data_file):
    """Crash after step 4, resume from the older step 2 and crash after step 5, resume from last."""
    from lightning_paged.core.eviction.log import read_jsonl
    from lightning_paged.core.plot import load_run
    from lightning_paged.lightning.csv_logger import ResumableCSVLogger
    from lightning_paged.lightning.monitor import EvictionMonitor

    checkpoints, logs = tmp_path / "checkpoints", tmp_path / "logs" / "latest"

    def fit(crash_after: int | None, ckpt_path=None) -> None:
        saver = ModelCheckpoint(
            dirpath=checkpoints, filename="{step}", every_n_train_steps=2, save_top_k=-1, save_last=True
        )
        callbacks = [EvictionMonitor(source="none", log_metrics=False), saver]
        callbacks += [crash_at(crash_after)] if crash_after else []
        logger = ResumableCSVLogger(tmp_path, name="logs", version="latest")
        trainer = make_trainer(6, 2, callbacks, logger=logger, log_every_n_steps=1)
        data = InstructionDataModule(str(data_file), max_length=80, batch_size=4, val_split=8)
        if crash_after:
            with pytest.raises(SimulatedCrash):
                trainer.fit(make_module(False), data, ckpt_path=ckpt_path)
        else:
            trainer.fit(make_module(False), data, ckpt_path=ckpt_path)

    fit(crash_after=4)
    assert sorted(int(r["step"]) for r in _csv_rows(logs / "metrics.csv") if r["train/loss"]) == [0, 1, 2, 3]
    with open(logs / "metrics.csv", "a") as f:
        f.write("0,3,4.1")  # a line the killed run did not finish
    ours = checkpoints / ".last.ckpt.a1b2c3d4.partial"
    ours.write_bytes(b"half a checkpoint")
    users = [
        checkpoints / name for name in ("notes.partial", ".notes.partial", ".x.ckpt.a1b2c3d4.partial.bak")
    ]
    for path in users:
        path.write_text("a user's file")

    fit(crash_after=5, ckpt_path=checkpoints / "step=2.ckpt")
    assert not ours.exists() and all(path.exists() for path in users)
    fit(crash_after=None, ckpt_path="last")

    rows = _csv_rows(logs / "metrics.csv")
    train = [int(r["step"]) for r in rows if r["train/loss"]]
    val = [int(r["step"]) for r in rows if r["val/loss"]]
    assert train == list(range(6))  # every step once, in order, from step 0
    assert val == [1, 3, 5]
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == [
        "last.ckpt",
        "step=2.ckpt",
        "step=4.ckpt",
        "step=6.ckpt",
    ]  # a resumed run that saves a step again replaces its file: no step=4-v1.ckpt
    log = logs / "eviction_events.jsonl"
    assert len({r["run"] for r in read_jsonl(log).records}) == 1  # one run id across the resumes
    records, _ = load_run(log)
    assert [r.step for r in records] == list(range(6))  # global steps: one continuous curve


def test_an_optimizer_setting_changed_on_resume_takes_effect(tmp_path, data_file):
    def module(lr: float) -> CausalLMModule:
        torch.manual_seed(0)
        return CausalLMModule(model_config=dict(MODEL_CONFIG), optimizer={"name": "adamw", "lr": lr})

    def data() -> InstructionDataModule:
        return InstructionDataModule(str(data_file), max_length=80, batch_size=4, val_split=0)

    first = make_trainer(2, 1.0, [])
    first.fit(module(1e-2), data())
    first.save_checkpoint(tmp_path / "a.ckpt")
    resumed = make_trainer(3, 1.0, [])
    resumed.fit(module(1e-3), data(), ckpt_path=tmp_path / "a.ckpt")
    (group,) = resumed.optimizers[0].param_groups
    assert group["lr"] == group["initial_lr"] == 1e-3  # restoring alone would have kept 1e-2
    assert resumed.lr_scheduler_configs[0].scheduler.base_lrs == [1e-3]


def test_last_is_the_newest_complete_checkpoint(tmp_path):
    from lightning_paged.commands.resume_check import newest_checkpoint
    from lightning_paged.core.atomic import save_checkpoint_file

    save_checkpoint_file({"global_step": 2}, tmp_path / "last.ckpt")  # killed before last.ckpt moved on
    save_checkpoint_file({"global_step": 2}, tmp_path / "step=2.ckpt")
    save_checkpoint_file({"global_step": 4}, tmp_path / "step=4.ckpt")
    (tmp_path / "step=6.ckpt").write_bytes(b"PK\x03\x04 truncated")  # a copy that was cut off
    with pytest.warns(UserWarning, match=r"step=6.ckpt .* cannot be read"):
        assert newest_checkpoint([tmp_path, tmp_path / "missing"]) == tmp_path / "step=4.ckpt"
    save_checkpoint_file({"global_step": 4}, tmp_path / "last.ckpt")
    assert newest_checkpoint([tmp_path]) == tmp_path / "last.ckpt"  # a tie goes to last.ckpt


def test_ckpt_path_last_in_a_lightning_cli_of_ones_own(tmp_path, data_file, monkeypatch):
    """A LightningCLI with Lightning's default, numbered logger versions: every run writes to a new
    version_N, where Lightning's own ckpt_path="last" finds nothing. The exported function finds the
    newest checkpoint of the earlier versions."""
    import sys

    from lightning.pytorch.cli import LightningCLI

    from lightning_paged import last_checkpoint

    class MyCLI(LightningCLI):
        def before_fit(self):
            if self.config_init[self.subcommand].get("ckpt_path") == "last":
                self.config_init[self.subcommand]["ckpt_path"] = last_checkpoint(self.trainer)

    def run(steps: int, *extra: str) -> MyCLI:
        args = [
            "fit",
            "--trainer.strategy=paged_qlora",
            "--trainer.accelerator=cpu",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.save_last=true",
            f"--model.model_config={json.dumps(MODEL_CONFIG)}",
            "--model.optimizer={'name': 'adamw', 'lr': 0.01}",
            f"--data.data_path={data_file}",
            "--data.max_length=80",
            "--data.batch_size=4",
            *extra,
        ]
        return MyCLI(
            CausalLMModule,
            InstructionDataModule,
            args=args,
            save_config_callback=None,
            auto_configure_optimizers=False,
        )

    monkeypatch.setattr(sys, "argv", ["my_cli.py"])
    run(2)
    resumed = run(3, "--ckpt_path", "last")
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert resumed.trainer.ckpt_path == str(first)
    assert resumed.trainer.global_step == 3  # two steps restored, one trained
    assert (tmp_path / "lightning_logs" / "version_1").is_dir()
