"""Two-process DDP on CPU (gloo): the adapters stay equal across ranks; each rank loads a directory model itself."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_ranks_agree, run_script, tiny_llama_config


@pytest.mark.slow
def test_two_process_ddp_keeps_lora_weights_equal(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(4)
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model", max_shard_size="100KB")  # the script's second fit loads it
    run_script("ddp_train.py", tmp_path)
    assert_ranks_agree(tmp_path)

    # the directory model: every rank read all the files itself and quantized the same bytes
    loaded = [torch.load(tmp_path / f"dir_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert loaded[0]["tensors_read"] == loaded[1]["tensors_read"] == 21
    assert "quantized while loading" in loaded[0]["summary"]
    torch.testing.assert_close(loaded[0]["packed"], loaded[1]["packed"], rtol=0, atol=0)
    torch.testing.assert_close(loaded[0]["absmax"], loaded[1]["absmax"], rtol=0, atol=0)
    for name in loaded[0]["lora"]:
        torch.testing.assert_close(loaded[0]["lora"][name], loaded[1]["lora"][name], rtol=0, atol=0, msg=name)
