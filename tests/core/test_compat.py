"""The fence around torch, transformers, PEFT and bitsandbytes internals holds on the installed versions.

Each test reads the private through its fence function on a real object of the installed library;
a release that moves one fails here, by name, before it fails a run.
"""

from __future__ import annotations

import inspect
import types

import pytest
import torch
from torch import nn

from lightning_paged.core import compat
from lightning_paged.core.compat import bitsandbytes as bnb_compat
from lightning_paged.core.compat import peft as peft_compat
from lightning_paged.core.compat import torch as torch_compat
from lightning_paged.core.compat import transformers as transformers_compat


def test_a_missing_internal_fails_naming_the_library_the_attribute_and_the_version_read_from():
    with pytest.raises(compat.CompatError) as err:
        compat.require(
            types.SimpleNamespace(), "_data_fetcher", "lightning", "2.6.6", "pytorch/loops/fit_loop.py"
        )
    message = str(err.value)
    assert "lightning" in message and "SimpleNamespace._data_fetcher" in message
    assert "2.6.6" in message and "pytorch/loops/fit_loop.py" in message
    assert compat.installed("lightning") in message
    assert isinstance(err.value, AttributeError)


def test_read_from_is_the_installed_version():
    for module, distribution in (
        (torch_compat, "torch"),
        (transformers_compat, "transformers"),
        (peft_compat, "peft"),
        (bnb_compat, "bitsandbytes"),
    ):
        assert compat.installed(distribution).split("+")[0] == module.READ_FROM, distribution


def test_torch_last_lr_and_own_parameters_and_buffers():
    layer = nn.BatchNorm1d(2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch_compat.set_last_lr(scheduler, [0.5, 0.5])
    assert scheduler.get_last_lr() == [0.5, 0.5]
    weight = nn.Parameter(torch.ones(2))
    torch_compat.own_parameters(layer)["weight"] = weight
    assert layer.weight is weight
    assert set(torch_compat.own_buffers(layer)) == {"running_mean", "running_var", "num_batches_tracked"}


def test_torch_profiler_flag_follows_a_profiler_session():
    assert not torch_compat.profiler_active()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert torch_compat.profiler_active()
    assert not torch_compat.profiler_active()


def test_torch_allocator_stats_probe_exists_where_cuda_is_built():
    stats_probe = getattr(torch._C, "_cuda_memoryStats", None)
    if torch.cuda.is_available():
        assert isinstance(torch_compat.cuda_allocator_stats(0), dict)
    else:
        assert stats_probe is None or callable(stats_probe)


def test_transformers_model_internals():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    assert transformers_compat.no_split_modules(model) == {"LlamaDecoderLayer"}
    assert transformers_compat.attn_implementation(model) in ("eager", "sdpa")
    assert isinstance(transformers_compat.keys_to_ignore_on_load(model, "unexpected"), list)
    assert hasattr(model, "_keys_to_ignore_on_load_missing")


def test_peft_reads_the_4bit_mark_where_the_fence_says():
    from peft.tuners.lora import model as lora_model

    assert f'"{peft_compat.LOADED_IN_4BIT}"' in inspect.getsource(lora_model)
    module = nn.Linear(2, 2)
    peft_compat.mark_loaded_in_4bit(module)
    assert getattr(module, peft_compat.LOADED_IN_4BIT) is True
    peft_compat.unmark_loaded_in_4bit(module)
    assert not hasattr(module, peft_compat.LOADED_IN_4BIT)


def test_bitsandbytes_internals_exist():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    assert callable(F._convert_weight_packed_for_cpu_inverse)
    assert callable(bnb.optim.AdEMAMix._get_state_double_buffer)
    optimizer = bnb.optim.AdEMAMix([nn.Parameter(torch.ones(2))], lr=0.1)
    bnb_compat.route_double_state_buffer(optimizer, lambda self, p, dtype=torch.float32: "routed")
    assert optimizer._get_state_double_buffer(None) == "routed"
