"""What a CUDA plan adds to the CPU dry run: each term on its own, with the numbers its source gives."""

from __future__ import annotations

import gc

import bitsandbytes as bnb
import torch

from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.plan import cuda
from lightning_paged.core.plan.counter import WORKSPACE, LiveBytes
from lightning_paged.core.plan.engine import DryRun
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.testing import tiny_llama_config

MIB = 1 << 20


def _linear4bit(n: int, k: int) -> torch.nn.Module:
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(n, k), requires_grad=False, quant_type="nf4").to("cpu")
    layer.support_avx512bf16_for_cpu = False
    return layer


def test_the_4bit_matmul_adds_its_dequantized_weight_and_block_maxima_beyond_four_rows():
    n, k = 256, 128
    layer = _linear4bit(n, k)
    blocks = n * k // 64
    for rows, expected in ((4, 0), (5, n * k * 4 + 2 * blocks * 4)):
        counter = LiveBytes(workspace=cuda.workspace)
        x = torch.randn(rows, k, requires_grad=True)
        with counter, counter.in_phase("forward"):
            out = layer(x)
        assert counter.peaks["forward"].by_category.get(WORKSPACE, 0) == expected
        del out
        gc.collect()


def test_flash_backward_workspace_follows_mha_bwd():
    query = torch.empty(2, 8, 100, 64)
    key = value = torch.empty(2, 2, 100, 64)
    softmax_d = 2 * 8 * 128 * 4  # length rounded to 128, float32
    dq_accum = 2 * 128 * 8 * 64 * 4  # head size 64 is a multiple of 32
    expanded = 2 * (2 * 100 * 8 * 64 * 4)  # grouped-query attention: dk and dv for every query head
    assert cuda.flash_backward_bytes(query, key, value) == softmax_d + dq_accum + expanded
    assert cuda.flash_backward_bytes(query, query, query) == softmax_d + dq_accum


def test_allocator_slack_fills_segments_and_adds_fragmentation_and_cublas():
    slack = cuda.allocator_slack({"small": 3 * MIB, "mid": 25 * MIB, "large": 100 * MIB, "large_excess": MIB})
    segments = (4 * MIB - 3 * MIB) + (40 * MIB - 25 * MIB) + MIB
    assert slack == int(segments + cuda.FRAGMENTATION * 128 * MIB + cuda.CUBLAS_WORKSPACE_BYTES)


def _activations(target: str, dropout: float) -> list[float]:
    config = tiny_llama_config(num_hidden_layers=2, attention_dropout=dropout)
    if target == "cuda":
        config = cuda.cuda_config(config)
    qlora = QLoRAConfig(compute_dtype="float32", lora_dropout=0.0, gradient_checkpointing=False)
    run = DryRun(config, qlora, OptimizerConfig(name="adamw_8bit"), target=target)  # type: ignore[arg-type]
    return [run.measure(1, n)["forward"]["activations"] for n in (64, 128, 192)]


def test_attention_with_dropout_keeps_quadratic_memory_on_cpu_and_linear_on_cuda():
    cpu = _activations("cpu", 0.1)
    gpu = _activations("cuda", 0.1)
    curvature = [a[2] - 2 * a[1] + a[0] for a in (cpu, gpu)]
    blocks, heads = 2, 4
    # CPU's math path keeps the attention weights (float32) and the dropout mask: the square of the length.
    assert curvature[0] >= blocks * heads * 4 * 2 * 64**2
    # CUDA's fused kernels keep O(L): what is left is the 512-byte rounding of a few tensors.
    assert abs(curvature[1]) < 64 * 512


def test_the_loss_gets_no_correction():
    config = tiny_llama_config(num_hidden_layers=2, vocab_size=4096)  # the loss makes the forward peak
    qlora = QLoRAConfig(compute_dtype="float32", lora_dropout=0.0)
    losses = []
    for target in ("cpu", "cuda"):
        run = DryRun(config, qlora, OptimizerConfig(name="adamw_8bit"), target=target)  # type: ignore[arg-type]
        losses.append(run.measure(2, 64)["forward"]["loss"])
    assert 0 <= losses[1] - losses[0] < 16 * 512  # the same tensors, each rounded up to 512 bytes
