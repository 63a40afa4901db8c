"""Where a long step's memory goes: the sizes read from a model and its optimizer, scaled to the tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import LlamaForCausalLM

from lightning_paged.core.eviction.breakdown import MemoryBreakdown, memory_breakdown
from lightning_paged.core.eviction.summary import summarize
from lightning_paged.core.optimizers import build_optimizer
from lightning_paged.core.paging import PagingPolicy
from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora
from lightning_paged.core.units import format_bytes
from lightning_paged.testing import HostMemory

LLAMA_8B = dict(
    vocab_size=128_256,
    hidden_size=4096,
    intermediate_size=14_336,
    num_layers=32,
    compute_bytes=2,
    weights_bytes=6 * 2**30,
    trainable_bytes=42_000_000 * 4,
    optimizer_state_bytes=84_000_000,
    paged_state_bytes=84_000_000,
)


def test_at_16k_tokens_the_logits_dominate_a_standard_step_and_vanish_from_a_chunked_one():
    standard = dict((name, n) for name, n, _ in MemoryBreakdown(**LLAMA_8B).parts(16_384))
    logits = standard["logits, their float32 copy and gradient (standard loss)"]
    assert logits == 16_384 * 128_256 * (2 * 2 + 8)  # 25 GB: bf16 logits, float32 copy and gradient
    assert standard["checkpointed layer inputs"] == 32 * 16_384 * 4096 * 2  # 4.3 GB
    assert logits > 5 * standard["checkpointed layer inputs"] > 100 * standard["optimizer state"]
    chunked = MemoryBreakdown(**LLAMA_8B, loss="chunked", chunk_size=256, offload=True)
    rows = {name: (n, where) for name, n, where in chunked.parts(16_384)}
    n, where = rows["logits, 256 tokens at a time (chunked loss)"]
    assert n == 256 * 128_256 * (2 * 2 + 4) and "the standard loss would take 23.5 GiB" in where
    assert rows["checkpointed layer inputs"][1] == "host memory (offload_activations)"
    text = chunked.render(16_384)
    assert "Paging can absorb at most the 80.1 MiB of paged optimizer state" in text
    assert "16,384" in text


def test_sizes_come_from_the_model_and_the_optimizer_state_never_its_contents():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    convert_to_qlora(model, QLoRAConfig(compute_dtype="float32", lora_r=4), device="cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    policy = PagingPolicy(memory=HostMemory(), page_small=True)
    policy.pool.slab_bytes = 2**20
    optimizer = build_optimizer("paged_adamw_32bit", trainable, paging=policy, lr=1e-3)
    for p in trainable:
        p.grad = torch.ones_like(p)
    optimizer.step()
    breakdown = memory_breakdown(model, [optimizer], loss="chunked", chunk_size=32)
    assert breakdown is not None
    config = tiny_llama_config()
    assert (breakdown.vocab_size, breakdown.hidden_size, breakdown.num_layers) == (128, 64, 2)
    assert breakdown.intermediate_size == config.intermediate_size and breakdown.compute_bytes == 4
    assert breakdown.trainable_bytes == sum(p.numel() * 4 for p in trainable)
    assert breakdown.optimizer_state_bytes == breakdown.paged_state_bytes == 2 * breakdown.trainable_bytes
    assert breakdown.checkpointing and not breakdown.offload
    assert memory_breakdown(torch.nn.Linear(2, 2), []) is None  # no transformers config: nothing to say


def test_the_summary_prints_the_breakdown_for_its_step_with_the_most_tokens():
    records = [
        {
            "step": i,
            "seq_len": n,
            "tokens": n,
            "long_sequence": n > 100,
            "step_s": 0.1,
            "rank": 0,
            "source": "none",
        }
        for i, n in enumerate([64, 512, 128])
    ]
    unmeasured = ("longest_example", "evicted_bytes", "paged_in_bytes", "gpu_page_faults", "thrashing_events")
    unmeasured += ("optimizer_step_s", "device_free_bytes", "alloc_retries", "ooms", "paged_capacity_bytes")
    defaults = dict.fromkeys(unmeasured)
    summary = summarize(
        [{**defaults, **r, "paged_bytes_total": 0, "estimated": False, "run": "a"} for r in records]
    )
    assert summary.most_tokens == 512
    assert "where the memory" not in summary.render()
    summary.memory = MemoryBreakdown(**LLAMA_8B).to_dict()
    text = summary.render()
    assert "where the memory of the step with the most tokens (512) goes" in text
    assert format_bytes(512 * 128_256 * 12) in text
    assert type(summary).from_dict(summary.to_dict()).render() == text


@pytest.mark.parametrize("checkpointing", [True, False])
def test_without_checkpointing_every_block_keeps_its_activations(checkpointing):
    rows = dict((n, b) for n, b, _ in MemoryBreakdown(**LLAMA_8B, checkpointing=checkpointing).parts(1000))
    assert ("checkpointed layer inputs" in rows) == checkpointing
    assert ("every block's activations (no checkpointing)" in rows) != checkpointing
