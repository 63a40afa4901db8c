"""``lightning-paged plan``: the fit config in, the plan out (text or JSON), bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_paged.commands.main import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny_cpu.yaml")
LLAMA_7B = str(ROOT / "examples" / "llama_7b_1gpu.yaml")


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_7b_example_plans_as_shipped_without_weights(capsys):
    # The search is capped at the planned length: the command's full search is bench/plan_accuracy.py's.
    data = plan_json(capsys, "--config", LLAMA_7B, "--device-memory", "24GiB", "--max-seq-len", "2048")
    assert data["model"] == "llama (32 blocks, hidden 4096)"
    assert (data["batch_size"], data["seq_len"], data["device_memory"]) == (4, 2048, 24 << 30)
    # Llama 3.1 8B: 6.98B parameters in 4-bit layers at half a byte each, and a 128,256 x 4,096 embedding
    # and head in bfloat16.
    assert data["components"]["weights_4bit"] == 3_489_660_928
    assert data["components"]["weights_other"] >= 2 * 128_256 * 4_096 * 2
    assert data["fits"] is True and data["longest_seq_len"] == 2048
    assert (
        data["by_seq_len"][0]["seq_len"] == 2048 and data["peak_bytes"] == data["by_seq_len"][0]["peak_bytes"]
    )


def test_overrides_and_extra_lengths_reach_the_plan(capsys, tmp_path):
    data = plan_json(
        capsys,
        "--config",
        TINY,
        "--data.init_args.batch_size",
        "2",
        "--trainer.strategy.init_args.lora_r",
        "8",
        "--device-memory",
        "2GiB",
        "--seq-len",
        "64",
        "128",
    )
    assert data["batch_size"] == 2 and data["seq_len"] == 256
    assert [p["seq_len"] for p in data["by_seq_len"]] == [64, 128, 256]
    assert "LoRA r=8" in " ".join(data["notes"])
    assert data["longest_seq_len"] == data["max_seq_len"] == 256  # the tiny model's limit


def test_text_output_names_the_components_and_the_verdict(capsys):
    assert main(["plan", "--config", TINY, "--device-memory", "600MiB", "--max-seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "4-bit weights (packed)" in out and "CUDA context" in out and "predicted peak" in out
    assert "fits" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU answers for --device-memory")
def test_without_a_gpu_the_device_memory_is_required(capsys):
    assert main(["plan", "--config", TINY]) == 2
    err = capsys.readouterr().err
    assert "--device-memory is required: no GPU is visible here" in err and "24GiB" in err


def test_bad_inputs_are_one_line_naming_the_setting(capsys, tmp_path):
    cases = [
        (["--trainer.strategy", "auto"], "trainer.strategy is not a QLoRA strategy"),
        (
            ["--model.init_args.model_config", "null", "--model.init_args.model_name_or_path", str(tmp_path)],
            "model.init_args.model_name_or_path is neither a model directory with config.json",
        ),
        (["--device-memory", "lots"], "--device-memory must be a size such as"),
    ]
    for extra, message in cases:
        args = ["plan", "--config", TINY, *extra]
        if "--device-memory" not in extra:
            args += ["--device-memory", "1GiB"]
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) <= 2
