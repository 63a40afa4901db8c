"""Call 2 of the GPU validation, part j: packed rows against padded batches on the device.

The long-tailed examples of ``bench/packing.py`` (lognormal lengths, median 150 tokens) trained the
same way (``Trainer.fit`` with ``PagedQLoRAStrategy``, NF4 + LoRA, ``paged_adamw_8bit``, bfloat16
compute) on a one-block Llama as wide as the default workload, once packed (rows of up to 2,048
tokens, ``position_ids`` restarting per example, no attention mask) and once padded (random
batches, each padded to its longest): useful (non-padding) tokens per second and peak device memory.
With ``sdpa`` always, and with ``flash_attention_2`` when ``flash_attn`` imports (packed batches then
carry the examples' boundaries, ``cu_seq_lens_q/k``).

Checked: on the same examples, the packed batch's loss equals the padded batch's (float32 for
sdpa, within 1e-4; bfloat16 for flash-attention, within 2e-2): no example attends to another. The
CPU path (``--dry-run``) runs the same on shorter rows.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

from gpu_registry import Context, part

SKIP_STEPS = 2
TOLERANCE = {"sdpa": 1e-4, "flash_attention_2": 2e-2}


def implementations() -> list[str]:
    """``sdpa``, and ``flash_attention_2`` when the ``flash_attn`` package is importable."""
    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") is not None else [])


def _to(inputs: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}


def loss_check(model_shape: Any, data: list[dict], max_length: int, impl: str, device: str) -> dict[str, Any]:
    """Loss of the first two packed rows and of the same examples padded, on one model."""
    import torch
    from workloads import build_model

    from lightning_paged.core.packing import PackCollator, PackedDataset, PadCollator, model_inputs

    dtype = torch.float32 if impl == "sdpa" else torch.bfloat16
    model = build_model(replace(model_shape, attn_implementation=impl)).to(device=device, dtype=dtype).eval()
    rows = PackedDataset(data, max_length, seed=0)
    first = [rows[i] for i in range(min(2, len(rows)))]
    with torch.no_grad():
        packed = model(**_to(model_inputs(PackCollator(256)(first), model), device)).loss.item()
        padded = model(
            **_to(model_inputs(PadCollator(256)([e for row in first for e in row]), model), device)
        ).loss.item()
    difference = abs(packed - padded)
    return {
        "packed": packed,
        "padded": padded,
        "abs_difference": difference,
        "ok": difference <= TOLERANCE[impl],
    }


@part("j", "packing vs padding with sdpa (and flash-attention)", budget_s=35)
def part_packing(ctx: Context) -> dict[str, Any]:
    import packing as bench
    from workloads import run_lightning_paged

    from lightning_paged.core.packing import flash_boundaries

    if ctx.dry_run:
        max_length, examples, steps = 128, 40, 2
        shape = replace(bench.MODEL, device="cpu", compute_dtype="float32", seq_len=max_length)
    else:
        max_length, examples, steps = bench.MAX_LENGTH["long_tailed"], 600, 8
        shape = replace(bench.WIDE, device="cuda", compute_dtype="bfloat16")
    data = [{k: v[:max_length] for k, v in e.items()} for e in bench.long_tailed_examples(examples)]
    checks, runs = {}, {}
    for impl in implementations():
        checks[impl] = loss_check(shape, data, max_length, impl, ctx.device)
        ctx.progress({"loss_check": impl, **checks[impl]})
        for variant in ("packed", "padded_random"):
            batches = bench.batches_of(variant, data, max_length, steps + SKIP_STEPS)
            inputs = [dict(b["inputs"]) for b in batches]
            if impl != "sdpa" and variant == "packed":
                for x in inputs:
                    x.update(flash_boundaries(x["position_ids"]))
            workload = replace(shape, attn_implementation=impl, steps=len(batches))
            run = run_lightning_paged(workload, batches=inputs)
            stamps, measured = run["stamps"], batches[SKIP_STEPS:]
            seconds = stamps[-1] - stamps[SKIP_STEPS]
            tokens = sum(b["tokens"] for b in measured)
            runs[f"{variant}/{impl}"] = {
                "useful_tokens_per_s": tokens / seconds,
                "padding_fraction": 1 - tokens / sum(b["positions"] for b in measured),
                "peak_device_bytes": (run["gpu_memory"] or {}).get("peak_device_bytes"),
                "losses": run["losses"],
            }
            ctx.progress({"run": f"{variant}/{impl}", **runs[f"{variant}/{impl}"]})
    ratios = {
        impl: runs[f"packed/{impl}"]["useful_tokens_per_s"]
        / runs[f"padded_random/{impl}"]["useful_tokens_per_s"]
        for impl in checks
    }
    ok = all(c["ok"] for c in checks.values())
    cells = "; ".join(
        f"{impl}: packed {ratios[impl]:.2f}x padded useful tok/s, loss difference {checks[impl]['abs_difference']:.1e}"
        for impl in checks
    )
    missing = "" if "flash_attention_2" in checks else " (flash_attn not installed: sdpa only)"
    return {
        "status": "passed" if ok else "failed",
        "headline": cells + missing,
        "loss_checks": checks,
        "runs": runs,
        "packed_over_padded": ratios,
    }
