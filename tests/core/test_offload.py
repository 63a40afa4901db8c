"""Activation offloading through its CPU seam: host tensors treated as device tensors (``devices=("cpu",)``)
go through the same copy out and copy back as CUDA tensors would, minus the pinning."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from lightning_paged.core.layers4bit import enable_checkpointing
from lightning_paged.core.offload import ActivationOffload, enable_activation_offload, is_checkpointing

SEAM = ("cpu",)
"""Device types whose tensors move: the host's, so the hooks run on a machine without an accelerator."""


def checkpointed_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).train()
    assert enable_checkpointing(model)
    return model


def batch():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def loss_and_grads(model):
    loss = model(**batch()).loss
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def test_the_checkpointed_layer_inputs_move_and_come_back_with_identical_results():
    model = checkpointed_llama()
    expected, expected_grads = loss_and_grads(model)
    stats = enable_activation_offload(model, min_bytes=0, devices=SEAM)
    assert stats is not None and is_checkpointing(model)
    loss = model(**batch()).loss
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    assert stats.offloaded_tensors == layers  # one input per checkpointed block: its hidden states
    assert stats.offloaded_bytes == layers * 2 * 16 * hidden * 4
    assert stats.restored_tensors == 0
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert stats.restored_tensors == layers
    assert torch.equal(loss, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_the_backward_pass_reads_the_host_copy():
    """Changing a block's input after the forward breaks the backward without offloading, not with it."""
    model = checkpointed_llama()
    _, expected_grads = loss_and_grads(model)
    inputs: list[torch.Tensor] = []
    model.model.layers[1].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    loss = model(**batch()).loss
    with torch.no_grad():
        inputs[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, list(model.parameters()))

    enable_activation_offload(model, min_bytes=0, devices=SEAM)
    inputs.clear()
    loss = model(**batch()).loss
    with torch.no_grad():
        inputs[0].mul_(2)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def test_on_a_host_without_an_accelerator_nothing_moves_and_nothing_asks_for_pinned_memory():
    model = checkpointed_llama()
    expected, _ = loss_and_grads(model)
    stats = enable_activation_offload(model, min_bytes=0)  # default devices: everything but the host
    assert stats is not None
    loss, _ = loss_and_grads(model)
    assert stats.offloaded_tensors == 0 and stats.kept_tensors == model.config.num_hidden_layers
    assert torch.equal(loss, expected)


def test_what_moves_and_what_stays():
    hooks = ActivationOffload(min_bytes=1024, devices=SEAM)
    weight = nn.Parameter(torch.zeros(64, 64))
    assert hooks.moves(torch.zeros(256))  # 1 KiB activation
    assert not hooks.moves(torch.zeros(255))  # under min_bytes
    assert not hooks.moves(weight) and not hooks.moves(weight.t())  # a parameter and a view of one
    assert not ActivationOffload(min_bytes=0).moves(torch.zeros(256))  # host tensors stay by default
    assert not hooks.moves(torch.zeros(256, device="meta"))


def test_a_model_without_checkpointing_is_left_alone():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    assert enable_activation_offload(model) is None
    assert not is_checkpointing(model)


def test_any_module_under_the_hooks_keeps_its_activations_on_the_host():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    x = torch.randn(16, 32)
    expected = torch.autograd.grad(module(x).square().sum(), list(module.parameters()))
    hooks = ActivationOffload(min_bytes=0, devices=SEAM)
    with hooks:
        out = module(x).square().sum()
    assert hooks.stats.offloaded_tensors >= 3  # the input of each layer and of GELU, the output for square
    grads = torch.autograd.grad(out, list(module.parameters()))
    assert hooks.stats.restored_tensors == hooks.stats.offloaded_tensors
    assert all(torch.allclose(a, b) for a, b in zip(grads, expected))


def test_the_block_by_block_fsdp_load_installs_the_hooks_on_its_checkpointed_layers(tmp_path):
    """``offload_activations`` reaches the sharded load as it reaches the whole-model conversion (one gloo rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_paged.core.fsdp_load import convert_and_shard
    from lightning_paged.core.qlora_config import QLoRAConfig

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = checkpointed_llama()
        config = QLoRAConfig(compute_dtype="float32", quant_storage="float32", offload_activations=True)
        report, _ = convert_and_shard(model, config, torch.device("cpu"), init_device_mesh("cpu", (1,)))
        assert report.offload is not None and "offload_activations" in report.summary()
        model(**batch()).loss.backward()
        # On the host nothing moves, but each checkpointed block's saved input went through the hooks.
        assert report.offload.kept_tensors == model.config.num_hidden_layers
        assert report.offload.restored_tensors == 0
    finally:
        dist.destroy_process_group()
