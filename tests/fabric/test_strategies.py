"""Lightning Fabric on CPU: conversion at setup_module, the optimizer's contents, adapter-only
checkpoints, the eviction monitor in a hand-written loop, the example, and two-process DDP."""

from __future__ import annotations

import runpy
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import assert_ranks_agree, run_script, tiny_llama_config
from lightning.fabric import Fabric
from torch import nn
from transformers import LlamaForCausalLM

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.core.paging import ManagedMemory
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.fabric import (
    PagedQLoRAFabricDDPStrategy,
    PagedQLoRAFabricStrategy,
    build_paged_optimizer,
)
from lightning_paged.testing import HostMemory

ROOT = Path(__file__).resolve().parents[2]
FAST = QLoRAConfig(lora_dropout=0.0, compute_dtype="float32", gradient_checkpointing=False)
"""Settings that keep CPU steps quick; the defaults (bfloat16, checkpointing) run in the DDP test."""
VOCAB = 128
MIB = 1024 * 1024


def make_fabric(qlora=None, **kwargs) -> Fabric:
    strategy = PagedQLoRAFabricStrategy(qlora or FAST)
    return Fabric(accelerator="cpu", devices=1, strategy=strategy, **kwargs)


def setup(fabric: Fabric, memory: ManagedMemory | None = None):
    torch.manual_seed(0)  # same base weights and LoRA init in every run
    model = fabric.setup_module(LlamaForCausalLM(tiny_llama_config()))
    optimizer, scheduler = build_paged_optimizer(model, {"lr": 1e-2}, memory=memory)
    model.train()
    return model, fabric.setup_optimizers(optimizer), scheduler


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def train(fabric: Fabric, model, optimizer, data) -> list[float]:
    losses = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.module.named_parameters() if p.requires_grad}


def test_setup_module_converts_and_optimizer_holds_only_adapters():
    fabric = Fabric(accelerator="cpu", devices=1, strategy="paged_qlora")
    assert isinstance(fabric.strategy, PagedQLoRAFabricStrategy)
    model, optimizer, _ = setup(fabric)
    inner = model.module
    layers = [m for m in inner.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    assert all(layer.weight.quant_type == "nf4" and layer.weight.quant_state.nested for layer in layers)
    assert type(inner.lm_head) is nn.Linear and not inner.lm_head.weight.requires_grad
    trainable = adapters(model)
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert fabric.strategy.conversion_report.trainable_params == sum(p.numel() for p in trainable.values())

    held = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in trainable.values()}
    assert type(optimizer.optimizer) is bnb.optim.AdamW and optimizer.optimizer.is_paged
    before = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}
    train(fabric, model, optimizer, batches(2))
    assert any(not torch.equal(before[n], trainable[n]) for n in before)  # it learns


def test_optimizer_built_before_the_conversion_is_refused():
    fabric = make_fabric()
    model = LlamaForCausalLM(tiny_llama_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(SettingError, match="built before the model was converted"):
        fabric.setup(model, optimizer)


def test_save_holds_only_adapters_and_load_resumes_exactly(tmp_path):
    data = batches(3)
    fabric = make_fabric()
    straight, optimizer, _ = setup(fabric)
    train(fabric, straight, optimizer, data)

    fabric = make_fabric()
    first, optimizer, _ = setup(fabric)
    train(fabric, first, optimizer, data[:2])
    path = tmp_path / "adapters.ckpt"
    fabric.save(path, {"model": first, "optimizer": optimizer, "step": 2})
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["model"]) == set(adapters(first))
    assert len(checkpoint["optimizer"]["state"]) == len(adapters(first))

    fabric = make_fabric()
    resumed, optimizer, _ = setup(fabric)
    remainder = fabric.load(path, {"model": resumed, "optimizer": optimizer})
    assert remainder == {"step": 2}
    train(fabric, resumed, optimizer, data[2:])
    theirs = adapters(straight)
    for name, param in adapters(resumed).items():
        torch.testing.assert_close(param, theirs[name], rtol=0, atol=0, msg=name)


def test_checkpoint_with_another_lora_rank_is_refused(tmp_path):
    fabric = make_fabric(QLoRAConfig(lora_r=8))
    model, _, _ = setup(fabric)
    fabric.save(tmp_path / "r8.ckpt", {"model": model})
    fabric = make_fabric(QLoRAConfig(lora_r=4))
    model, _, _ = setup(fabric)
    with pytest.raises(RuntimeError, match=r"another qlora\.lora_r \(8 in the checkpoint, 4 now\)"):
        fabric.load(tmp_path / "r8.ckpt", {"model": model})
    fabric = make_fabric(QLoRAConfig(target_modules=["q_proj"]))
    model, _, _ = setup(fabric)
    with pytest.raises(RuntimeError, match="does not fit this model"):
        fabric.load(tmp_path / "r8.ckpt", {"model": model})


def _state_buffers(optimizer):
    return [t for state in optimizer.state.values() for k, t in state.items() if k in ("state1", "state2")]


def test_fabric_load_puts_optimizer_state_back_into_paged_memory(tmp_path):
    fabric = make_fabric()
    model, optimizer, _ = setup(fabric, memory=HostMemory())
    train(fabric, model, optimizer, batches(1))
    saved = _state_buffers(optimizer.optimizer)
    assert saved and all(t.is_paged for t in saved)
    fabric.save(tmp_path / "state.ckpt", {"model": model, "optimizer": optimizer})

    fabric = make_fabric()
    model, optimizer, _ = setup(fabric, memory=HostMemory())
    fabric.load(tmp_path / "state.ckpt", {"model": model, "optimizer": optimizer})
    loaded = _state_buffers(optimizer.optimizer)
    assert len(loaded) == len(saved) and all(getattr(t, "is_paged", False) for t in loaded)
    assert all(torch.equal(a, b) for a, b in zip(saved, loaded))


def test_precision_that_casts_weights_is_refused_mixed_is_accepted():
    fabric = make_fabric(precision="bf16-true")
    with pytest.raises(SettingError, match="precision .*bf16-mixed"):
        fabric.setup_module(LlamaForCausalLM(tiny_llama_config()))
    fabric = make_fabric(precision="bf16-mixed")
    model, optimizer, _ = setup(fabric)
    assert len(train(fabric, model, optimizer, batches(1))) == 1


def test_settings_are_checked_with_their_names():
    with pytest.raises(SettingError, match="qlora.lora_r must be a positive integer"):
        PagedQLoRAFabricStrategy({"lora_r": 0})
    with pytest.raises(SettingError, match="qlora.lora_rank is not a setting of QLoRAConfig; its settings: "):
        PagedQLoRAFabricStrategy({"lora_rank": 8})
    with pytest.raises(SettingError, match="qlora.quant_type must be one of nf4, fp4"):
        PagedQLoRAFabricDDPStrategy(QLoRAConfig(quant_type="nf8"))
    with pytest.raises(SettingError, match="devices .*paged_qlora_ddp"):
        Fabric(accelerator="cpu", devices=2, strategy="paged_qlora")
    fabric = make_fabric()
    model = fabric.setup_module(LlamaForCausalLM(tiny_llama_config()))
    with pytest.raises(SettingError, match="optimizer.name .*did you mean 'paged_adamw_8bit'"):
        build_paged_optimizer(model, {"name": "paged_adamw_9bit"})


def test_example_trains_saves_adapters_and_resumes(tmp_path):
    example = runpy.run_path(str(ROOT / "examples" / "fabric_qlora.py"))
    args = ["--steps", "3", "--batch-size", "2", "--max-length", "128", "--out", str(tmp_path)]
    first = example["main"](args)
    assert len(first["losses"]) == 3
    checkpoint = torch.load(first["checkpoint"], weights_only=False)
    assert set(checkpoint["model"]) == set(adapters(first["model"]))
    assert checkpoint["step"] == 3
    assert len(read_jsonl(tmp_path / "eviction_events.jsonl").records) == 3
    assert (tmp_path / "eviction_summary.txt").exists()

    resumed = example["main"](["--steps", "4", *args[2:], "--resume", str(first["checkpoint"])])
    assert len(resumed["losses"]) == 1  # continued at step 3
    assert len(read_jsonl(tmp_path / "eviction_events.jsonl").records) == 4


@pytest.mark.slow
def test_two_process_ddp_keeps_lora_weights_equal(tmp_path):
    run_script("fabric_ddp_train.py", tmp_path)
    lora0 = assert_ranks_agree(tmp_path)

    checkpoint = torch.load(tmp_path / "adapters.ckpt", weights_only=False)
    assert set(checkpoint["model"]) == set(lora0)  # adapter-only, written once by rank zero
    for rank in (0, 1):
        assert len(read_jsonl(tmp_path / f"eviction_events.rank{rank}.jsonl").records) == 3
    summary = (tmp_path / "eviction_summary.txt").read_text()
    assert "rank 0" in summary and "rank 1" in summary


def test_the_chunked_loss_runs_through_fabric_s_module_with_the_standard_loss_s_gradients():
    from lightning_paged import causal_lm_loss
    from lightning_paged.core.causal_lm_loss import loss_plan

    fabric = make_fabric(QLoRAConfig(lora_dropout=0.0, compute_dtype="float32", offload_activations=True))
    model, _, _ = setup(fabric)
    assert loss_plan(model).chunked  # Fabric's wrapper is looked through
    ids = batches(1)[0]
    adapters_ = list(adapters(model).values())
    expected = model(input_ids=ids, labels=ids).loss
    want = torch.autograd.grad(expected, adapters_)
    loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids}, chunk_size=5)
    got = torch.autograd.grad(loss, adapters_)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert fabric.strategy.conversion_report.offload is not None  # the QLoRA setting reached the conversion
