"""``plan_memory``: the verdict against the device, what paging absorbs, the longest sequence, ranks, the JSON."""

from __future__ import annotations

import json

import pytest

from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.plan import COMPONENTS, plan_memory
from lightning_paged.testing import tiny_llama_config

# 32-bit paged AdamW at rank 64: the paged state is a sizeable part of a tiny model's step.
SETTINGS = dict(
    qlora={"compute_dtype": "float32", "lora_dropout": 0.0, "lora_r": 64, "lora_alpha": 64},
    optimizer=OptimizerConfig(name="paged_adamw", page_adapters=True),
    batch_size=2,
    context_bytes=0,
)
CONFIG = tiny_llama_config(num_hidden_layers=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def unbounded():
    return plan_memory(CONFIG, seq_len=128, **SETTINGS)


def test_without_device_memory_the_plan_says_nothing_about_fitting(unbounded):
    plan = unbounded
    assert plan.fits is None and plan.fits_with_paging is None and plan.longest_seq_len is None
    assert plan.peak_bytes == sum(plan.components.values())
    assert set(plan.components) <= set(COMPONENTS)
    for key in (
        "weights_4bit",
        "quant_constants",
        "weights_other",
        "lora_weights",
        "optimizer_paged",
        "allocator_slack",
    ):
        assert plan.components[key] > 0, key
    assert plan.paged_bytes == plan.components["optimizer_paged"]


def test_a_step_that_fits_only_once_paged_state_is_evicted(unbounded):
    point = unbounded.by_seq_len[0]
    assert point.phase in ("forward", "backward")
    device = unbounded.peak_bytes - unbounded.paged_bytes // 2
    plan = plan_memory(CONFIG, seq_len=128, device_memory=device, search=False, **SETTINGS)
    assert plan.fits is False and plan.fits_with_paging is True
    assert plan.evicted_bytes == plan.peak_bytes - device
    assert plan.pcie_seconds == pytest.approx(2 * plan.evicted_bytes / 12e9)
    assert "fits only with paging" in plan.render()
    too_small = plan_memory(
        CONFIG, seq_len=128, device_memory=point.peak_without_paged_bytes - 1, search=False, **SETTINGS
    )
    assert too_small.fits is False and too_small.fits_with_paging is False and too_small.evicted_bytes == 0


def test_the_longest_sequence_fits_and_a_little_more_does_not(unbounded):
    device = unbounded.peak_bytes  # exactly what 128 tokens need with every paged byte resident
    plan = plan_memory(CONFIG, seq_len=64, device_memory=device, **SETTINGS)
    longest, without = plan.longest_seq_len, plan.longest_seq_len_without_paging
    assert plan.fits is True and 128 <= without <= longest < plan.max_seq_len
    check = plan_memory(
        CONFIG, seq_len=longest, seq_lens=(without, without + 16, longest + 16), search=False, **SETTINGS
    )
    at = {p.seq_len: p for p in check.by_seq_len}
    assert at[without].peak_bytes <= device < at[without + 16].peak_bytes
    assert at[longest].peak_without_paged_bytes <= device < at[longest + 16].peak_without_paged_bytes


def test_the_json_names_every_field_of_the_issue(unbounded):
    data = json.loads(json.dumps(unbounded.to_dict()))
    for key in (
        "peak_bytes",
        "components",
        "paged_bytes",
        "fits",
        "fits_with_paging",
        "longest_seq_len",
        "longest_seq_len_without_paging",
        "by_seq_len",
    ):
        assert key in data, key
    assert set(data["by_seq_len"][0]) >= {"seq_len", "peak_bytes", "evicted_bytes"}


def test_ranks_share_what_fsdp_shards_and_ddp_adds_its_buckets(unbounded):
    fsdp = plan_memory(CONFIG, seq_len=128, world_size=2, sharded=True, **SETTINGS).components
    ddp = plan_memory(CONFIG, seq_len=128, world_size=2, **SETTINGS).components
    one = unbounded.components
    assert fsdp["weights_4bit"] == pytest.approx(one["weights_4bit"] / 2, abs=1)
    assert fsdp["quant_constants"] == one["quant_constants"]  # kept whole on every rank
    assert fsdp["fsdp_gathered"] > 0
    assert ddp["ddp_buckets"] == one["lora_weights"] and ddp["weights_4bit"] == one["weights_4bit"]


def test_a_plan_that_does_not_fit_names_the_levers(unbounded):
    plan = plan_memory(CONFIG, seq_len=256, device_memory=unbounded.peak_bytes, **SETTINGS)
    assert plan.fits_with_paging is False
    text = "\n".join(plan.levers)
    assert "sequence length: at most" in text and "activation offloading" in text
    assert plan.levers[0].startswith("sequence length")
