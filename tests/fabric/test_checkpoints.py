"""A Fabric checkpoint carries the adapters' record: fabric.load checks the base model, and export reads it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama_config
from lightning.fabric import Fabric
from transformers import LlamaForCausalLM

from lightning_paged.commands.export import main as export_main
from lightning_paged.core.adapter_checkpoint import CHECKPOINT_KEY, AdapterCheckpoint
from lightning_paged.core.fingerprint import CheckpointMismatchError
from lightning_paged.core.loading import empty_model
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.fabric import PagedQLoRAFabricStrategy, build_paged_optimizer

FAST = QLoRAConfig(
    lora_r=4, lora_alpha=8, lora_dropout=0.0, compute_dtype="float32", gradient_checkpointing=False
)


def saved_model(directory, seed: int):
    torch.manual_seed(seed)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(directory)
    return directory


def train_and_save(model: torch.nn.Module, path) -> Fabric:
    fabric = Fabric(accelerator="cpu", devices=1, strategy=PagedQLoRAFabricStrategy(FAST))
    model = fabric.setup_module(model)
    optimizer, _ = build_paged_optimizer(model, {"lr": 1e-2})
    optimizer = fabric.setup_optimizers(optimizer)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    fabric.backward(model(input_ids=ids, labels=ids).loss)
    optimizer.step()
    fabric.save(path, {"model": model, "optimizer": optimizer, "step": 1})
    return fabric


@pytest.fixture
def directory_run(tmp_path, private_hash_cache):
    base = saved_model(tmp_path / "base", seed=0)
    path = tmp_path / "adapters.ckpt"
    train_and_save(empty_model(base), path)
    return base, path


def test_a_fabric_checkpoint_carries_the_record_and_refuses_another_base_before_loading(
    directory_run, tmp_path
):
    base, path = directory_run
    record = AdapterCheckpoint.read(torch.load(path, weights_only=True))
    assert record is not None and record.weights == "model" and record.fingerprint.base.kind == "files"
    assert record.fingerprint.base.source == str(base.resolve()) and record.settings() == FAST

    # The same base resumes; the remainder holds what the caller saved, not the record.
    fabric = Fabric(accelerator="cpu", devices=1, strategy=PagedQLoRAFabricStrategy(FAST))
    model = fabric.setup_module(empty_model(base))
    state = {"model": model, "step": 0}
    remainder = fabric.load(path, state)
    assert state["step"] == 1 and CHECKPOINT_KEY not in remainder and set(remainder) == {"optimizer"}

    # Another base model: refused, naming it, and the adapters are left as they were.
    other = saved_model(tmp_path / "other", seed=1)
    fabric = Fabric(accelerator="cpu", devices=1, strategy=PagedQLoRAFabricStrategy(FAST))
    model = fabric.setup_module(empty_model(other))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(
        CheckpointMismatchError, match=r"another base model \(in the checkpoint: loaded from .*base"
    ):
        fabric.load(path, {"model": model})
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_a_fabric_checkpoint_exports_and_refuses_a_wrong_base(directory_run, tmp_path, capsys):
    base, path = directory_run
    out = tmp_path / "adapter"
    assert export_main([str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(base.resolve())
    other = saved_model(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert export_main([str(path), "--out", str(tmp_path / "refused"), "--base", str(other)]) == 2
    assert "does not fit this base model: it was written with another base model" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_a_fabric_run_on_a_model_built_in_a_script_merges_onto_the_base_it_was_saved_to(tmp_path, capsys):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(tmp_path / "base")  # the same weights, saved before training
    path = tmp_path / "adapters.ckpt"
    train_and_save(model, path)
    capsys.readouterr()
    assert export_main([str(path), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "was trained on a model built in a script" in err and "give --base" in err
    merged = tmp_path / "merged"
    assert export_main([str(path), "--out", str(merged), "--merge", "--base", str(tmp_path / "base")]) == 0
    summary = capsys.readouterr().out
    assert "Merged the adapter" in summary and "Against the 4-bit + adapter model" in summary
    other = saved_model(tmp_path / "other", seed=1)
    assert export_main([str(path), "--out", str(tmp_path / "refused"), "--base", str(other)]) == 2
    assert "another base model" in capsys.readouterr().err
