"""Two-process DDP on CPU (gloo): the adapters stay equal across ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


@pytest.mark.slow
def test_two_process_ddp_keeps_lora_weights_equal(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent)}
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # every rank quantized rank zero's weights, so the 4-bit data and its constants agree
    torch.testing.assert_close(ranks[0]["packed"], ranks[1]["packed"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["absmax"], ranks[1]["absmax"], rtol=0, atol=0)
    lora0, lora1 = ranks[0]["lora"], ranks[1]["lora"]
    assert set(lora0) == set(lora1) and lora0
    for name in lora0:
        torch.testing.assert_close(lora0[name], lora1[name], rtol=0, atol=0, msg=name)
    assert any(t.abs().sum() > 0 for n, t in lora0.items() if "lora_B" in n)  # it trained
