"""lightning-paged export: PEFT adapter directories that PEFT loads, merges onto the 16-bit base, bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import safe_open
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lightning_paged.commands.export import main
from lightning_paged.core.compare import compare_logits
from lightning_paged.core.export import adapter_from_model
from lightning_paged.lightning.strategies import PagedQLoRAStrategy

VOCAB = 64
SETTINGS = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "compute_dtype": "float32"}
SETTINGS |= {"gradient_checkpointing": False}
PROBE = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(11))


def model_config() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )


class RunModule(pl.LightningModule):
    """A LightningModule like the CLI's: a causal LM from a model directory or from a config."""

    def __init__(self, model_name_or_path: str | None = None, model_config: dict | None = None) -> None:
        super().__init__()
        if model_name_or_path is not None:
            self.model = LlamaForCausalLM.from_pretrained(model_name_or_path, dtype=torch.float32).train()
        else:
            self.model = LlamaForCausalLM(LlamaConfig(**model_config))

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-2)


def train_run(run_dir: Path, init_args: dict, settings: dict, seed: int = 0) -> RunModule:
    """Train as ``lightning-paged fit`` would and leave its checkpoints and saved config in ``run_dir``."""
    config = {
        "seed_everything": seed,
        "trainer": {"strategy": {"class_path": "lightning_paged.PagedQLoRAStrategy", "init_args": settings}},
        "model": {"class_path": f"{RunModule.__module__}.RunModule", "init_args": init_args},
    }
    (run_dir / "logs" / "version_0").mkdir(parents=True)
    (run_dir / "logs" / "version_0" / "config.yaml").write_text(yaml.safe_dump(config))
    seed_everything(seed, verbose=False)
    module = RunModule(**init_args)
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": (ids := torch.randint(0, VOCAB, (2, 10), generator=g)), "labels": ids} for _ in range(3)
    ]
    saver = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=PagedQLoRAStrategy(**settings),
        max_steps=3,
        logger=False,
        callbacks=[saver],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    module.model.eval()
    return module


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**model_config())).save_pretrained(path, max_shard_size="60KB")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_dir) -> tuple[Path, RunModule]:
    """A run whose base model is loaded from a directory of safetensors shards."""
    path = tmp_path_factory.mktemp("run")
    return path, train_run(path, {"model_name_or_path": str(base_dir)}, SETTINGS)


@pytest.fixture(scope="module")
def config_run(tmp_path_factory) -> tuple[Path, RunModule]:
    """A run whose base model is built from a config (random init, seeded)."""
    path = tmp_path_factory.mktemp("config_run")
    return path, train_run(path, {"model_config": model_config()}, {**SETTINGS, "lora_r": 8}, seed=3)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=PROBE).logits.float()


def load_4bit(base_dir: Path):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    for (
        layer
    ) in model.modules():  # the CPU inference repacking stores absmax in bfloat16; compare like with like
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return model


def test_adapter_loads_in_peft_onto_4bit_base_with_the_trained_logits(run, base_dir, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    run_dir, trained = run
    out = tmp_path / "adapter"
    assert main([str(run_dir), "--out", str(out)]) == 0
    assert "Wrote the PEFT adapter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8, "CAUSAL_LM")

    # Key names exactly as PEFT itself saves an adapter with this config.
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        ours = set(f.keys())
        from_module = adapter_from_model(trained.model)  # the same adapter, taken from the trained module
        assert set(from_module.weights) == ours
        assert all(torch.equal(from_module.weights[k], f.get_tensor(k)) for k in ours)
    reference = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**model_config())), LoraConfig(**_init_args(config))
    )
    assert ours == set(get_peft_model_state_dict(reference))

    peft_model = PeftModel.from_pretrained(load_4bit(base_dir), str(out))
    torch.testing.assert_close(logits(peft_model), logits(trained.model), rtol=0, atol=1e-5)
    with peft_model.disable_adapter():  # the adapter is what makes them equal
        assert not torch.allclose(logits(peft_model), logits(trained.model), atol=1e-3)


def _init_args(config: dict) -> dict:
    import dataclasses

    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    return {
        k: v
        for k, v in config.items()
        if k in names and k not in ("base_model_name_or_path", "inference_mode")
    }


def test_merge_onto_16bit_weights_loads_in_transformers_and_reports_the_difference(
    run, base_dir, tmp_path, capsys
):
    from peft import PeftModel

    run_dir, trained = run
    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(adapter)]) == 0
    assert main([str(run_dir), "--out", str(merged_dir), "--merge", "--max-shard-size", "60KB"]) == 0
    printed = capsys.readouterr().out
    shards = sorted(p.name for p in merged_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # The adapter on the 16-bit base, applied by PEFT, is what the merged weights compute.
    on_16bit = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(adapter)
    )
    torch.testing.assert_close(logits(merged), logits(on_16bit), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(merged), logits(base), atol=1e-3)  # the adapter changed something

    # The reported difference is the one between the merged model and the trained 4-bit + adapter model.
    reported = float(re.search(r"largest logit difference ([0-9.e-]+)", printed).group(1))
    measured = compare_logits(merged, trained.model, vocab_size=VOCAB)
    assert reported == pytest.approx(measured.max_abs, rel=1e-3)
    assert 0 < reported < 0.5  # NF4 quantization error on a tiny random model, not a broken merge


def test_run_built_from_a_config_exports_and_merges(config_run, tmp_path, capsys):
    from peft import PeftModel

    run_dir, _ = config_run
    assert main([str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        is None
    )
    assert main([str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert "Against the 4-bit + adapter model" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    seed_everything(3, verbose=False)
    rebuilt = RunModule(model_config=model_config()).model
    on_16bit = PeftModel.from_pretrained(rebuilt, str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(merged), logits(on_16bit), rtol=0, atol=1e-5)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_bad_input_is_refused_with_a_clear_message_and_nothing_written(
    run, config_run, base_dir, tmp_path, capsys
):
    run_dir, _ = run
    other_dir, _ = config_run

    def refused(*args: str) -> str:
        assert main(list(args)) != 0
        return capsys.readouterr().err

    out = tmp_path / "out"
    # A checkpoint from another run, against this run's config.
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir / "logs", mixed / "logs")
    (mixed / "checkpoints").mkdir()
    shutil.copy(other_dir / "checkpoints" / "last.ckpt", mixed / "checkpoints" / "last.ckpt")
    message = refused(str(mixed), "--out", str(out))
    assert "does not belong to the run of" in message
    assert "another trainer.strategy.init_args.lora_r (8 in the checkpoint, 4 in the config)" in message

    # The same run's config, rebuilt with another seed: another base model.
    reseeded = tmp_path / "reseeded"
    shutil.copytree(other_dir, reseeded)
    config_file = reseeded / "logs" / "version_0" / "config.yaml"
    config_file.write_text(config_file.read_text().replace("seed_everything: 3", "seed_everything: 4"))
    message = refused(str(reseeded), "--out", str(out))
    assert "does not fit this base model: it was written with another base model" in message
    assert "another model_config or seed_everything?" in message

    # A base directory with other weights, or none.
    torch.manual_seed(1)
    other_base = tmp_path / "other_base"
    LlamaForCausalLM(LlamaConfig(**model_config())).save_pretrained(other_base, max_shard_size="60KB")
    message = refused(str(run_dir), "--out", str(out), "--base", str(other_base))
    assert f"another base model (in the checkpoint: loaded from {base_dir}" in message
    assert "weight files with different content: model-00001-of-" in message
    (tmp_path / "empty").mkdir()
    assert "holds no model weights" in refused(
        str(run_dir), "--out", str(out), "--base", str(tmp_path / "empty")
    )

    # Missing and truncated checkpoints.
    assert "does not exist" in refused(str(tmp_path / "nope.ckpt"), "--out", str(out))
    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir, truncated)
    last = truncated / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    assert "truncated or corrupt" in refused(str(last), "--out", str(out))
    assert not out.exists() and leftovers(tmp_path) == []

    # An existing output directory: refused, untouched; replaced with --overwrite.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists" in refused(str(run_dir), "--out", str(out))
    assert (out / "keep.txt").read_text() == "mine"
    assert main([str(run_dir), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert leftovers(tmp_path) == []


# --- a run trained on a pre-quantized (-bnb-4bit) base, through the real commands -----------------------

PREQUANTIZED_RUN = """\
seed_everything: 0
trainer:
  accelerator: cpu
  strategy:
    class_path: lightning_paged.PagedQLoRAStrategy
    init_args: {{compute_dtype: float32, lora_r: 4, lora_alpha: 8, gradient_checkpointing: false}}
  max_steps: 2
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {run}
  logger: {{class_path: lightning_paged.ResumableCSVLogger, init_args: {{save_dir: {run}, name: logs, version: v}}}}
  callbacks:
    - {{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {{dirpath: {run}/checkpoints, save_last: true}}}}
model:
  class_path: lightning_paged.CausalLMModule
  init_args:
    model_name_or_path: {model}
    optimizer: {{name: adamw, lr: 5.0e-2, warmup_steps: 0}}
data:
  class_path: lightning_paged.InstructionDataModule
  init_args: {{data_path: {data}, max_length: 48, batch_size: 2, val_split: 0}}
"""


def save_16bit(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**model_config(), "vocab_size": 259})).to(torch.bfloat16).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def prequantized_run(tmp_path_factory) -> dict[str, Path]:
    """``lightning-paged fit`` on a base saved in bitsandbytes 4-bit, and the 16-bit model it was quantized from."""
    import sys

    from lightning_paged.commands.main import main as command

    root = tmp_path_factory.mktemp("prequantized")
    base16 = save_16bit(root / "base16", seed=0)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    quantized = AutoModelForCausalLM.from_pretrained(
        base16, quantization_config=quantization, device_map="cpu"
    )
    quantized.save_pretrained(root / "base-bnb-4bit")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in "abcdef"))
    config = root / "config.yaml"
    config.write_text(PREQUANTIZED_RUN.format(run=root / "run", model=root / "base-bnb-4bit", data=data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-paged"])
        assert command(["fit", "--config", str(config)]) == 0
    return {"run": root / "run", "base16": base16, "base4": root / "base-bnb-4bit", "root": root}


def test_merge_of_a_run_on_a_prequantized_base_is_onto_its_dequantized_weights(
    prequantized_run, tmp_path, capsys
):
    out = tmp_path / "merged"
    assert main([str(prequantized_run["run"]), "--out", str(out), "--merge"]) == 0
    printed = capsys.readouterr().out
    assert (
        f"of the weights of {prequantized_run['base4']}, dequantized from its bitsandbytes 4-bit (nf4)"
        in printed
    )
    assert "keep the 4-bit quantization error" in printed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # a plain 16-bit model
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    # The dequantized weights are those the 4-bit model computed with: the merged model is the trained one,
    # up to rounding its merged weights to bfloat16 (a 16-bit merge differs by the quantization error).
    reported = float(re.search(r"largest logit difference ([0-9.e-]+)", printed).group(1))
    assert reported < 0.02


def test_a_16bit_base_that_quantizes_to_the_4bit_bytes_is_accepted_and_merged_onto(
    prequantized_run, tmp_path, capsys
):
    from peft import PeftModel

    run, base16 = prequantized_run["run"], prequantized_run["base16"]
    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    assert main([str(run), "--out", str(adapter), "--base", str(base16)]) == 0
    assert main([str(run), "--out", str(merged_dir), "--merge", "--base", str(base16)]) == 0
    printed = capsys.readouterr().out
    assert f"--base {base16} quantizes to the 4-bit bytes of {prequantized_run['base4']}" in printed
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base16)
    assert "of the 16-bit weights of" in printed
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    on_16bit = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base16, dtype=torch.float32), str(adapter)
    )
    torch.testing.assert_close(logits(merged), logits(on_16bit), rtol=0, atol=2e-2)  # bf16 merged weights


def test_a_16bit_base_that_quantizes_to_other_bytes_is_refused(prequantized_run, tmp_path, capsys):
    other = save_16bit(tmp_path / "other16", seed=1)
    out = tmp_path / "merged"
    assert main([str(prequantized_run["run"]), "--out", str(out), "--merge", "--base", str(other)]) == 2
    message = capsys.readouterr().err
    assert f"--base {other} is not the model {prequantized_run['base4']} was quantized from" in message
    assert "gives other 4-bit bytes" in message and "dequantized 4-bit weights" in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_every_exported_file_follows_the_umask(run, tmp_path, capsys):
    """A shared serving machine reads the export as it reads any other file (the weights were 0600)."""
    import os

    run_dir, _ = run
    previous = os.umask(0o027)
    try:
        assert main([str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
        assert main([str(run_dir), "--out", str(tmp_path / "merged"), "--merge", "--no-compare"]) == 0
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "adapter").iterdir()] + [p for p in (tmp_path / "merged").iterdir()]
    assert {p.name for p in files} >= {"adapter_model.safetensors", "adapter_config.json", "config.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}
    for directory in (tmp_path / "adapter", tmp_path / "merged"):
        assert directory.stat().st_mode & 0o777 == 0o750


def test_a_base_of_bin_files_merges_as_its_safetensors_do(run, base_dir, tmp_path):
    """A base with only PyTorch .bin shards (zip format) is read mapped, tensor by tensor."""
    from safetensors.torch import load_file

    from lightning_paged.core.export import merge_adapter

    _, trained = run
    bin_dir = tmp_path / "bin-base"
    bin_dir.mkdir()
    shutil.copy(base_dir / "config.json", bin_dir / "config.json")
    for i, shard in enumerate(sorted(base_dir.glob("*.safetensors"))):
        torch.save(load_file(shard), bin_dir / f"pytorch_model-{i:05d}.bin")
    adapter = adapter_from_model(trained.model)
    merge_adapter(adapter, base_dir, tmp_path / "from-safetensors", max_shard_size=10**9, progress=False)
    report = merge_adapter(adapter, bin_dir, tmp_path / "from-bin", max_shard_size=10**9, progress=False)
    assert report.merged == len(adapter.pairs()) > 0
    want = load_file(tmp_path / "from-safetensors" / "model.safetensors")
    got = load_file(tmp_path / "from-bin" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_run_directory_exports_its_newest_readable_checkpoint_by_step(run, tmp_path, capsys):
    """Not the file written last: a copy of an earlier step and a truncated file are both newer."""
    import os
    import time

    run_dir, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoints = copy / "checkpoints"
    earlier = torch.load(checkpoints / "last.ckpt", weights_only=False)
    earlier["global_step"] = 1
    torch.save(earlier, checkpoints / "epoch=0-step=1-copied-later.ckpt")
    (checkpoints / "epoch=0-step=9.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:1000])
    later = time.time() + 60
    for name in ("epoch=0-step=1-copied-later.ckpt", "epoch=0-step=9.ckpt"):
        os.utime(checkpoints / name, (later, later))
    with pytest.warns(UserWarning, match=r"epoch=0-step=9.ckpt .* cannot be read"):
        assert main([str(copy), "--out", str(tmp_path / "adapter")]) == 0
    assert f"Wrote the PEFT adapter of {checkpoints / 'last.ckpt'}" in capsys.readouterr().out
