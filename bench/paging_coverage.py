"""What paging LoRA adapter state costs: bitsandbytes' rule, a lowered threshold, or a pool.

The same LoRA-shaped parameters (default: Llama-2-7B geometry, 32 layers of 4096 hidden and
11008 MLP width, rank 16 on all seven linear layers, about 40M adapter parameters) are trained
for a few steps by the same optimizer under four paging variants, through the real optimizer
step path (:func:`lightning_paged.core.optimizers.build_optimizer`):

- ``not_paged``: the same algorithm and bit width without paging (the baseline for ratios);
- ``bitsandbytes``: bitsandbytes' rule: only parameters of 100,000 elements or more, one managed
  allocation per state buffer;
- ``threshold``: every parameter paged, one managed allocation per state buffer;
- ``pool``: every parameter paged, small states carved from 64 MiB pooled allocations.

Measured for each: managed allocations and their bytes, paged and unpaged state bytes (with
reasons), prefetch calls per step, and the wall time of the first step (which allocates the
state) and of the later steps, as ratios to ``not_paged``.

On a CUDA GPU the managed memory is real. On a CPU it is stood in for by host tensors marked
paged (the primitives of :class:`~lightning_paged.core.paging.ManagedMemory`), so the counts and
bytes are exact but the times only cover the host side, not the driver's allocation and
migration costs.

Run:  python bench/paging_coverage.py [--optimizer paged_adamw_8bit] [--layers 32] [--device auto]
Writes bench/results/paging_coverage[_<optimizer>]_<device>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_paged.core.optimizers import OPTIMIZERS, build_optimizer
from lightning_paged.core.paging import ManagedMemory, PagingPolicy, paging_coverage
from lightning_paged.testing import HostMemory

VARIANTS = {
    "not_paged": None,
    "bitsandbytes": dict(page_small=False, pooled=False),
    "threshold": dict(page_small=True, pooled=False),
    "pool": dict(page_small=True, pooled=True),
}


def lora_shapes(layers: int, hidden: int, intermediate: int, rank: int) -> list[tuple[int, int]]:
    """(A, B) shapes of LoRA on q, k, v, o, gate, up and down projections of every layer."""
    linear = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    per_layer = [s for fan_in, fan_out in linear for s in ((rank, fan_in), (fan_out, rank))]
    return per_layer * layers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unpaged_twin(name: str) -> str:
    spec = OPTIMIZERS[name]
    for other, candidate in OPTIMIZERS.items():
        if (candidate.algorithm, candidate.bits, candidate.paged) == (spec.algorithm, spec.bits, False):
            return other
    raise ValueError(f"no unpaged twin of {name}")


def run_variant(name: str, variant: str, shapes, device: torch.device, steps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).mul_(0.01).to(device)) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(0.01).to(device) for s in shapes]
    settings = VARIANTS[variant]
    memory = ManagedMemory() if device.type == "cuda" else HostMemory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if settings is None:
            optimizer = build_optimizer(unpaged_twin(name), params, lr=1e-4)
        else:
            optimizer = build_optimizer(name, params, paging=PagingPolicy(memory=memory, **settings), lr=1e-4)
    times = []
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g
        _sync(device)
        start = time.perf_counter()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    coverage = paging_coverage(optimizer)
    later = times[1:] or times
    result = {
        "managed_allocations": memory.allocations,
        "managed_bytes": memory.allocated_bytes,
        "paged_bytes": coverage.paged_bytes,
        "paged_tensors": coverage.paged_tensors,
        "unpaged_bytes": coverage.unpaged_bytes,
        "prefetches_per_step": memory.prefetches / steps,
        "first_step_s": times[0],
        "step_s": sorted(later)[len(later) // 2],
    }
    del optimizer, params, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--optimizer", default="paged_adamw_8bit", choices=[n for n, s in OPTIMIZERS.items() if s.paged]
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    shapes = lora_shapes(args.layers, args.hidden, args.intermediate, args.rank)
    results = {
        variant: run_variant(args.optimizer, variant, shapes, device, args.steps) for variant in VARIANTS
    }
    base = results["not_paged"]
    for variant in results.values():
        variant["first_step_ratio"] = variant["first_step_s"] / base["first_step_s"]
        variant["step_ratio"] = variant["step_s"] / base["step_s"]
    report = {
        "optimizer": args.optimizer,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "managed_memory": "cudaMallocManaged"
        if device.type == "cuda"
        else "host tensors standing in (counts exact, times host-side only)",
        "geometry": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "rank": args.rank,
            "adapter_parameters": sum(a * b for a, b in shapes),
            "adapter_tensors": len(shapes),
            "tensors_below_100k_elements": sum(a * b < 100_000 for a, b in shapes),
        },
        "steps": args.steps,
        "variants": results,
    }
    out = (
        args.out or Path(__file__).parent / "results" / f"paging_coverage_{args.optimizer}_{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
