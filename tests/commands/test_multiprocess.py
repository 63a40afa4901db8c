"""``lightning-paged fit`` on two CPU processes (gloo), through the command: DDP, FSDP and one process.

Three launches shared by every test here: ``paged_qlora_ddp`` and ``paged_qlora_fsdp`` on two
processes of 8 sequences each, ``paged_qlora`` on one process of 16, over the same global batches
(the data module's ``ResumableSampler`` gives rank r the r-th of every two samples of one seeded
order). All read the same model directory, validate and generate the sample prompt twice, and write
``last.ckpt``; float32 compute, no dropout, a 32-bit optimizer, the model's own loss (FSDP runs it
anyway, the chunked loss standing aside for a sharded model: the comparisons are of the sharding, not
of two loss computations; ``tests/lightning/test_packing.py`` runs the chunked loss on two processes). Each launch runs with a timeout and
its whole process group is killed should it hang.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, child_env

TINY = ROOT / "examples" / "tiny_cpu.yaml"
STEPS = 12
LAUNCHES = {
    "ddp": ("lightning_paged.PagedQLoRADDPStrategy", 2, 8),
    "fsdp": ("lightning_paged.PagedQLoRAFSDPStrategy", 2, 8),
    "single": ("lightning_paged.PagedQLoRAStrategy", 1, 16),
}
TIMEOUT = 600


def _model_directory(path: Path) -> Path:
    """The example's tiny Llama, saved as a model directory (float32) that every launch reads."""
    from lightning_paged import CausalLMModule

    config = yaml.safe_load(TINY.read_text())["model"]["init_args"]["model_config"]
    config["max_position_embeddings"] = 128
    torch.manual_seed(0)
    CausalLMModule(model_config=config).model.save_pretrained(path)
    return path


def _start(run_dir: Path, model: Path, strategy: str, devices: int, batch_size: int) -> subprocess.Popen:
    """``python -m lightning_paged fit ...`` in its own process group (Lightning starts rank 1 inside it)."""
    strategy_args = {"compute_dtype": "float32", "lora_dropout": "0.0", "gradient_checkpointing": "false"}
    args = [
        "fit",
        "--config",
        str(TINY),
        "--vars.run_dir",
        str(run_dir),
        "--vars.max_length",
        "128",
        "--trainer.devices",
        str(devices),
        "--trainer.strategy",
        strategy,
        *[a for k, v in strategy_args.items() for a in (f"--trainer.strategy.init_args.{k}", v)],
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.val_check_interval",
        str(STEPS // 2),
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--model.init_args.model_config",
        "null",
        "--model.init_args.model_name_or_path",
        str(model),
        "--model.init_args.optimizer.name",
        "paged_adamw_32bit",
        "--model.init_args.optimizer.warmup_steps",
        "0",
        "--model.init_args.sample_max_new_tokens",
        "4",
        "--model.init_args.loss",
        "standard",
        "--data.init_args.batch_size",
        str(batch_size),
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "lightning_paged", *args],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen, name: str, deadline: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); the process group is killed if it runs past ``deadline``."""
    try:
        out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the {name} run hung for {TIMEOUT} s:\n{err[-3000:]}")
    return process.returncode, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("multiprocess")
    model = _model_directory(root / "model")
    deadline = time.monotonic() + TIMEOUT
    started = {name: _start(root / name, model, *launch) for name, launch in LAUNCHES.items()}  # side by side
    results = {}
    for name, process in started.items():
        code, out, err = _finish(process, name, deadline)
        results[name] = {"code": code, "out": out, "err": err, "dir": root / name}
    return results


def _losses(run: dict) -> list[float]:
    with open(run["dir"] / "logs" / "latest" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(STEPS))
    return [float(r["train/loss"]) for r in rows]


def _adapters(run: dict) -> dict[str, torch.Tensor]:
    return torch.load(run["dir"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b) and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_the_run_exits_0_with_one_summary_and_a_sample_per_validation(runs, name):
    run = runs[name]
    assert run["code"] == 0, run["err"][-4000:]
    # the end-of-run summary comes from rank zero alone, after every rank read the log directory
    assert run["out"].count("Run finished.") == 1
    assert run["out"].count("  checkpoint:") == 1 and "last.ckpt" in run["out"]
    # every rank generated the sample (FSDP needs them all), rank zero reported it, at each validation
    assert run["err"].count("Sample at step") == 2
    with open(run["dir"] / "logs" / "latest" / "metrics.csv") as f:
        assert sum(1 for r in csv.DictReader(f) if r.get("val/loss")) == 2


@pytest.mark.slow
def test_fsdp_trains_exactly_like_ddp_over_the_same_batches(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert ddp["code"] == fsdp["code"] == 0
    # the token-weighted rescale reaches FSDP's sharded gradients: without it FSDP steps on sums over
    # tokens and ends about 0.01 away after 12 steps
    assert _losses(fsdp) == pytest.approx(_losses(ddp), abs=1e-5)
    assert _max_difference(_adapters(fsdp), _adapters(ddp)) < 1e-5
    assert any(float(t.abs().sum()) > 0 for k, t in _adapters(fsdp).items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_two_processes_train_like_one_over_the_same_global_batches(runs):
    ddp, single = runs["ddp"], runs["single"]
    assert ddp["code"] == single["code"] == 0
    # train/loss is the mean over every rank's tokens, not rank zero's half
    assert _losses(ddp) == pytest.approx(_losses(single), abs=1e-5)
    # the same adapters at the start (seed_everything's seed on one process as on two: the adapters of
    # the two runs were 0.32 apart before); what is left is float32 summation order, one sum over 16
    # sequences against two sums over 8 and an all-reduce, which Adam's per-element scaling magnifies
    assert _max_difference(_adapters(ddp), _adapters(single)) < 1e-3


@pytest.mark.slow
def test_fsdp_loads_the_directory_sharded_block_by_block(runs):
    err = runs["fsdp"]["err"]
    assert "weights streamed from" in err and "quantized while loading" in err
    line = next(line for line in err.splitlines() if line.startswith("FSDP: "))
    assert "2 LlamaDecoderLayer blocks and the root sharded over 2 ranks" in line
    assert "this rank holds 18.0 KiB of 36.0 KiB packed 4-bit weights" in line
