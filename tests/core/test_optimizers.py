"""The optimizer factory: names, settings, parameter groups, schedules, state round trips."""

from __future__ import annotations

import io
import math
import warnings

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from lightning_paged.core import paging
from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import (
    OPTIMIZERS,
    OptimizerConfig,
    build_optimizer,
    build_scheduler,
    lr_factor,
    param_groups,
)

# name -> (bitsandbytes class, state bits, paged), written out from transformers' and Ludwig's docs
EXPECTED = {
    "adamw_bnb_8bit": ("AdamW", 8, False),
    "adamw_8bit": ("AdamW", 8, False),
    "paged_adamw_32bit": ("AdamW", 32, True),
    "paged_adamw_8bit": ("AdamW", 8, True),
    "ademamix": ("AdEMAMix", 32, False),
    "ademamix_8bit": ("AdEMAMix", 8, False),
    "paged_ademamix_32bit": ("AdEMAMix", 32, True),
    "paged_ademamix_8bit": ("AdEMAMix", 8, True),
    "lion_32bit": ("Lion", 32, False),
    "lion_8bit": ("Lion", 8, False),
    "paged_lion_32bit": ("Lion", 32, True),
    "paged_lion_8bit": ("Lion", 8, True),
    "rmsprop_bnb": ("RMSprop", 32, False),
    "rmsprop_bnb_8bit": ("RMSprop", 8, False),
    "rmsprop_bnb_32bit": ("RMSprop", 32, False),
    "adam": ("Adam", 32, False),
    "adam_8bit": ("Adam", 8, False),
    "paged_adam": ("Adam", 32, True),
    "paged_adam_8bit": ("Adam", 8, True),
    "adamw": ("AdamW", 32, False),
    "paged_adamw": ("AdamW", 32, True),
    "lion": ("Lion", 32, False),
    "paged_lion": ("Lion", 32, True),
    "sgd": ("SGD", 32, False),
    "sgd_8bit": ("SGD", 8, False),
    "rmsprop": ("RMSprop", 32, False),
    "rmsprop_8bit": ("RMSprop", 8, False),
    "adagrad": ("Adagrad", 32, False),
    "adagrad_8bit": ("Adagrad", 8, False),
    "lamb": ("LAMB", 32, False),
    "lamb_8bit": ("LAMB", 8, False),
    "lars": ("LARS", 32, False),
    "lars_8bit": ("LARS", 8, False),
}


def _params(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def _run(optimizer, params, steps, start=0):
    for step in range(start, start + steps):
        for p, g in zip(params, _grads(params, step)):
            p.grad = g.clone()
        optimizer.step()


def test_the_table_holds_exactly_the_expected_names():
    assert set(OPTIMIZERS) == set(EXPECTED)


def test_every_bitsandbytes_name_of_transformers_is_known():
    trainer_optimizer = pytest.importorskip("transformers.trainer_optimizer")
    names = {str(n.value) for n in getattr(trainer_optimizer, "_BITSANDBYTES_OPTIMIZERS", [])}
    if not names:
        pytest.skip("this transformers keeps its bitsandbytes list elsewhere")
    assert names <= set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_builds_its_algorithm_bit_width_and_paging(name):
    algorithm, bits, paged = EXPECTED[name]
    params = _params((64, 64), (8,))  # 4,096 elements: the smallest size that gets 8-bit state
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer(name, params, lr=1e-3)
    assert isinstance(optimizer, getattr(bnb.optim, algorithm))
    assert optimizer.args.optim_bits == bits
    assert optimizer.is_paged is paged
    _run(optimizer, params, 1)
    state_dtype = optimizer.state[params[0]]["state1"].dtype
    assert state_dtype == (torch.uint8 if bits == 8 else torch.float32)


def test_paged_ademamix_32bit_steps_on_cpu_with_a_large_parameter():
    # bitsandbytes' own PagedAdEMAMix32bit fails on CPU; the name must still train there
    params = _params((320, 320))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer("paged_ademamix_32bit", params, lr=1e-3)
    before = params[0].detach().clone()
    _run(optimizer, params, 2)
    assert optimizer.state[params[0]]["state1"].shape == (2, 320, 320)
    assert not torch.equal(before, params[0])


def test_unknown_name_lists_valid_names_and_suggests_the_closest():
    with pytest.raises(SettingError) as info:
        build_optimizer("paged_adamw_8bits", _params((4, 4)))
    message = str(info.value)
    assert message.startswith("name is not an optimizer name (did you mean 'paged_adamw_8bit'?)")
    assert "paged_lion_32bit" in message and "rmsprop_bnb" in message
    assert message.endswith("got 'paged_adamw_8bits'")


def test_config_validation_names_the_setting():
    OptimizerConfig().validate()
    with pytest.raises(SettingError, match="did you mean 'lion_8bit'"):
        OptimizerConfig(name="lion8bit").validate()
    with pytest.raises(SettingError, match=r"^lr must be positive"):
        OptimizerConfig(lr=0.0).validate()
    with pytest.raises(SettingError, match=r"^betas must be two numbers"):
        OptimizerConfig(betas=(0.9, 1.5)).validate()
    with pytest.raises(SettingError, match=r"^warmup_steps"):
        OptimizerConfig(warmup_steps=-1).validate()


def test_a_dotted_class_path_and_a_callable_build_too():
    params = _params((4, 4))
    assert type(build_optimizer("torch.optim.SGD", params, lr=0.1)) is torch.optim.SGD
    built = build_optimizer(lambda ps, lr: torch.optim.Adam(ps, lr=lr), params, lr=0.1, eps=1e-6)
    assert type(built) is torch.optim.Adam
    class_path = build_optimizer("bitsandbytes.optim.PagedLion8bit", params, lr=0.1)
    assert type(class_path) is bnb.optim.PagedLion8bit and class_path.is_paged
    with pytest.raises(SettingError, match="names nothing importable"):
        build_optimizer("torch.optim.NoSuchOptimizer", params)


def test_common_settings_an_algorithm_lacks_are_dropped_other_unknown_ones_refused():
    params = _params((4, 4))
    lion = build_optimizer("lion_32bit", params, lr=0.1, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.0)
    assert lion.param_groups[0]["betas"] == (0.8, 0.9)
    ademamix = build_optimizer("ademamix", params, betas=(0.8, 0.9))
    assert tuple(ademamix.param_groups[0]["betas"]) == (0.8, 0.9, 0.9999)
    sgd = build_optimizer("sgd", params, lr=0.1, betas=(0.9, 0.99))
    assert sgd.param_groups[0]["betas"][0] == 0.9  # bitsandbytes keeps momentum as betas[0]
    with pytest.raises(SettingError, match=r"^momentm is not a setting of AdamW"):
        build_optimizer("adamw", params, momentm=0.9)
    with pytest.raises(SettingError, match="is set by the optimizer name"):
        build_optimizer("paged_adamw_8bit", params, optim_bits=32)
    with pytest.raises(SettingError, match="cannot be built"):
        build_optimizer("sgd", params, lr=0.1, momentum=0.0)


def test_param_groups_skip_frozen_and_spare_biases_and_norms():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    model[2].weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[2].bias),
    }
    single = param_groups(model.named_parameters(), weight_decay=0.0)
    assert len(single) == 1 and len(single[0]["params"]) == 5


def _lrs(scheduler_name, warmup, total, steps):
    optimizer = torch.optim.SGD(_params((2,)), lr=1.0)
    scheduler = build_scheduler(optimizer, scheduler_name, warmup, total)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_scheduler_learning_rates_over_steps():
    assert _lrs("constant", 2, None, 5) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert _lrs("linear", 2, 6, 6) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])
    cos = 0.5 * (1 + math.cos(math.pi / 4))
    assert _lrs("cosine", 2, 6, 6) == pytest.approx([1 / 3, 2 / 3, 1.0, cos, 0.5, 1 - cos])
    assert _lrs("linear", 0, 4, 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_factor(10, "cosine", 0, 4) == 0.0


def test_decaying_schedules_need_the_number_of_steps():
    optimizer = torch.optim.SGD(_params((2,)), lr=1.0)
    with pytest.raises(SettingError, match="needs a known number of training steps"):
        build_scheduler(optimizer, "cosine", 0, float("inf"))
    with pytest.raises(SettingError, match=r"^warmup_steps must be smaller"):
        build_scheduler(optimizer, "linear", 10, 10)


def test_warmup_ratio_is_a_fraction_of_the_steps_known_when_the_schedule_is_built():
    assert OptimizerConfig(warmup_ratio=0.1).warmup(50) == 5
    assert OptimizerConfig(warmup_ratio=0.03).warmup(100) == 3
    assert OptimizerConfig(warmup_ratio=0.25).warmup(7) == 2  # ceil(1.75), as transformers counts
    assert OptimizerConfig(warmup_ratio=0.99).warmup(4) == 3  # never the whole run
    assert OptimizerConfig(warmup_steps=3).warmup(None) == 3
    with pytest.raises(
        SettingError, match=r"^warmup_ratio needs a known number of training steps \(got inf\)"
    ):
        OptimizerConfig(warmup_ratio=0.1).warmup(float("inf"))
    with pytest.raises(
        SettingError, match=r"^warmup_ratio and warmup_steps \(2\) both set the warmup: give one"
    ):
        OptimizerConfig(warmup_ratio=0.1, warmup_steps=2).validate()
    with pytest.raises(SettingError, match=r"^warmup_ratio must be a fraction in \[0, 1\)"):
        OptimizerConfig(warmup_ratio=1.5).validate()


@pytest.mark.parametrize(
    "name", ["paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "paged_ademamix_8bit"]
)
def test_state_dict_round_trip_continues_exactly_like_an_uninterrupted_run(name):
    shapes = ((64, 96), (128,), (32, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = _params(*shapes)
        optimizer = build_optimizer(name, params, lr=1e-2, weight_decay=0.01)
        _run(optimizer, params, 3)
        buffer = io.BytesIO()
        torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
        _run(optimizer, params, 3, start=3)

        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
        optimizer2 = build_optimizer(name, resumed, lr=1e-2, weight_decay=0.01)
        optimizer2.load_state_dict(saved["optimizer"])
        _run(optimizer2, resumed, 3, start=3)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_paged_adamw_32bit_tracks_torch_adamw():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _params((32, 48), (48,))
        reference = [nn.Parameter(p.detach().clone()) for p in ours]
        optimizer = build_optimizer("paged_adamw_32bit", ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
        torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
        _run(optimizer, ours, 10)
        _run(torch_adamw, reference, 10)
    for a, b, start in zip(ours, reference, _params((32, 48), (48,))):
        assert (a - start).abs().max() > 0.05  # ten steps of 1e-2 moved it
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_on_cpu_a_paged_name_warns_once_per_run(monkeypatch):
    monkeypatch.setattr(paging, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("paged_adamw_8bit", "paged_lion_32bit", "paged_adamw_8bit"):
            params = _params((64, 64), (200, 600), (16,))
            optimizer = build_optimizer(name, params, lr=1e-3)
            _run(optimizer, params, 2)
    messages = [str(w.message) for w in caught]
    ours = [m for m in messages if "paging unavailable on cpu" in m]
    assert len(ours) == 1, messages
    assert ours[0].startswith(
        "paged_adamw_8bit: paging unavailable on cpu; optimizer state stays in ordinary memory"
    )
    assert not [m for m in messages if "Paged optimizers are not supported on CPU" in m]


def _names_table() -> str:
    rows = ["| name | builds | state | paged | spelled by |", "| --- | --- | --- | --- | --- |"]
    for name, spec in OPTIMIZERS.items():
        args = [f"optim_bits={spec.bits}", *(["is_paged=True"] if spec.paged else [])]
        args += [f"{key}={value}" for key, value in spec.defaults]
        paged = "yes" if spec.paged else "no"
        rows.append(
            f"| `{name}` | `{spec.algorithm}({', '.join(args)})` | {spec.bits}-bit | {paged} | {spec.origin} |"
        )
    return "\n".join(rows)


def test_the_docs_list_every_name_as_the_table_builds_it():
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "optimizers.md").read_text()
    table = _names_table()
    assert table in docs, f"docs/optimizers.md needs this names table:\n{table}"
