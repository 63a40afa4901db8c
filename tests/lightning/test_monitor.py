"""EvictionMonitor in real (tiny, CPU) Lightning fits."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import run_script
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.core.eviction.run import METRIC_FIELDS, rank_path
from lightning_paged.lightning.monitor import EvictionMonitor
from lightning_paged.testing import FakeProbe

MIB = 1024 * 1024
GIB = 1024 * MIB
LENGTHS = [8, 12, 40, 10, 16, 48, 9, 11]
LONG = 32


class TinyLM(pl.LightningModule):
    def __init__(self, probe: FakeProbe | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 64)
        self.probe = probe
        self.evicted = 0

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.head(self.embed(ids))
        loss = nn.functional.cross_entropy(logits[mask.bool()], ids[mask.bool()])
        if self.probe is not None and ids.shape[-1] >= LONG:  # a long batch's activations push state out
            self.evicted = 96 * MIB
            self.probe.evict(self.evicted)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        if self.probe is not None and self.evicted:  # the optimizer touches its state: paged back in
            self.probe.evict(-self.evicted)
            self.evicted = 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(lengths: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for n in lengths:
        mask = torch.ones(2, n, dtype=torch.long)
        mask[1, n // 2 :] = 0  # second row half padding
        out.append({"input_ids": torch.randint(0, 64, (2, n)), "attention_mask": mask})
    return out


def fit(
    tmp_path: Path, monitor: EvictionMonitor, model: TinyLM | None = None, **trainer_kwargs
) -> pl.Trainer:
    torch.manual_seed(0)
    loader = DataLoader(batches(LENGTHS), batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(model or TinyLM(), train_dataloaders=loader)
    return trainer


def test_monitor_writes_one_line_per_step_logs_metrics_and_a_summary(tmp_path):
    monitor = EvictionMonitor(long_sequence_threshold=LONG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, monitor)
    reasons = [w for w in caught if "No unified-memory eviction events" in str(w.message)]
    assert len(reasons) == 1 and "not on a CUDA GPU" in str(reasons[0].message)

    log_dir = Path(trainer.log_dir)
    assert monitor.path == log_dir / "eviction_events.jsonl"
    rows = read_jsonl(monitor.path).records
    assert [r["seq_len"] for r in rows] == LENGTHS
    assert [r["tokens"] for r in rows] == [n + n // 2 for n in LENGTHS]
    assert [r["long_sequence"] for r in rows] == [n >= LONG for n in LENGTHS]
    assert [r["step"] for r in rows] == list(range(len(LENGTHS)))
    assert all(r["source"] == "none" and r["evicted_bytes"] is None for r in rows)
    assert all(r["optimizer_step_s"] is not None for r in rows)

    with open(log_dir / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert {"eviction/seq_len", "eviction/step_s", "eviction/long_sequence"} <= set(columns)
    assert "eviction/evicted_bytes" not in columns  # not measured on CPU: not logged as zero

    summary = (log_dir / "eviction_summary.txt").read_text()
    assert "steps                     8" in summary and "long-sequence steps       2" in summary
    assert monitor.summary is not None and monitor.summary.steps == len(LENGTHS)
    assert len(monitor.summary.slowest) == 5 and {s.seq_len for s in monitor.summary.slowest} <= set(LENGTHS)


def test_pressure_source_shows_eviction_on_the_long_steps_only(tmp_path):
    probe = FakeProbe()
    monitor = EvictionMonitor(source="pressure", long_sequence_threshold=LONG)
    monitor.probe = probe
    trainer = fit(tmp_path, monitor, TinyLM(probe))
    rows = read_jsonl(monitor.path).records
    assert [r["evicted_bytes"] for r in rows] == [96 * MIB if n >= LONG else 0 for n in LENGTHS]
    assert [r["paged_in_bytes"] for r in rows] == [96 * MIB if n >= LONG else 0 for n in LENGTHS]
    assert all(r["estimated"] and r["source"] == "pressure" for r in rows)
    assert monitor.summary.evicted_bytes == monitor.summary.evicted_bytes_long == 2 * 96 * MIB
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("eviction/evicted_bytes")]
    assert sorted(float(r["eviction/evicted_bytes"]) for r in logged)[-2:] == [96.0 * MIB] * 2


def test_gradient_accumulation_leaves_optimizer_time_empty_on_accumulating_steps(tmp_path):
    monitor = EvictionMonitor(source="none", log_path=str(tmp_path / "custom" / "ev.jsonl"))
    fit(tmp_path, monitor, accumulate_grad_batches=2)
    rows = read_jsonl(tmp_path / "custom" / "ev.jsonl").records
    assert [r["optimizer_step_s"] is None for r in rows] == [True, False] * (len(LENGTHS) // 2)


def test_settings_are_checked_by_name():
    with pytest.raises(SettingError, match="source must be one of auto, cupti, pressure, none; got 'nvml'"):
        EvictionMonitor(source="nvml")  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="long_sequence_threshold must be a positive integer"):
        EvictionMonitor(long_sequence_threshold=0)


def test_ranks_write_separate_files():
    base = Path("/x/eviction_events.jsonl")
    assert rank_path(base, 0, 1) == base
    assert rank_path(base, 1, 2) == Path("/x/eviction_events.rank1.jsonl")


def test_metric_keys_in_the_docstring_are_the_logged_ones():
    doc = EvictionMonitor.__doc__ or ""
    assert all(f"``eviction/{name}``" in doc for name in METRIC_FIELDS)


def test_monitor_is_configurable_as_a_cli_callback(tmp_path, capsys):
    from lightning.pytorch.cli import LightningCLI

    def args(**init_args):
        callback = {"class_path": "lightning_paged.lightning.monitor.EvictionMonitor", "init_args": init_args}
        return {"trainer": {"accelerator": "cpu", "default_root_dir": str(tmp_path), "callbacks": [callback]}}

    good = args(source="pressure", long_sequence_threshold=2048, seq_len_fn="builtins.len")
    cli = LightningCLI(TinyLM, run=False, args=good, save_config_callback=None)
    monitors = [c for c in cli.trainer.callbacks if isinstance(c, EvictionMonitor)]
    assert len(monitors) == 1
    assert (monitors[0].source, monitors[0].long_sequence_threshold, monitors[0].seq_len_fn) == (
        "pressure",
        2048,
        len,
    )

    with pytest.raises(SystemExit):
        LightningCLI(TinyLM, run=False, args=args(source="nvml"), save_config_callback=None)
    err = capsys.readouterr().err
    assert 'key "source"' in err and "nvml" in err


@pytest.mark.slow
def test_ddp_ranks_record_their_own_files_and_rank_zero_writes_the_summary(tmp_path):
    run_script("monitor_ddp_train.py", tmp_path)
    rank0 = read_jsonl(tmp_path / "eviction_events.rank0.jsonl").records
    rank1 = read_jsonl(tmp_path / "eviction_events.rank1.jsonl").records
    assert {r["rank"] for r in rank0} == {0} and {r["rank"] for r in rank1} == {1}
    assert len(rank0) + len(rank1) == len(LENGTHS)  # the sampler splits the batches between ranks
    assert not (tmp_path / "eviction_events.jsonl").exists()
    summary = (tmp_path / "eviction_summary.txt").read_text()
    assert "rank 0" in summary and "rank 1" in summary


def test_the_summary_says_where_a_causal_lm_step_s_memory_goes(tmp_path):
    from lightning_paged import CausalLMModule, PagedQLoRAStrategy

    config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config |= {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}
    torch.manual_seed(0)
    module = CausalLMModule(model_config=config, loss_chunk_size=16)
    data = []
    for n in (24, 40):
        ids = torch.randint(0, 256, (2, n))
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    monitor = EvictionMonitor(source="none")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        strategy=PagedQLoRAStrategy(compute_dtype="float32", lora_r=4, offload_activations=True),
        logger=False,
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    text = (tmp_path / "eviction_summary.txt").read_text()
    assert "where the memory of the step with the most tokens (80) goes" in text
    assert "logits, 16 tokens at a time (chunked loss)" in text
    assert "checkpointed layer inputs" in text and "host memory (offload_activations)" in text
    assert "Paging can absorb at most the 0 B of paged optimizer state" in text  # CPU: nothing is paged
    assert monitor.summary.memory["loss"] == "chunked" and monitor.summary.memory["vocab_size"] == 259
