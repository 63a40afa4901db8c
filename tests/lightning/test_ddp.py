"""Two-process DDP on CPU (gloo): the adapters stay equal across ranks."""

from __future__ import annotations

import pytest
from conftest import assert_ranks_agree, run_script


@pytest.mark.slow
def test_two_process_ddp_keeps_lora_weights_equal(tmp_path):
    run_script("ddp_train.py", tmp_path)
    assert_ranks_agree(tmp_path)
