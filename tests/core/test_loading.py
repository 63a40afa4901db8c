"""Quantize while loading: a directory model streamed into 4-bit equals load-then-convert and transformers' 4-bit load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_llama_config
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from lightning_paged import CausalLMModule, PagedQLoRAStrategy, QLoRAConfig, SettingError, convert_to_qlora
from lightning_paged.core.loading import WeightFiles, WeightLoadError, deferred_directory, empty_model
from lightning_paged.core.qlora import linear4bit_layers

VOCAB = 259  # the byte tokenizer's size, so CausalLMModule accepts these models
SETTINGS = QLoRAConfig(lora_dropout=0.0)


def _bnb_config(quant_type: str = "nf4"):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Tiny bfloat16 Llamas saved as transformers saves them: sharded, tied, bare base model, pre-quantized."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB)).to(torch.bfloat16)
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    torch.manual_seed(1)
    tied = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, tie_word_embeddings=True)).to(torch.bfloat16)
    tied.save_pretrained(root / "tied")
    tied.model.save_pretrained(root / "bare")  # keys without the "model." prefix, no lm_head
    shutil.copytree(root / "sharded", root / "torch_dtype")
    config = json.loads((root / "torch_dtype" / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # as configs written before transformers 5 spell it
    (root / "torch_dtype" / "config.json").write_text(json.dumps(config))
    quantized = AutoModelForCausalLM.from_pretrained(
        str(root / "sharded"), quantization_config=_bnb_config(), device_map="cpu"
    )
    quantized.save_pretrained(root / "prequantized")
    return {name: root / name for name in ("sharded", "tied", "bare", "torch_dtype", "prequantized")}


def _load_then_convert(directory: Path, config: QLoRAConfig = SETTINGS):
    """The path before streaming: the whole model in bfloat16 first, then the conversion."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.bfloat16).train()
    torch.manual_seed(7)
    convert_to_qlora(model, config, device="cpu")
    return model


def _streamed(directory: Path, config: QLoRAConfig = SETTINGS):
    model = empty_model(directory)
    assert all(p.device.type == "meta" for p in model.parameters())
    torch.manual_seed(7)  # same LoRA initialisation as _load_then_convert
    report = convert_to_qlora(model, config, device="cpu")
    assert deferred_directory(model) is None
    return model, report


def _first_step(model) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.item(), grads


@pytest.mark.parametrize("kind", ["sharded", "tied", "bare", "torch_dtype"])
def test_streaming_load_equals_load_then_convert_bit_for_bit(saved, kind):
    expected = _load_then_convert(saved[kind])
    model, report = _streamed(saved[kind])
    want, got = expected.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for key in want:  # packed 4-bit bytes, absmax, quantization maps, non-quantized weights, LoRA
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    assert report.quantized == [n for n, _ in _named_4bit(expected)]
    shards = len(list(saved[kind].glob("*.safetensors")))
    assert report.files == shards and (shards > 1) == (kind in ("sharded", "torch_dtype"))
    with WeightFiles(saved[kind]) as files:
        assert report.tensors_read == len(files.entries)  # each tensor of the files read once
    assert "quantized while loading" in report.summary()
    if kind in ("tied", "bare"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    loss, grads = _first_step(model)
    want_loss, want_grads = _first_step(expected)
    assert loss == want_loss
    for name, grad in want_grads.items():
        assert torch.equal(grads[name], grad), name


def _named_4bit(model):
    import bitsandbytes as bnb

    return [
        (n.removesuffix(".base_layer"), m)
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    ]


def test_packed_weights_equal_transformers_own_4bit_load(saved):
    from transformers import AutoModelForCausalLM

    theirs = dict(
        _named_4bit(
            AutoModelForCausalLM.from_pretrained(
                str(saved["sharded"]), quantization_config=_bnb_config(), device_map="cpu"
            )
        )
    )
    model, _ = _streamed(saved["sharded"], QLoRAConfig())
    ours = dict(_named_4bit(model))
    assert sorted(ours) == sorted(theirs) and len(ours) == 14  # same layers quantized (lm_head kept)
    for name, layer in theirs.items():
        a, b = layer.weight, ours[name].weight
        assert torch.equal(a.data, b.data), name
        assert torch.equal(a.quant_state.absmax, b.quant_state.absmax), name
        assert torch.equal(a.quant_state.state2.absmax, b.quant_state.state2.absmax), name
        assert torch.equal(a.quant_state.offset, b.quant_state.offset), name
        assert a.quant_state.dtype == b.quant_state.dtype == torch.bfloat16


def _batches(n: int = 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (n * 2, 16), generator=generator)
    return [
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids.unbind(0)
    ]


def _first_loss(directory: Path, **strategy) -> tuple[float, CausalLMModule, PagedQLoRAStrategy]:
    torch.manual_seed(11)
    module = CausalLMModule(model_name_or_path=str(directory))
    assert deferred_directory(module.model) is not None  # nothing read yet
    chosen = PagedQLoRAStrategy(lora_dropout=0.0, **strategy)
    trainer = quiet_trainer(strategy=chosen, max_steps=1)
    trainer.fit(module, DataLoader(_batches(), batch_size=2))
    return trainer.callback_metrics["train/loss"].item(), module, chosen


def test_prequantized_directory_trains_with_the_first_loss_of_the_same_model_quantized_here(saved):
    loss, module, strategy = _first_loss(saved["prequantized"])
    want, _, _ = _first_loss(saved["sharded"])
    assert loss == want
    report = strategy.conversion_report
    assert report is not None and report.prequantized and "loaded as stored" in report.summary()
    assert len(linear4bit_layers(module.model)) == 14
    assert strategy.fingerprint is not None and strategy.fingerprint.base.kind == "files"
    # the LoRA weights moved: it trained on the stored 4-bit weights
    assert any(p.abs().sum() > 0 for n, p in module.model.named_parameters() if "lora_B" in n)


def test_prequantized_compute_dtype_is_an_override(saved):
    model, _ = _streamed(saved["prequantized"], QLoRAConfig(compute_dtype="float32"))
    layers = linear4bit_layers(model)
    assert {layer.compute_dtype for layer in layers} == {torch.float32}
    assert {layer.weight.quant_state.dtype for layer in layers} == {torch.float32}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quant_type": "fp4"}, r"^quant_type contradicts .*bnb_4bit_quant_type='nf4'.*got 'fp4'"),
        ({"double_quant": False}, r"^double_quant contradicts .*bnb_4bit_use_double_quant=True"),
        ({"quant_storage": "bfloat16"}, r"^quant_storage contradicts .*bnb_4bit_quant_storage='uint8'"),
        ({"skip_modules": ["lm_head", "o_proj"]}, r"^skip_modules would leave 16-bit layers .*o_proj"),
    ],
)
def test_prequantized_settings_that_contradict_the_directory_are_refused(saved, settings, message):
    model = empty_model(saved["prequantized"])
    with pytest.raises(SettingError, match=message):
        convert_to_qlora(model, QLoRAConfig(**settings), device="cpu")
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing loaded


def test_strategy_names_the_contradicting_setting_as_typed(saved):
    module = CausalLMModule(model_name_or_path=str(saved["prequantized"]))
    trainer = quiet_trainer(strategy=PagedQLoRAStrategy(quant_type="fp4"), max_steps=1)
    with pytest.raises(SettingError, match=r"^trainer\.strategy\.init_args\.quant_type contradicts"):
        trainer.fit(module, DataLoader(_batches(), batch_size=2))


def test_8bit_and_other_quantized_directories_are_refused(saved, tmp_path):
    for name, quant in (
        ("int8", {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}),
        ("gptq", {"quant_method": "gptq", "bits": 4}),
    ):
        shutil.copytree(saved["tied"], tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["quantization_config"] = quant
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightLoadError, match=r"config.json says the weights are bitsandbytes 8-bit.*supported"
    ):
        empty_model(tmp_path / "int8")
    with pytest.raises(SettingError, match=r"^model_name_or_path cannot be loaded: .*quant_method='gptq'"):
        CausalLMModule(model_name_or_path=str(tmp_path / "gptq"))


# --- bad input: each error names the file and tensor, and nothing is left loaded --------------------


def _copy(saved, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[kind], tmp_path / kind))


def _assert_refused(directory: Path, message: str, config: QLoRAConfig = SETTINGS) -> None:
    model = empty_model(directory)
    with pytest.raises((WeightLoadError, SettingError), match=message):
        convert_to_qlora(model, config, device="cpu")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not linear4bit_layers(model) and deferred_directory(model) is not None


def test_a_shard_missing_from_the_index_is_named(saved, tmp_path):
    directory = _copy(saved, "sharded", tmp_path)
    last = sorted(directory.glob("*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(
        WeightLoadError, match=rf"lists shards that are not in .*: {last.name} \({last.name} holds"
    ):
        empty_model(directory)
    with pytest.raises(SettingError, match=r"^model_name_or_path cannot be loaded: .*lists shards"):
        CausalLMModule(model_name_or_path=str(directory))


def test_a_truncated_file_is_named(saved, tmp_path):
    directory = _copy(saved, "sharded", tmp_path)
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(WeightLoadError, match=rf"{shard.name} cannot be read as safetensors.*truncated"):
        empty_model(directory)  # every header is read when the empty model is built


def test_a_shape_that_disagrees_with_the_config_is_named(saved, tmp_path):
    directory = _copy(saved, "tied", tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 96
    (directory / "config.json").write_text(json.dumps(config))
    _assert_refused(
        directory,
        r"6 tensors do not have the shapes .*config.json gives the model: model.safetensors: tensor "
        r"model.layers.0.mlp.gate_proj.weight has shape \[128, 64\] where the model has \[96, 64\], .* and 1 more",
    )


def _rewrite(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_keys_the_model_lacks_and_weights_the_files_lack_are_listed(saved, tmp_path):
    extra = _copy(saved, "tied", tmp_path / "a")
    _rewrite(extra, lambda t: t.update({f"model.extra_{i}.weight": torch.zeros(2) for i in range(7)}))
    _assert_refused(extra, r"hold 7 tensors the model .* does not have: model.extra_0.weight, .* and 2 more")
    missing = _copy(saved, "tied", tmp_path / "b")
    _rewrite(missing, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.1.")])
    _assert_refused(
        missing,
        r"9 of the model's weights are in none of its files \(model.safetensors\): "
        r"model.layers.1.\S+, .* and 4 more",
    )


def as_bin(source: Path, target: Path, legacy: bool = False) -> Path:
    """``source``'s model with each safetensors shard saved as a PyTorch ``.bin`` shard (and its index)."""
    target.mkdir()
    shutil.copy(source / "config.json", target)
    shards = sorted(source.glob("*.safetensors"))
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = "pytorch_model.bin" if len(shards) == 1 else f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        tensors = load_file(shard)
        torch.save(tensors, target / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return target


@pytest.mark.parametrize("kind", ["sharded", "tied"])
def test_a_bin_only_directory_streams_to_the_model_of_its_safetensors(saved, tmp_path, kind):
    """``.bin`` files (zip format) are mapped with torch.load(mmap=True, weights_only=True) and
    streamed like safetensors: the same 4-bit model, bit for bit."""
    directory = as_bin(saved[kind], tmp_path / "bin")
    want = _streamed(saved[kind])[0].state_dict()
    model, report = _streamed(directory)
    got = model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key
    assert report.files == len(list(directory.glob("*.bin"))) == len(list(saved[kind].glob("*.safetensors")))


def test_a_legacy_bin_file_says_how_to_convert(saved, tmp_path):
    directory = as_bin(saved["tied"], tmp_path / "legacy", legacy=True)
    with pytest.raises(
        WeightLoadError,
        match=r"legacy format written before torch 1.6 .*Convert the model once: python -c .*save_pretrained",
    ):
        empty_model(directory)
    truncated = as_bin(saved["tied"], tmp_path / "truncated")
    weights = truncated / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightLoadError, match=r"pytorch_model.bin cannot be read as a PyTorch weight file"):
        empty_model(truncated)


def test_a_failure_halfway_leaves_the_model_empty(saved, tmp_path):
    from bitsandbytes.utils import pack_dict_to_tensor, unpack_tensor_to_dict

    directory = _copy(saved, "prequantized", tmp_path)
    key = "model.layers.1.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"

    def damage(tensors):
        state = unpack_tensor_to_dict(tensors[key])
        del state["blocksize"]  # the shape is still there: it passes the header checks
        tensors[key] = pack_dict_to_tensor(state)

    _rewrite(directory, damage)
    _assert_refused(directory, rf"model.safetensors: tensor {key}: the 4-bit layer .* cannot be rebuilt")


def test_plain_strategy_loads_the_directory_in_bfloat16(saved):
    module = CausalLMModule(model_name_or_path=str(saved["tied"]))
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, DataLoader(_batches(), batch_size=2))
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}
    assert not linear4bit_layers(module.model)


# --- the other front doors: Fabric and Accelerate stream the same way -------------------------------


def test_fabric_and_accelerate_fill_an_empty_model_from_its_files(saved):
    import accelerate
    from lightning.fabric import Fabric

    from lightning_paged.accelerate import prepare_paged_qlora
    from lightning_paged.fabric import PagedQLoRAFabricStrategy

    want = _load_then_convert(saved["sharded"]).state_dict()
    fabric = Fabric(accelerator="cpu", devices=1, strategy=PagedQLoRAFabricStrategy(SETTINGS))
    torch.manual_seed(7)
    fabric_model = fabric.setup_module(empty_model(saved["sharded"]))
    assert "streamed from" in fabric.strategy.conversion_report.summary()
    torch.manual_seed(7)
    prepared = prepare_paged_qlora(accelerate.Accelerator(cpu=True), empty_model(saved["sharded"]), SETTINGS)
    for model in (fabric_model.module, prepared.model):
        got = model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want if "lora_" not in k)  # same 4-bit base


# --- mixture of experts through the Lightning strategy ----------------------------------------------


def test_strategy_streams_a_mixtral_directory_with_4bit_experts_and_resumes_their_adapters(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_paged.testing import tiny_config

    directory = tmp_path / "mixtral"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("mixtral", vocab_size=VOCAB)).to(
        torch.bfloat16
    ).save_pretrained(directory)

    def fit(max_steps: int, ckpt_path: Path | None = None):
        module = CausalLMModule(model_name_or_path=str(directory))
        strategy = PagedQLoRAStrategy(lora_dropout=0.0, lora_on_experts=True)
        trainer = quiet_trainer(strategy=strategy, max_steps=max_steps)
        trainer.fit(module, DataLoader(_batches(), batch_size=2), ckpt_path=ckpt_path)
        return trainer, module, strategy

    trainer, module, strategy = fit(1)
    report = strategy.conversion_report
    assert report is not None
    assert report.expert_tensors == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    assert (
        "expert parameters in 4-bit" in report.summary() and "LoRA on experts.down_proj" in report.summary()
    )
    assert (
        strategy.fingerprint.base.kind == "files" and strategy.fingerprint.settings["lora_on_experts"] is True
    )
    trainer.save_checkpoint(tmp_path / "step1.ckpt")
    saved = torch.load(tmp_path / "step1.ckpt", weights_only=False)["state_dict"]
    assert any(".experts.lora_B.default." in k for k in saved) and not any(
        ".experts.gate_up_proj" in k for k in saved
    )
    trained = {k: v for k, v in module.state_dict().items() if ".experts.lora_" in k}

    resumed_trainer, resumed, _ = fit(2, tmp_path / "step1.ckpt")
    assert resumed_trainer.global_step == 2
    moved = {k: v for k, v in resumed.state_dict().items() if ".experts.lora_B" in k}
    assert moved and all(not torch.equal(v, trained[k]) for k, v in moved.items())


def test_a_model_transformers_cannot_build_as_a_causal_lm_is_refused_by_name(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(
        WeightLoadError,
        match=r"is a 't5' model \(T5Config\), which transformers does not build as a causal .*llama",
    ):
        empty_model(tmp_path / "t5")
    with pytest.raises(SettingError, match=r"^model_name_or_path cannot be loaded: .*'t5' model"):
        CausalLMModule(model_name_or_path=str(tmp_path / "t5"))
