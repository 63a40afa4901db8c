"""The sharded load and the optimizer on shards, on 2 and 5 CPU processes (gloo), through the core.

Two launches of ``tests/scripts/fsdp_shards.py``, shared by the tests here: world size 2, then world
size 5, where a LoRA matrix of rank 8 (8 rows, cut by ``torch.chunk`` into 2, 2, 2, 2) leaves rank 4
with nothing of it. The model is a tiny Llama saved in several safetensors files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SCRIPTS, child_env, free_port, tiny_llama_config

SCRIPT = SCRIPTS / "fsdp_shards.py"
TIMEOUT = 600


def _launch(out: Path, world: int) -> list[dict]:
    """``world`` ranks of the script; each one's results (every rank must exit 0, none may hang)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out)],
            env=child_env(RANK=str(rank), **env),
            cwd=out,
            stdout=subprocess.DEVNULL,
            stderr=open(out / f"world{world}_rank{rank}.err", "w"),  # noqa: SIM115
            start_new_session=True,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + TIMEOUT
    try:
        for process in ranks:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process in ranks:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"world size {world} hung for {TIMEOUT} s")
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, (out / f"world{world}_rank{rank}.err").read_text()[-3000:]
    return [torch.load(out / f"world{world}_rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(out / "model", max_shard_size="100KB")
    return {"out": out, 2: _launch(out, 2), 5: _launch(out, 5)}


def _whole_model_quantization(directory: Path):
    """The model as one process quantizes it whole, from the same random state as the script."""
    from lightning_paged.core.loading import empty_model
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

    config = QLoRAConfig(
        compute_dtype="float32",
        quant_storage="float32",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        gradient_checkpointing=False,
    )
    torch.manual_seed(7)
    model = empty_model(directory)
    convert_to_qlora(model, config, "cpu")
    return model


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 5])
def test_every_rank_holds_exactly_its_piece_of_a_whole_model_quantization(runs, world):
    from lightning_paged.core.layers4bit import linear4bit_layers

    whole = _whole_model_quantization(runs["out"] / "model")
    layers = linear4bit_layers(whole)
    for rank, result in enumerate(runs[world]):
        load = result["load"]
        assert len(load["packed"]) == len(layers) == 14
        for index, layer in enumerate(layers):
            pieces = list(torch.chunk(layer.weight.data.view(torch.uint8), world))  # FSDP's cut of dim 0
            expected = pieces[rank] if rank < len(pieces) else pieces[0][:0]
            assert torch.equal(load["packed"][index], expected), (rank, index)
            # the quantization constants stay whole on every rank, bit for bit
            assert torch.equal(load["absmax"][index], layer.quant_state.absmax)
            assert torch.equal(load["nested_absmax"][index], layer.quant_state.state2.absmax)
        # the adapters a whole-model conversion draws from the same random state
        own = {n: p.detach() for n, p in whole.named_parameters() if p.requires_grad}
        assert set(load["adapters"]) == set(own)
        for name, value in own.items():
            assert torch.equal(load["adapters"][name], value), name
        assert "quantized while loading" in load["summary"]
        assert f"sharded over {world} ranks" in load["shard_summary"]


@pytest.mark.slow
def test_an_empty_local_shard_never_reaches_the_optimizer(runs):
    results = runs[5]
    empty = [result["load"]["empty_adapter_shards"] for result in results]
    assert empty[:4] == [[]] * 4
    assert len(empty[4]) == 14 and all("lora_A" in name for name in empty[4])  # 8 rows cut 2, 2, 2, 2
    for result in results:
        resumed = result["32bit"]["resumed"]
        assert min(resumed["group_numels"]) > 0  # the optimizer's groups list no empty tensor
        assert resumed["handed"] and min(resumed["handed"]) > 0  # nor is one handed to bitsandbytes
        assert all(t.numel() > 0 for state in resumed["loaded_state"].values() for t in state.values())
    assert len(results[4]["32bit"]["resumed"]["group_numels"]) == 28 - 14


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["32bit", "8bit"])
def test_ademamix_state_is_gathered_whole_and_resumes_at_the_same_world_size(runs, kind):
    saved = torch.load(runs["out"] / f"ademamix_{kind}.pt", weights_only=False)
    adapters = list(saved["adapters"].values())
    assert len(saved["state"]["state"]) == len(adapters) == 28
    for index, state in saved["state"]["state"].items():
        flat = state.get("__bnb_optimizer_quant_state__", state)
        shape = tuple(adapters[index].shape)
        # AdEMAMix keeps its two moving averages in one (2, *shape) buffer: joined along axis 1
        assert tuple(flat["state1"].shape) == (2, *shape) and tuple(flat["state2"].shape) == shape
        if kind == "8bit":  # each shard's blocks of 256, in rank order, and the shard sizes to cut them again
            numels = saved["state"]["fsdp_shard_numels"][index]
            assert sum(numels) == adapters[index].numel()
            blocks = sum(-(-n // 256) for n in numels)
            assert tuple(flat["absmax1"].shape) == (2, blocks) and tuple(flat["absmax2"].shape) == (blocks,)
    for result in runs[2]:
        whole, resumed = result[kind], result[kind]["resumed"]
        assert resumed["losses"] == whole["losses"][2:]
        for name, value in whole["adapters"].items():
            assert torch.equal(resumed["adapters"][name], value), name


@pytest.mark.slow
def test_ademamix_state_resumes_at_another_world_size(runs):
    saved = torch.load(runs["out"] / "ademamix_32bit.pt", weights_only=False)["state"]["state"]
    for rank, result in enumerate(runs[5]):
        resumed = result["32bit"]["resumed"]
        for local, place in enumerate(resumed["places"]):
            whole = saved[place].get("__bnb_optimizer_quant_state__", saved[place])
            for key in ("state1", "state2"):
                axis = 1 if key == "state1" else 0
                expected = torch.chunk(whole[key], 5, dim=axis)[rank]
                assert torch.equal(resumed["loaded_state"][local][key], expected), (rank, place, key)
        # the same steps from the same state: the adapters of the world-2 run, to float rounding
        continued = runs[2][0]["32bit"]["adapters"]
        for name, value in continued.items():
            torch.testing.assert_close(resumed["adapters"][name], value, rtol=0, atol=1e-6, msg=name)
    # 8-bit blocks of 256 elements do not line up with five shards of these matrices: refused, by name
    refusal = runs[5][0]["8bit_refused"]
    assert refusal is not None and "resume with 2 processes" in refusal
