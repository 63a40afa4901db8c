"""What a CUDA device adds to a dry run on CPU tensors: kernel workspaces, allocator rounding, the context.

Each term is explicit, with the source it follows (file and function of torch and bitsandbytes):

- **Caching-allocator rounding** (:func:`round_size`): every block is a multiple of 512 bytes
  (torch ``c10/cuda/CUDACachingAllocator.cpp``, ``round_size``; ``kMinBlockSize`` in
  ``c10/core/AllocatorConfig.h``). With it the counted peak is ``torch.cuda.max_memory_allocated``'s.
- **Allocator segments** (:func:`allocator_slack`): blocks of 1 MiB or less are carved from 2 MiB
  segments, blocks under 10 MiB from 20 MiB segments, larger ones get segments rounded up to 2 MiB
  (``get_allocation_size``: ``kSmallBuffer``, ``kLargeBuffer``, ``kMinLargeAlloc``, ``kRoundLarge``).
  On top, :data:`FRAGMENTATION` of the allocator's peak for blocks that are free but cannot be reused
  for the request at hand, and one cuBLAS workspace (:data:`CUBLAS_WORKSPACE_BYTES`). Together:
  ``max_memory_reserved`` minus ``max_memory_allocated``.
- **The CUDA context** (:data:`CUDA_CONTEXT_BYTES`): the driver's context and the kernel images torch
  and bitsandbytes load; outside torch's allocator, so in no torch statistic, but taken from the card.
- **bitsandbytes' 4-bit matmul** (:func:`workspace`): on CUDA, ``gemm_4bit`` for more than 4 rows
  (``_GEMM_4BIT_CUSTOM_FLOOR_M``) may dequantize the whole weight into a temporary and call
  ``F.linear`` (bitsandbytes 0.50.2 ``backends/cuda/ops.py``, ``_dequant_linear_fallback``: ``B_dq``
  in the input's dtype, and with double quantization two float32 copies of the block maxima); past
  1,536 rows it always does. The plan counts that temporary whenever there are more than 4 rows.
- **Attention** (:func:`workspace`, :func:`cuda_config`): CPU runs SDPA through its flash kernel
  (``_scaled_dot_product_flash_attention_for_cpu``), which keeps O(L) for backward as CUDA's flash and
  memory-efficient kernels do; but with attention dropout CPU falls back to the math path, which keeps
  the O(L²) attention weights and dropout mask, where CUDA's fused kernels regenerate the mask from a
  seed. So the CUDA plan runs attention without dropout. CUDA's flash backward allocates, inside the
  kernel call, ``softmax_d`` (batch × heads × length rounded to 128, float32), ``dq_accum`` (batch ×
  length rounded to 128 × heads × head size rounded to 32 or 64, float32) and, for grouped-query
  attention, ``dk_expanded``/``dv_expanded`` (batch × length × query heads × head size) (torch
  ``aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp``, ``mha_bwd``); the plan adds
  them at the backward call. The memory-efficient kernel (taken when a mask is passed) is planned
  with the same workspace. ``flash_attention_2`` models are planned as ``sdpa``: the same O(L) class.
- **The loss**: torch's cross entropy runs the same operators on CUDA and CPU (``log_softmax`` and
  ``nll_loss``, each returning what the CPU kernels return); nothing is added.

The constants not read from a source (context, fragmentation, PCIe rate) are estimates, not
measurements: the GPU comparison (``bench/plan_gpu.py``) is where they get checked.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lightning_paged.core.compat.transformers import (
    config_attn_implementation,
    set_config_attn_implementation,
)

MIN_BLOCK = 512
"""``kMinBlockSize``: every caching-allocator block is a multiple of this."""
SMALL_SEGMENT = 2 << 20
"""``kSmallBuffer``: segment size of blocks of at most 1 MiB."""
MID_SEGMENT = 20 << 20
"""``kLargeBuffer``: segment size of blocks between 1 and 10 MiB."""
CUDA_CONTEXT_BYTES = 512 << 20
"""Estimate of the CUDA context with the kernels of torch and bitsandbytes loaded (lazy loading, CUDA 12)."""
CUBLAS_WORKSPACE_BYTES = 32 << 20
"""torch's cuBLAS workspace on Hopper (``:4096:8``, 8 × 4 MiB); smaller on older GPUs."""
FRAGMENTATION = 0.05
"""Share of the allocator's peak reserved but not reusable at the peak (an estimate)."""
PCIE_BYTES_PER_S = 12e9
"""Rate of unified-memory page migration over PCIe 4.0 x16 assumed for eviction time (an estimate)."""
GEMM_4BIT_FUSED_MAX_ROWS = 4
"""``_GEMM_4BIT_CUSTOM_FLOOR_M``: up to this many rows bitsandbytes always uses its fused 4-bit kernel."""


def round_size(nbytes: int) -> int:
    """Bytes the CUDA caching allocator gives a request of ``nbytes`` (``round_size``)."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def allocator_slack(by_class: dict[str, int]) -> int:
    """Reserved beyond allocated at the peak, from the allocated bytes per size class (see the module doc)."""
    small, mid, large = (by_class.get(name, 0) for name in ("small", "mid", "large"))
    segments = (-(-small // SMALL_SEGMENT) * SMALL_SEGMENT - small) + (
        -(-mid // MID_SEGMENT) * MID_SEGMENT - mid
    )
    allocated = small + mid + large
    return int(
        segments + by_class.get("large_excess", 0) + FRAGMENTATION * allocated + CUBLAS_WORKSPACE_BYTES
    )


def cuda_config(config: Any) -> Any:
    """The model config the CUDA plan runs: attention without dropout, ``sdpa`` for flash attention."""
    config = copy.deepcopy(config)
    for name in ("attention_dropout", "attn_pdrop"):
        if getattr(config, name, None):
            setattr(config, name, 0.0)
    implementation = config_attn_implementation(config)
    if isinstance(implementation, str) and implementation.startswith("flash_attention"):
        set_config_attn_implementation(config, "sdpa")
    return config


def workspace(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes a CUDA kernel allocates and frees inside the call that the CPU dry run made (see the module doc)."""
    name = getattr(func, "__name__", "")
    if name.startswith("gemm_4bit") and str(getattr(func, "namespace", "")) == "bitsandbytes":
        return _gemm_4bit(args, kwargs)
    if name.startswith("_scaled_dot_product_flash_attention_for_cpu_backward"):
        return flash_backward_bytes(*(tuple(args[1:4])))
    return 0


def _gemm_4bit(args: tuple, kwargs: dict) -> int:
    a, shape = args[0], args[2]
    rows = a.numel() // max(a.shape[-1], 1)
    if rows <= GEMM_4BIT_FUSED_MAX_ROWS:
        return 0
    n, k = int(shape[0]), int(shape[1])
    total = n * k * a.element_size()
    absmax_8bit = kwargs.get("absmax_8bit", args[7] if len(args) > 7 else None)
    if isinstance(absmax_8bit, torch.Tensor):
        total += 2 * absmax_8bit.numel() * 4
    return total


def flash_backward_bytes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """``softmax_d``, ``dq_accum`` and, with fewer key heads, ``dk/dv_expanded`` of CUDA's ``mha_bwd``.

    ``query`` is ``(batch, heads, length, head_dim)`` as SDPA passes it; ``key`` and ``value``
    ``(batch, key_heads, key_length, head_dim)``.
    """
    batch, heads, length, head_dim = (int(d) for d in query.shape)
    key_heads, key_length = int(key.shape[1]), int(key.shape[2])
    rounded = -(-length // 128) * 128
    head_rounded = -(-head_dim // (32 if head_dim <= 128 else 64)) * (32 if head_dim <= 128 else 64)
    total = batch * heads * rounded * 4 + batch * rounded * heads * head_rounded * 4
    if key_heads != heads:
        total += 2 * batch * key_length * heads * head_dim * value.element_size()
    return total
