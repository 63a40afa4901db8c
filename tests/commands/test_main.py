"""The lightning-paged command: every example loads, interpolation, the main job (bad input: test_bad_inputs)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
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
