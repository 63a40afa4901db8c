"""A ``target="cpu"`` plan against the same training step run for real on the CPU, counted the same way.

Three model sizes (all deeper than the 3 blocks a plan runs, so the scaling is part of what is
checked) x three sequence lengths x a paged and an unpaged optimizer, each within 5 %.
``bench/plan_accuracy.py`` writes the same comparison as a table.
"""

from __future__ import annotations

import pytest

from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.plan import RealRun, plan_memory
from lightning_paged.core.plan.engine import scalable
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.testing import HostMemory, tiny_llama_config

SIZES = {
    "h32x4": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "h64x5": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "h96x6": dict(
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=3,
    ),
}
LENGTHS = (32, 64, 128)
TOLERANCE = 0.05
QLORA = QLoRAConfig(compute_dtype="float32", lora_dropout=0.0)


# Every size paged; the unpaged optimizer (its state counted on the device, not paged) on the
# smallest: what paging changes in the plan does not depend on the width (bench/memory_plan.py
# publishes the whole grid).
CASES = [(size, "paged_adamw_8bit") for size in SIZES] + [(next(iter(SIZES)), "adamw_8bit")]


@pytest.mark.parametrize(("size", "optimizer"), CASES)
def test_cpu_plan_is_within_5_percent_of_the_measured_step(size, optimizer):
    config = tiny_llama_config(vocab_size=384, max_position_embeddings=256, **SIZES[size])
    assert scalable(config)
    settings = OptimizerConfig(name=optimizer)
    plan = plan_memory(
        config,
        qlora=QLORA,
        optimizer=settings,
        batch_size=2,
        seq_len=LENGTHS[-1],
        seq_lens=LENGTHS,
        target="cpu",
        search=False,
    )
    planned = {p.seq_len: p.peak_bytes for p in plan.by_seq_len}
    run = RealRun(config, QLORA, settings, memory=HostMemory())
    errors = {length: planned[length] / run.measure(2, length).peak_bytes - 1 for length in LENGTHS}
    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors
    assert planned[32] < planned[64] < planned[128]  # the lengths were really planned apart
