"""Call 2 of the GPU validation, the loaders on the device: parts h and i.

h. The streaming load with ``device=cuda`` (``empty_model`` + ``load_and_convert``: each weight read
   from the safetensors files and quantized on the device, one at a time) against transformers'
   4-bit ``from_pretrained`` of the same directory (a 1.1B Llama built from its config, saved in
   bfloat16), each in a fresh process: peak anonymous host memory (``RssAnon``) and peak device
   memory (``max_memory_allocated``/``reserved``) above a baseline taken after the CUDA context and
   bitsandbytes' quantization kernels are loaded. Checked: both load the same layers to identical
   packed bytes and quantization constants, and the streaming load never holds the 16-bit model on
   the host or the device (its peaks stay under a quarter of the 16-bit model above what it keeps).
i. The pre-quantized load: transformers quantizes a model while loading it on the device and saves
   it (a bitsandbytes 4-bit directory); ``load_and_convert`` loads that directory as stored. Checked:
   the packed weights and constants are the files' own (not quantized again), equal to our
   quantize-while-loading of the 16-bit source, the logits of both loads agree (identical is expected), and a
   training step gives finite loss and adapter gradients.

The CPU path (``--dry-run``) runs both on a small model with ``device=cpu``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_registry import Context, part, shared_model

MIB = 2**20
METHODS = ("streaming", "transformers_4bit")
SLACK = 64 * MIB
"""Allocator and library noise allowed on top of the bounds (small next to a 1.1B model's 2.2 GB)."""


def fingerprints(model: Any) -> dict[str, str]:
    """A digest of every 4-bit layer's packed weight and quantization constants, by layer name.

    PEFT's ``.base_layer`` is dropped from names so a converted model and a plain 4-bit one compare.
    Reads device tensors back to the host: use only outside a measured window.
    """
    import torch

    from lightning_paged.core.layers4bit import linear4bit_layers

    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in linear4bit_layers(model):
        state = layer.weight.quant_state
        digest = hashlib.sha256()
        parts = [layer.weight.data, state.absmax]
        if state.nested:
            parts += [state.state2.absmax, state.offset.reshape(1)]
        for tensor in parts:
            digest.update(tensor.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
        out[names[id(layer)].replace(".base_layer", "")] = digest.hexdigest()
    return out


def _bnb_config(dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def load_worker(method: str, directory: Path, device: str) -> dict[str, Any]:
    """One load in this (fresh) process: its host and device peaks, what it kept, its layers' digests."""
    import accelerate  # noqa: F401  (transformers' 4-bit load needs it: the same imports for both methods)
    import bitsandbytes as bnb
    import peft  # noqa: F401
    import torch
    from load_memory import AnonPeak, _rss_anon
    from transformers import AutoModelForCausalLM

    from lightning_paged.core.loading import WeightFiles, empty_model, load_and_convert
    from lightning_paged.core.qlora import QLoRAConfig

    cuda = device.startswith("cuda")
    target = "cuda:0" if device == "cuda" else device  # for transformers' device_map
    warm = torch.randn(256, 256, dtype=torch.bfloat16, device=device)  # the CUDA context and the kernels the
    bnb.functional.quantize_4bit(
        warm, quant_type="nf4", compress_statistics=True
    )  # loads use, outside the peaks
    del warm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    device_base = torch.cuda.memory_allocated() if cuda else 0
    with WeightFiles(directory) as files:
        sizes = [e.shape for e in files.entries.values()]
    numels = [int(torch.Size(s).numel()) for s in sizes]
    baseline = _rss_anon()
    started = time.perf_counter()
    with AnonPeak() as peak:
        if method == "streaming":
            model = empty_model(directory)
            load_and_convert(model, directory, QLoRAConfig(compute_dtype="bfloat16"), device=device)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(directory),
                quantization_config=_bnb_config(torch.bfloat16),
                dtype=torch.bfloat16,
                device_map={"": target},
            )
        if cuda:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    kept = sum(int(t.numel() * t.element_size()) for t in model.state_dict().values())
    result: dict[str, Any] = {
        "method": method,
        "device": device,
        "seconds": round(seconds, 2),
        "host_peak_above_baseline_bytes": peak.peak - baseline,
        "host_kept_bytes": 0 if cuda else kept,
        "model_bytes": kept,
        "model_16bit_bytes": 2 * sum(numels),
        "largest_tensor_16bit_bytes": 2 * max(numels),
        "fingerprints": fingerprints(model),
    }
    if cuda:
        result.update(
            device_peak_allocated_bytes=torch.cuda.max_memory_allocated() - device_base,
            device_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            device_kept_bytes=torch.cuda.memory_allocated() - device_base,
            device_name=torch.cuda.get_device_name(),
        )
    return result


def load_checks(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the streaming load guarantees, and how it compares with transformers' load."""
    ours, theirs = runs["streaming"], runs["transformers_4bit"]
    quarter = ours["model_16bit_bytes"] // 4
    checks: dict[str, Any] = {
        "same_layers": sorted(ours["fingerprints"]) == sorted(theirs["fingerprints"]),
        "identical_quantization": ours["fingerprints"] == theirs["fingerprints"],
        "host_peak_within_bound": ours["host_peak_above_baseline_bytes"]
        <= ours["host_kept_bytes"] + quarter + SLACK,
    }
    ratios = {
        "host_peak": ours["host_peak_above_baseline_bytes"] / max(1, theirs["host_peak_above_baseline_bytes"])
    }
    if "device_peak_allocated_bytes" in ours:
        checks["device_peak_within_bound"] = (
            ours["device_peak_allocated_bytes"] <= ours["device_kept_bytes"] + quarter + SLACK
        )
        ratios["device_peak"] = ours["device_peak_allocated_bytes"] / max(
            1, theirs["device_peak_allocated_bytes"]
        )
    differing = [n for n in ours["fingerprints"] if ours["fingerprints"][n] != theirs["fingerprints"].get(n)]
    return {
        "checks": checks,
        "ours_over_transformers": ratios,
        "differing_layers": differing[:5],
        "goal_ratio": 1.1,
    }


@part("h", "streaming load on the device vs transformers 4-bit", budget_s=45)
def part_streaming_load(ctx: Context) -> dict[str, Any]:
    from common import fmt_bytes, run_worker
    from gpu_tokens import MODEL, QUICK_MODEL

    model = replace(QUICK_MODEL, seq_len=32) if ctx.dry_run else replace(MODEL, seq_len=4096)
    directory = shared_model(
        ctx, "llama-quick" if ctx.dry_run else "llama-1.1b", model.llama_config(), model.seed
    )
    runs = {}
    for method in METHODS:
        runs[method] = run_worker(
            Path(__file__), [method, "--dir", str(directory), "--device", ctx.device], threads=ctx.threads
        )
        ctx.progress({k: v for k, v in runs[method].items() if k != "fingerprints"})
    verdict = load_checks(runs)
    ours, ratios = runs["streaming"], verdict["ours_over_transformers"]
    peaks = f"host peak {fmt_bytes(ours['host_peak_above_baseline_bytes'])} ({ratios['host_peak']:.2f}x transformers)"
    if "device_peak" in ratios:
        peaks += (
            f", device peak {fmt_bytes(ours['device_peak_allocated_bytes'])} ({ratios['device_peak']:.2f}x)"
        )
    failed = [k for k, v in verdict["checks"].items() if not v]
    return {
        "status": "passed" if not failed else "failed",
        "headline": f"{len(ours['fingerprints'])} layers, quantization identical: "
        f"{verdict['checks']['identical_quantization']}; {peaks}"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        "runs": runs,
        **verdict,
    }


@part("i", "pre-quantized load on the device", budget_s=30)
def part_prequantized(ctx: Context) -> dict[str, Any]:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_paged.core.layers4bit import linear4bit_layers
    from lightning_paged.core.loading import empty_model, load_and_convert
    from lightning_paged.core.qlora import QLoRAConfig

    size = (
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, vocab_size=1024)
        if ctx.dry_run
        else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, vocab_size=8192)
    )
    config = LlamaConfig(
        **size,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    source = shared_model(ctx, "llama-prequantized-source", config)
    theirs = AutoModelForCausalLM.from_pretrained(
        str(source),
        quantization_config=_bnb_config(torch.bfloat16),
        dtype=torch.bfloat16,
        device_map={"": "cuda:0" if ctx.device == "cuda" else ctx.device},
    )
    stored = ctx.scratch / "prequantized"
    theirs.save_pretrained(str(stored))
    del theirs
    settings = QLoRAConfig(compute_dtype="bfloat16", lora_dropout=0.0)
    ours = empty_model(stored)
    report = load_and_convert(ours, stored, settings, device=ctx.device)
    streamed = empty_model(source)
    load_and_convert(streamed, source, settings, device=ctx.device)
    ctx.progress({"loaded": report.summary()})

    names = {id(m): n.replace(".base_layer", "") for n, m in ours.named_modules()}
    as_stored = []
    files = sorted(stored.glob("*.safetensors"))
    for layer in linear4bit_layers(ours):
        name = names[id(layer)]
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                if f"{name}.weight" in f.keys():  # noqa: SIM118 (the handle has keys(), not __contains__)
                    packed, absmax = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight.absmax")
                    as_stored.append(
                        torch.equal(layer.weight.data.cpu(), packed)
                        and torch.equal(layer.weight.quant_state.absmax.cpu(), absmax)
                    )
    same_as_streamed = fingerprints(ours) == fingerprints(streamed)

    ids = torch.randint(0, config.vocab_size, (2, 64), device=ctx.device)
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    adapter_grads = [p.grad for n, p in ours.named_parameters() if "lora_" in n and p.grad is not None]
    trains = bool(torch.isfinite(loss)) and any(bool(g.abs().sum() > 0) for g in adapter_grads)
    trains = trains and not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    ours.eval()
    streamed.eval()
    with torch.no_grad():  # last: a CPU eval forward may repack 4-bit weights (not ours; see layers4bit)
        a, b = ours(input_ids=ids).logits, streamed(input_ids=ids).logits
    logits_identical = bool(torch.equal(a, b))
    logits_difference = float((a.float() - b.float()).abs().max())
    checks = {
        "loaded_as_prequantized": report.prequantized,
        "every_layer_as_stored": bool(as_stored)
        and all(as_stored)
        and len(as_stored) == len(linear4bit_layers(ours)),
        "same_as_quantize_while_loading": same_as_streamed,
        # the same weights through the same kernels: identical is expected; bfloat16 rounding is accepted
        "logits_match_quantize_while_loading": logits_difference
        <= 1e-2 * max(1.0, float(a.float().abs().max())),
        "training_step": trains,
    }
    failed = [k for k, v in checks.items() if not v]
    return {
        "status": "passed" if not failed else "failed",
        "headline": f"{len(as_stored)} layers loaded as stored; loss {float(loss):.4f}; "
        + ("logits identical" if logits_identical else f"logits differ by up to {logits_difference:.2e}")
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        "checks": checks,
        "report": report.summary(),
    }


def main(argv: list[str] | None = None) -> int:
    """``--worker METHOD --dir DIR --device DEVICE``: one measured load (what part h runs in a fresh process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=METHODS, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    from common import emit_result, set_threads

    set_threads(args.threads)
    emit_result(load_worker(args.worker, args.dir, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
