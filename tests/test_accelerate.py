"""Hugging Face Accelerate on CPU: prepare_paged_qlora's conversion and optimizer, adapter-only
save_state/load_state, and the example."""

from __future__ import annotations

import runpy
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import tiny_llama_config
from torch import nn
from transformers import LlamaForCausalLM

from lightning_paged.core.errors import SettingError
from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.core.qlora import QLoRAConfig

accelerate = pytest.importorskip("accelerate")
from lightning_paged.accelerate import prepare_paged_qlora  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FAST = QLoRAConfig(lora_dropout=0.0, compute_dtype="float32", gradient_checkpointing=False)
"""Settings that keep CPU steps quick; the defaults (bfloat16, checkpointing) run in the DDP test."""
VOCAB = 128


def prepare(qlora=None, optimizer=None, **kwargs):
    accelerator = accelerate.Accelerator(cpu=True)
    torch.manual_seed(0)  # same base weights and LoRA init in every run
    model = LlamaForCausalLM(tiny_llama_config())
    qlora = qlora or FAST
    prepared = prepare_paged_qlora(accelerator, model, qlora, optimizer or {"lr": 1e-2}, **kwargs)
    prepared.model.train()
    return accelerator, prepared


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 12), generator=g) for _ in range(n)]


def train(accelerator, prepared, data) -> None:
    for ids in data:
        accelerator.backward(prepared.model(input_ids=ids, labels=ids).loss)
        prepared.optimizer.step()
        prepared.optimizer.zero_grad()
        prepared.scheduler.step()


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_prepare_converts_and_optimizer_holds_only_adapters():
    accelerator, prepared = prepare(optimizer={"lr": 1e-2, "scheduler": "cosine"}, total_steps=4)
    model = prepared.model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7
    assert all(layer.weight.quant_type == "nf4" for layer in layers)
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    trainable = adapters(model)
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)

    inner = prepared.optimizer.optimizer
    assert type(inner) is bnb.optim.AdamW and inner.is_paged
    held = [p for group in inner.param_groups for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in trainable.values()}
    assert isinstance(prepared.scheduler, accelerate.scheduler.AcceleratedScheduler)
    lrs = []
    for ids in batches(4):
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        prepared.optimizer.step()
        prepared.scheduler.step()
        lrs.append(prepared.scheduler.get_last_lr()[0])
    assert lrs == pytest.approx([1e-2 * f for f in (0.8535534, 0.5, 0.1464466, 0.0)], abs=1e-7)


def test_save_state_is_adapter_only_and_load_state_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    data = batches(3)
    accelerator, straight = prepare()
    train(accelerator, straight, data)

    accelerator, first = prepare()
    train(accelerator, first, data[:2])
    accelerator.save_state(str(tmp_path))
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(adapters(first.model))
    optimizer_state = torch.load(tmp_path / "optimizer.bin", weights_only=False)
    assert len(optimizer_state["state"]) == len(saved)

    accelerator, resumed = prepare()
    accelerator.load_state(str(tmp_path))
    train(accelerator, resumed, data[2:])
    theirs = adapters(straight.model)
    for name, param in adapters(resumed.model).items():
        torch.testing.assert_close(param, theirs[name], rtol=0, atol=0, msg=name)


def test_state_from_other_lora_settings_is_refused(tmp_path):
    accelerator, _ = prepare(QLoRAConfig(lora_r=8))
    accelerator.save_state(str(tmp_path))
    accelerator, _ = prepare(QLoRAConfig(lora_r=4))
    with pytest.raises(RuntimeError, match=r"another qlora\.lora_r \(8 in the checkpoint, 4 now\)"):
        accelerator.load_state(str(tmp_path))
    accelerator, _ = prepare(QLoRAConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RuntimeError, match="does not fit this model"):
        accelerator.load_state(str(tmp_path))


def test_bad_input_names_the_setting():
    accelerator = accelerate.Accelerator(cpu=True)
    model = LlamaForCausalLM(tiny_llama_config())
    with pytest.raises(SettingError, match="optimizer must be an OptimizerConfig"):
        prepare_paged_qlora(accelerator, model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(SettingError, match="qlora.lora_dropout must be in"):
        prepare_paged_qlora(accelerator, model, {"lora_dropout": 1.5})
    with pytest.raises(SettingError, match="optimizer.scheduler needs a known number of training steps"):
        prepare_paged_qlora(accelerator, model, optimizer={"scheduler": "linear"})


EXAMPLE_ARGS = ["--steps", "3", "--batch-size", "2", "--max-length", "128"]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """One run of examples/accelerate_qlora.py, shared by the tests that inspect it."""
    out = tmp_path_factory.mktemp("accelerate_example")
    main = runpy.run_path(str(ROOT / "examples" / "accelerate_qlora.py"))["main"]
    return main, out, main([*EXAMPLE_ARGS, "--out", str(out)])


def test_example_trains_saves_state_and_resumes(example_run):
    from safetensors.torch import load_file

    main, out, first = example_run
    assert len(first["losses"]) == 3
    assert set(load_file(first["state_dir"] / "model.safetensors")) == set(adapters(first["model"]))
    assert len(read_jsonl(out / "eviction_events.jsonl").records) == 3
    assert (out / "eviction_summary.txt").exists()

    resumed = main(
        ["--steps", "4", *EXAMPLE_ARGS[2:], "--out", str(out), "--resume", str(first["state_dir"])]
    )
    assert len(resumed["losses"]) == 1  # continued at step 3
    assert len(read_jsonl(out / "eviction_events.jsonl").records) == 4


def test_accelerate_and_fabric_examples_train_identically(example_run, tmp_path):
    """Same seed, data and settings: both loops must take the same steps (same conversion, same optimizer)."""
    _, _, theirs = example_run
    fabric_main = runpy.run_path(str(ROOT / "examples" / "fabric_qlora.py"))["main"]
    ours = fabric_main([*EXAMPLE_ARGS, "--out", str(tmp_path)])
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-6)
    fabric_adapters = {n: p for n, p in ours["model"].module.named_parameters() if p.requires_grad}
    accelerate_adapters = adapters(theirs["model"])
    assert set(fabric_adapters) == set(accelerate_adapters)
    for name, param in accelerate_adapters.items():
        torch.testing.assert_close(param, fabric_adapters[name], msg=name)


def test_a_saved_state_carries_the_record_refuses_another_base_and_exports(
    tmp_path, capsys, private_hash_cache
):
    from lightning_paged.commands.export import main as export_main
    from lightning_paged.core.adapter_checkpoint import RECORD_FILE, AdapterCheckpoint
    from lightning_paged.core.fingerprint import CheckpointMismatchError
    from lightning_paged.core.loading import empty_model

    def saved_model(directory, seed: int):
        torch.manual_seed(seed)
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(directory)
        return directory

    def prepared_on(base):
        accelerator = accelerate.Accelerator(cpu=True)
        return accelerator, prepare_paged_qlora(accelerator, empty_model(base), FAST, {"lr": 1e-2})

    base, other = saved_model(tmp_path / "base", 0), saved_model(tmp_path / "other", 1)
    accelerator, prepared = prepared_on(base)
    train(accelerator, prepared, batches(1))
    state = tmp_path / "state"
    accelerator.save_state(str(state))
    record = AdapterCheckpoint.read_file(state)
    assert record is not None and (state / RECORD_FILE).is_file()
    assert record.weights == "model" and record.fingerprint.base.source == str(base.resolve())

    # The same base loads; another one is refused before anything is loaded, naming it.
    accelerator, again = prepared_on(base)
    accelerator.load_state(str(state))
    torch.testing.assert_close(adapters(again.model), adapters(prepared.model), rtol=0, atol=0)
    accelerator, wrong = prepared_on(other)
    before = {n: p.detach().clone() for n, p in adapters(wrong.model).items()}
    with pytest.raises(
        CheckpointMismatchError, match=r"another base model \(in the checkpoint: loaded from .*base"
    ):
        accelerator.load_state(str(state))
    assert all(torch.equal(before[n], p) for n, p in adapters(wrong.model).items())

    # export reads the state directory as it reads a Lightning run.
    out = tmp_path / "adapter"
    assert export_main([str(state), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    capsys.readouterr()
    assert export_main([str(state), "--out", str(tmp_path / "refused"), "--base", str(other)]) == 2
    assert "does not fit this base model: it was written with another base model" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
