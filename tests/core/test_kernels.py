"""Which names bitsandbytes can run 8-bit on CUDA, decided from its own CUDA kernel table."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_paged.core.errors import SettingError
from lightning_paged.core.kernels import (
    CUDA_ALGORITHMS_0_50,
    TABLES,
    cuda_8bit_refusal,
    cuda_algorithms,
)
from lightning_paged.core.optimizers import OPTIMIZERS, build_optimizer, refuse_missing_cuda_kernels

CUDA = torch.device("cuda", 0)


def _cuda_ops_source() -> str:
    spec = importlib.util.find_spec("bitsandbytes")
    assert spec is not None and spec.submodule_search_locations
    return (Path(next(iter(spec.submodule_search_locations))) / "backends" / "cuda" / "ops.py").read_text()


def _params(*shapes):
    return [nn.Parameter(torch.zeros(*s)) for s in shapes]


def test_the_tables_are_those_of_the_installed_cuda_backend():
    tree = ast.parse(_cuda_ops_source())
    tables = {
        t.id: {k.value for k in node.value.keys}
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    for bits, name in TABLES.items():
        kernels, where = cuda_algorithms(bits)
        assert kernels == tables[name]
        cpu_build_reads = "the source of bitsandbytes/backends/cuda/ops.py"  # importing it fails there
        assert where == ("bitsandbytes.backends.cuda.ops" if torch.cuda.is_available() else cpu_build_reads)
    # the documented last resort is bitsandbytes 0.50.2's table
    assert (
        cuda_algorithms(8)[0] == CUDA_ALGORITHMS_0_50[8]
        and cuda_algorithms(32)[0] == CUDA_ALGORITHMS_0_50[32]
    )


@pytest.mark.parametrize(
    ("name", "refused"),
    [
        ("lamb_8bit", "lamb"),
        ("lars_8bit", "lars"),
        ("adamw_8bit", None),
        ("paged_lion_8bit", None),
        ("lamb", None),
    ],
)
def test_refusal_is_decided_per_device_from_the_table(name, refused):
    optimizer = build_optimizer(name, _params((64, 64)), lr=1e-3)  # built on the CPU, where all of them run
    assert cuda_8bit_refusal(optimizer) is None
    assert cuda_8bit_refusal(optimizer, torch.device("cpu")) is None
    assert cuda_8bit_refusal(optimizer, CUDA) == refused


def test_parameters_below_min_8bit_size_keep_32bit_state_and_run_anywhere():
    optimizer = build_optimizer("lamb_8bit", _params((63, 64), (10,)), lr=1e-3)  # 4,032 < 4,096 elements
    assert cuda_8bit_refusal(optimizer, CUDA) is None


def test_every_8bit_name_but_lamb_and_lars_runs_on_cuda():
    runs = {}
    for name, spec in OPTIMIZERS.items():
        if spec.bits == 8:
            runs[name] = cuda_8bit_refusal(build_optimizer(name, _params((64, 64)), lr=1e-3), CUDA) is None
    assert {n for n, ok in runs.items() if not ok} == {"lamb_8bit", "lars_8bit"}


@pytest.mark.parametrize(
    ("name", "instead"), [("lamb_8bit", "'lamb' or 'adamw_8bit'"), ("lars_8bit", "'lars' or 'sgd_8bit'")]
)
def test_the_error_names_the_setting_and_the_nearest_names_that_run(name, instead):
    optimizer = build_optimizer(name, _params((64, 64)), lr=1e-3)
    with pytest.raises(SettingError) as caught:
        refuse_missing_cuda_kernels(optimizer, name, CUDA)
    err = caught.value
    assert err.setting == "name" and err.value == name
    assert f"use {instead}" in str(err) and "not for '" + name.removesuffix("_8bit") + "'" in str(err)
    assert str(err.located("model.init_args.optimizer.")).startswith(
        "model.init_args.optimizer.name cannot train"
    )
    for suggestion in instead.replace("'", "").split(" or "):  # the suggestions do run on CUDA
        other = build_optimizer(suggestion, _params((64, 64)), lr=1e-3)
        refuse_missing_cuda_kernels(other, suggestion, CUDA)


def test_a_class_path_is_checked_too():
    optimizer = build_optimizer("bitsandbytes.optim.LAMB8bit", _params((64, 64)), lr=1e-3)
    with pytest.raises(SettingError, match="not for 'lamb'"):
        refuse_missing_cuda_kernels(optimizer, "bitsandbytes.optim.LAMB8bit", CUDA)


def test_zero_element_parameters_never_reach_bitsandbytes():
    empty, weight = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.ones(64, 64))
    groups = [{"params": [empty], "weight_decay": 0.0}, {"params": [weight, nn.Parameter(torch.zeros(4, 0))]}]
    optimizer = build_optimizer("paged_adamw_8bit", groups, lr=1e-2)
    assert [[p is weight for p in g["params"]] for g in optimizer.param_groups] == [[True]]
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert optimizer.state[weight] and weight.ne(1).all()
    with pytest.raises(SettingError, match="no trainable parameters"):
        build_optimizer("adamw_8bit", [nn.Parameter(torch.zeros(0))], lr=1e-2)


@pytest.mark.requires_cuda
def test_cuda_lamb_8bit_is_refused_before_its_first_step():
    with pytest.raises(SettingError, match="cannot train on a CUDA GPU"):
        build_optimizer("lamb_8bit", [nn.Parameter(torch.zeros(64, 64, device="cuda"))], lr=1e-3)
