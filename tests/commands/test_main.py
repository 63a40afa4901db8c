"""The lightning-paged command: every example loads, interpolation, the main job (bad input: test_bad_inputs)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_paged.commands.main import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
TINY = str(ROOT / "examples" / "tiny_cpu.yaml")


def print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads_and_starts_with_its_command(capsys, path):
    header = path.read_text().splitlines()[:4]
    assert header[0].startswith("#")
    assert any(f"lightning-paged fit --config examples/{path.name}" in line for line in header)
    config = print_config(capsys, "--config", str(path))
    assert config["model"]["init_args"]["optimizer"]["name"]
    assert "paged" in config["trainer"]["strategy"]["class_path"].lower()


def test_interpolation_follows_command_line_overrides(capsys):
    config = print_config(capsys, "--config", TINY, "--vars.run_dir", "elsewhere", "--vars.max_length", "64")
    assert config["trainer"]["default_root_dir"] == "elsewhere"
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "elsewhere"
    assert config["data"]["init_args"]["max_length"] == 64
    assert config["model"]["init_args"]["model_config"]["max_position_embeddings"] == 64


def test_automatic_optimizer_is_off(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--optimizer " not in out and "--lr_scheduler" not in out
    assert "--vars" in out


def run_cli(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_paged", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def short_run_args(run_dir: Path, steps: int = 30) -> list[str]:
    return [
        "fit",
        "--config",
        TINY,
        "--vars.run_dir",
        str(run_dir),
        "--vars.max_length",
        "192",
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.log_every_n_steps",
        "5",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.dirpath",
        str(run_dir / "ckpt"),
    ]


@pytest.mark.slow
def test_main_example_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(tmp_path, *short_run_args(run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Run finished." in result.stdout
    # the resolved config sits beside the logs, with interpolations resolved
    saved = yaml.safe_load((run_dir / "logs" / "latest" / "config.yaml").read_text())
    assert saved["trainer"]["default_root_dir"] == str(run_dir)
    with open(run_dir / "logs" / "latest" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 4
    assert losses[-1] < losses[0] - 0.5  # it learns
    events = (run_dir / "logs" / "latest" / "eviction_events.jsonl").read_text().splitlines()
    assert len(events) == 30 and all(json.loads(line)["seq_len"] > 0 for line in events)
    assert list((run_dir / "ckpt").glob("*.ckpt"))
    # a re-run overwrites the saved config instead of refusing
    again = run_cli(
        tmp_path, *short_run_args(run_dir, steps=2), "--model.init_args.optimizer.warmup_steps", "0"
    )
    assert again.returncode == 0, again.stderr[-4000:]


def test_report_and_export_are_subcommands():
    for command in ("report", "export"):
        result = subprocess.run(
            [sys.executable, "-m", "lightning_paged", command, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "usage" in result.stdout.lower()


def test_ddp_spawn_warns_in_the_launching_process(tmp_path, monkeypatch):
    """Under ddp_spawn the module's hooks run in the spawned processes only. The command warns before
    it launches them, so the warning reaches a notebook too, and the flag that stops the spawned
    process from warning again travels with the module. Lightning's launcher is replaced by one that
    records what it would send: no process is started."""
    import warnings

    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launched = {}

    def launch(self, function, *args, trainer=None, **kwargs):
        launched["warned"] = [str(w.message) for w in caught if "not a QLoRA strategy" in str(w.message)]
        launched["flag"] = trainer.strategy.lightning_module._warned_unless_qlora

    monkeypatch.setattr(_MultiProcessingLauncher, "launch", launch)
    monkeypatch.setattr(sys, "argv", ["lightning-paged"])
    args = [*quick_run_args(tmp_path / "run", steps=1), "--trainer.strategy", "ddp_spawn"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args) == 0
    assert len(launched["warned"]) == 1, launched
    assert "start_method='spawn'" in launched["warned"][0] and "paged_qlora_ddp" in launched["warned"][0]
    assert launched["flag"] is True


def test_a_model_directory_of_bin_files_trains_through_the_command(tmp_path, caplog):
    """A directory with only PyTorch .bin shards (zip format) streams into 4-bit like safetensors."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from lightning_paged.testing import tiny_llama_config

    torch.manual_seed(0)
    saved = tmp_path / "safetensors"
    LlamaForCausalLM(tiny_llama_config(vocab_size=259)).save_pretrained(saved, max_shard_size="100KB")
    model = tmp_path / "bin-model"
    model.mkdir()
    (model / "config.json").write_text((saved / "config.json").read_text())
    weight_map = {}
    for i, shard in enumerate(sorted(saved.glob("*.safetensors")), start=1):
        tensors = load_file(shard)
        torch.save(tensors, model / f"pytorch_model-{i:05d}.bin")
        weight_map.update(dict.fromkeys(tensors, f"pytorch_model-{i:05d}.bin"))
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    args = [
        *quick_run_args(tmp_path / "run", steps=1),
        "--model.init_args.model_config",
        "null",
        "--model.init_args.model_name_or_path",
        str(model),
    ]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert (
        f"weights streamed from {model} ({len(weight_map and set(weight_map.values()))} files" in caplog.text
    )
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --- resume: a kill during a checkpoint write, then resume with --ckpt_path last --------------------

SLOW_CHECKPOINTS = ROOT / "tests" / "scripts" / "slow_checkpoint_cli.py"


def quick_run_args(run_dir: Path, steps: int = 2, progress_bar: str = "false") -> list[str]:
    return [
        "fit",
        "--config",
        TINY,
        "--vars.run_dir",
        str(run_dir),
        "--vars.max_length",
        "96",
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.enable_progress_bar",
        progress_bar,
        "--data.init_args.batch_size",
        "2",
        "--model.init_args.optimizer.warmup_steps",
        "0",
    ]


def resume_run_args(run_dir: Path, steps: int = 6) -> list[str]:
    """Dropout on, validation (with a generated sample) at every checkpoint step, every step logged."""
    return [
        *quick_run_args(run_dir, steps),
        "--trainer.val_check_interval",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.strategy.init_args.lora_dropout",
        "0.1",
        "--trainer.callbacks.every_n_train_steps",
        "2",
        "--trainer.callbacks.save_top_k",
        "-1",
        "--model.init_args.optimizer.warmup_steps",
        "1",
        "--model.init_args.sample_max_new_tokens",
        "4",
    ]


def _slow_cli(*args: str, slow: bool = True, **kwargs) -> subprocess.Popen:
    """The command; ``slow``: with checkpoint writes slowed down so that a test can kill one mid-write."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(SLOW_CHECKPOINTS)] if slow else ["-m", "lightning_paged"]
    return subprocess.Popen(
        [sys.executable, *command, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-4000:]
    return out


def train_losses(run_dir: Path) -> dict[int, str]:
    """The train/loss column by step; each step must appear once."""
    with open(run_dir / "logs" / "latest" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), steps
    return {int(r["step"]): r["train/loss"] for r in rows}


def adapter_weights(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_last_is_bit_identical(tmp_path):
    """Killed while last.ckpt of step 4 is being written (step=4.ckpt is complete, last.ckpt still
    holds step 2): --ckpt_path last resumes from step 4, and the run ends as the uninterrupted one."""
    import torch

    reference, run = tmp_path / "reference", tmp_path / "run"
    checkpoints = run / "checkpoints"
    # Only the run that is killed needs slow writes; the reference and the resume write at full speed.
    processes = [_slow_cli(*resume_run_args(reference), slow=False), _slow_cli(*resume_run_args(run))]
    straight, killed = processes
    try:
        deadline = time.monotonic() + 400
        partial = None
        while partial is None and time.monotonic() < deadline and killed.poll() is None:
            if (checkpoints / "epoch=0-step=4.ckpt").exists():
                partial = next(
                    (p for p in checkpoints.glob(".last.ckpt.*.partial") if p.stat().st_size), None
                )
            time.sleep(0.005)
        if partial is not None:
            os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
        assert partial is not None, killed.communicate()[0][-4000:]
        assert partial.exists()  # the kill left its temporary file behind
        assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
        # Step 4's row (logger step 3) was written before its checkpoints, so the kill kept it.
        assert sorted(train_losses(run)) == [0, 1, 2, 3]

        resumed = _slow_cli(*resume_run_args(run), "--ckpt_path", "last", slow=False)
        processes.append(resumed)
        out = _finish(resumed)
        _finish(straight)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert f"Resuming from {checkpoints / 'epoch=0-step=4.ckpt'} (step 4)" in out
    assert not list(checkpoints.glob("*.partial"))  # the kill's leftover is gone
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt",
        "epoch=0-step=4.ckpt",
        "epoch=0-step=6.ckpt",
        "last.ckpt",
    ]
    expected = adapter_weights(reference / "checkpoints" / "last.ckpt")
    resumed_weights = adapter_weights(checkpoints / "last.ckpt")
    assert expected.keys() == resumed_weights.keys()
    assert all(torch.equal(expected[k], resumed_weights[k]) for k in expected)  # bit for bit
    assert train_losses(run) == train_losses(reference)  # every step once, the same values
    events = [json.loads(line) for line in (run / "logs" / "latest" / "eviction_events.jsonl").open()]
    assert [e["step"] for e in events] == list(range(6))  # the killed step's record was written before
    assert len({e["run"] for e in events}) == 1


@pytest.mark.slow
def test_a_kill_inside_a_checkpoint_save_keeps_the_step_row_and_the_resume_logs_each_step_once(tmp_path):
    """SIGKILL inside the save of step 4's checkpoint (from a callback's on_save_checkpoint): the
    row of step 4 (logger step 3) is already on disk; the resume from step 2 logs steps 2 and 3
    again, replacing the rows, with the same values, and continues to step 6."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests" / "scripts")])
    args = [sys.executable, "-m", "lightning_paged", *resume_run_args(run)]
    kill = ["--trainer.callbacks+=kill_in_checkpoint.KillWhileSaving", "--trainer.callbacks.step", "4"]
    killed = subprocess.run([*args, *kill], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    before = train_losses(run)
    assert sorted(before) == [0, 1, 2, 3]  # the killed step's row is there

    resumed = subprocess.run(
        [*args, "--ckpt_path", "last"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = train_losses(run)  # asserts each step once
    assert sorted(after) == list(range(6))
    assert {step: after[step] for step in before} == before  # an exact resume logs the same values


# --- resume: what is checked before anything is written ----------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    assert main(quick_run_args(run_dir)) == 0
    return run_dir


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def refusal(capsys, *args: str) -> str:
    """The error of a command that must fail: raised, or printed with a non-zero exit status."""
    try:
        code = main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    except Exception as err:
        return str(err)
    assert code not in (0, None)
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        (
            "fit",
            ["--trainer.strategy.init_args.lora_r", "8"],
            r"--trainer.strategy.init_args.lora_r \(16 in the checkpoint, 8 now\)",
        ),
        ("fit", ["--seed_everything", "1"], r"another base model .* seed_everything"),
        (
            "fit",
            ["--model.init_args.optimizer.name", "adamw"],
            r"may not change --model.init_args.optimizer.name \('paged_adamw_8bit' in the checkpoint, 'adamw' now\)",
        ),
        (
            "fit",
            ["--ckpt_path", "{run}/checkpoints/lats.ckpt"],
            r"ckpt_path does not exist; .* holds .*last.ckpt",
        ),
        ("fit", ["--ckpt_path", "{truncated}"], r"truncated.ckpt \(.* bytes\) cannot be read"),
        ("validate", ["--trainer.strategy.init_args.lora_r", "8"], r"lora_r \(16 in the checkpoint, 8 now\)"),
    ],
    ids=["other-rank", "other-seed", "other-optimizer", "mistyped-path", "truncated", "validate-other-rank"],
)
def test_a_refused_resume_leaves_every_file_of_the_run_as_it_was(
    capsys, quick_run, tmp_path, command, extra, message
):
    import re

    truncated = tmp_path / "truncated.ckpt"
    last = (quick_run / "checkpoints" / "last.ckpt").read_bytes()
    truncated.write_bytes(last[: len(last) // 2])
    before = run_files(quick_run)
    args = quick_run_args(quick_run, steps=4)
    args[0] = command
    if command == "validate":
        args = [a for a in args if a != "--trainer.max_steps" and a != "4"]
    extra = [e.format(run=quick_run, truncated=truncated) for e in extra]
    ckpt = [] if "--ckpt_path" in extra else ["--ckpt_path", str(quick_run / "checkpoints" / "last.ckpt")]
    err = refusal(capsys, *args, *ckpt, *extra)
    assert re.search(message, err), err
    assert run_files(quick_run) == before  # config.yaml, metrics.csv, checkpoints: byte for byte


def test_an_allowed_override_on_resume_applies_and_the_progress_bar_flag_is_honoured(
    caplog, quick_run, tmp_path
):
    import shutil

    from lightning.pytorch.callbacks import RichProgressBar

    from lightning_paged.commands.cli import cli_main

    run_dir = tmp_path / "run"
    shutil.copytree(quick_run, run_dir)
    args = [
        *quick_run_args(run_dir, steps=3),
        "--ckpt_path",
        "last",
        "--model.init_args.optimizer.lr",
        "0.005",
    ]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert (
        "changed settings: --model.init_args.optimizer.lr (0.01 in the checkpoint, 0.005 now)" in caplog.text
    )
    saved = yaml.safe_load((run_dir / "logs" / "latest" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["optimizer"]["lr"] == 0.005
    with open(run_dir / "logs" / "latest" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")] == [0, 1, 2]
    report = run_dir / "logs" / "latest" / "eviction_report.png"
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~umask  # like every other output

    without = cli_main(quick_run_args(tmp_path / "other")[1:], run=False)
    assert without.trainer.progress_bar_callback is None
    with_bar = cli_main(quick_run_args(tmp_path / "other", progress_bar="true")[1:], run=False)
    assert isinstance(with_bar.trainer.progress_bar_callback, RichProgressBar)
