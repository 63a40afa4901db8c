"""The dry run: the converted model on fake tensors is the real conversion's, and a few blocks stand for all."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.plan import plan_memory, resolve_model_config
from lightning_paged.core.plan.engine import DryRun, scalable, scaled, with_layers
from lightning_paged.core.plan.fake import fake_mode, fake_qlora_model, is_fake
from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora
from lightning_paged.testing import tiny_llama_config

QLORA = QLoRAConfig(compute_dtype="float32", lora_dropout=0.0)


def _shapes(model: torch.nn.Module) -> dict[str, tuple]:
    out = {}
    for name, param in model.named_parameters():
        out[name] = (tuple(param.shape), param.dtype, param.requires_grad)
        state = getattr(param, "quant_state", None)
        if state is not None:
            out[name + ".absmax"] = (tuple(state.absmax.shape), state.absmax.dtype)
            out[name + ".nested"] = (tuple(state.state2.absmax.shape), state.offset.dtype)
    return out


def test_the_fake_model_has_the_real_conversions_layers_shapes_and_dtypes():
    config = tiny_llama_config()
    real = AutoModelForCausalLM.from_config(config)
    convert_to_qlora(real, QLORA, device="cpu")
    mode = fake_mode()
    with mode:
        fake = fake_qlora_model(config, QLORA, mode)
    assert _shapes(fake) == _shapes(real)
    assert all(is_fake(p) for p in fake.parameters())
    layers = [m for m in fake.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(m.weight.quant_state is m.quant_state for m in layers)


def test_a_deep_model_is_its_two_and_three_block_runs_scaled():
    config = tiny_llama_config(num_hidden_layers=5)
    assert scalable(config) and not scalable(tiny_llama_config(num_hidden_layers=3))
    optimizer = OptimizerConfig()
    runs = {n: DryRun(with_layers(config, n), QLORA, optimizer, target="cpu") for n in (2, 3, 5)}
    for length in (16, 48):
        small, large, whole = (runs[n].measure(2, length) for n in (2, 3, 5))
        assert scaled(small, large, 5) == whole  # to the byte


def test_layer_types_that_differ_make_the_whole_model_run():
    config = tiny_llama_config(num_hidden_layers=6)
    config.layer_types = ["full_attention", "sliding_attention"] * 3
    assert not scalable(config)
    cut = with_layers(config, 2)
    assert cut.layer_types == ["full_attention", "sliding_attention"] and cut.num_hidden_layers == 2


def test_a_config_comes_from_a_dict_a_directory_or_a_config_file(tmp_path):
    config = tiny_llama_config()
    config.save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json", config.to_dict(), config):
        assert resolve_model_config(source).hidden_size == 64
    with pytest.raises(SettingError, match="model_config is neither a model directory"):
        resolve_model_config(tmp_path / "missing")
    with pytest.raises(SettingError, match="model_config.model_type must name a transformers model type"):
        resolve_model_config({"model_type": "lama", "hidden_size": 8})


def test_bad_plan_settings_are_named():
    config = tiny_llama_config()
    with pytest.raises(SettingError, match="batch_size must be a positive whole number"):
        plan_memory(config, batch_size=0)
    with pytest.raises(SettingError, match="target must be one of cuda, cpu"):
        plan_memory(config, target="tpu")  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="qlora.lora_r must be a positive integer"):
        plan_memory(config, qlora={"lora_r": 0})
    with pytest.raises(SettingError, match="optimizer.name"):
        plan_memory(config, optimizer={"name": "adamw_9bit"})
