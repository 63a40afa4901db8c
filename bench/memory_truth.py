"""Memory truth: what NF4 weights and adapter-only checkpoints really cost, against the theory.

1. Quantized weights. For each model size, the bytes bitsandbytes holds for the 4-bit layers after
   ``convert_to_qlora`` (packed 4-bit data, 8-bit block maxima, their float32 second-level maxima),
   in bits per quantized parameter, against the QLoRA paper's NF4 + double-quantization figure:
   4 + 8/64 + 32/(64*256) = 4.127 bits (4.5 bits without double quantization). Per-layer constants
   (code tables, the offset) are shown apart: they vanish per parameter as layers grow.
2. Checkpoints. After a few training steps, the size of lightning_paged's checkpoint (adapters and
   optimizer state only) against the bytes of the LoRA weights and of the optimizer state it must
   hold, and against Lightning's default full checkpoint of the same QLoRA model (the module
   converted in ``configure_model`` under the default strategy, so Lightning saves every weight).

Sizes are exact byte counts, not timings: one run in this process suffices.

    python bench/memory_truth.py            # 23M and 124M-parameter Llamas, about a minute
    python bench/memory_truth.py --quick    # smoke test: a tiny model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, fmt_bytes, machine_info, markdown_table, set_threads, write_results
from workloads import TINY, Workload, build_model, make_batches

sys.path.insert(0, str(REPO))

NAME = "memory_truth"
BLOCKSIZE = 64
"""Weights per 4-bit block (one 8-bit block maximum each)."""
NESTED_BLOCKSIZE = 256
"""Block maxima per second-level block (one float32 maximum each)."""
CHECKPOINT_STEPS = 2

QUICK_MODELS = {
    "tiny": replace(TINY, seq_len=16, steps=CHECKPOINT_STEPS),
}
FULL_MODELS = {
    "23M": Workload(num_layers=5, batch_size=2, seq_len=32, steps=CHECKPOINT_STEPS),
    "124M": Workload(
        hidden_size=1024,
        intermediate_size=2816,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        vocab_size=16000,
        batch_size=1,
        seq_len=32,
        steps=CHECKPOINT_STEPS,
    ),
}
CHECKPOINT_MODEL = {"quick": "tiny", "full": "23M"}


def theory_bits(double_quant: bool) -> float:
    """Bits per quantized parameter that NF4 stores, per-layer constants aside."""
    if double_quant:
        return 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * NESTED_BLOCKSIZE)
    return 4 + 32 / BLOCKSIZE


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def quantized_weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of every ``Linear4bit`` weight in ``model``, by part."""
    import bitsandbytes as bnb

    parts = {"params": 0, "packed": 0, "absmax": 0, "nested_absmax": 0, "per_layer_constants": 0, "layers": 0}
    for layer in model.modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        state = layer.weight.quant_state
        parts["layers"] += 1
        parts["params"] += int(state.shape.numel())
        parts["packed"] += _nbytes(layer.weight.data)
        parts["absmax"] += _nbytes(state.absmax)
        parts["per_layer_constants"] += _nbytes(state.code)
        if state.nested:
            parts["nested_absmax"] += _nbytes(state.state2.absmax)
            parts["per_layer_constants"] += _nbytes(state.state2.code) + _nbytes(state.offset)
    return parts


def weight_truth(workload: Workload, double_quant: bool) -> dict[str, Any]:
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

    model = build_model(workload)
    sixteen_bit = sum(p.numel() for p in model.parameters()) * 2
    config = QLoRAConfig(double_quant=double_quant, gradient_checkpointing=False)
    conversion = convert_to_qlora(model, config)
    parts = quantized_weight_bytes(model)
    stored = parts["packed"] + parts["absmax"] + parts["nested_absmax"]
    measured = 8 * stored / parts["params"]
    theory = theory_bits(double_quant)
    return {
        "double_quant": double_quant,
        "parameters": workload.parameter_count(),
        "quantized_parameters": parts["params"],
        "quantized_layers": parts["layers"],
        "bytes": parts,
        "bits_per_param": measured,
        "bits_per_param_with_constants": 8 * (stored + parts["per_layer_constants"]) / parts["params"],
        "theory_bits_per_param": theory,
        "measured_over_theory": measured / theory,
        "same_layers_at_16_bit_bytes": parts["params"] * 2,
        "conversion_report_quantized_bytes": conversion.quantized_bytes,
        "whole_model_16_bit_bytes": sixteen_bit,
    }


# --- checkpoints --------------------------------------------------------------------------------------


def tensor_bytes(obj: Any, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of the distinct tensor storages in a nested checkpoint structure (shared storages once)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return key[1]
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's live state tensors (the quantization maps it shares, once)."""
    return tensor_bytes([dict(s) for s in optimizer.state.values()])


def _trainer(directory: Path, strategy: Any, steps: int) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(directory),
    )


def _checkpoint(module: Any, strategy: Any, workload: Workload, path: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    trainer = _trainer(path.parent, strategy, workload.steps)
    trainer.fit(module, train_dataloaders=DataLoader(make_batches(workload), batch_size=None))
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False, map_location="cpu")
    return {
        "file_bytes": path.stat().st_size,
        "state_dict_tensors": len(saved["state_dict"]),
        "state_dict_bytes": tensor_bytes(saved["state_dict"]),
        "optimizer_states_bytes": tensor_bytes(saved["optimizer_states"]),
        "live_optimizer_state_bytes": optimizer_state_bytes(trainer.optimizers[0]),
        "trainable_bytes": sum(_nbytes(p) for p in module.parameters() if p.requires_grad),
    }


def checkpoint_truth(workload: Workload, directory: Path) -> dict[str, Any]:
    from workloads import lightning_module

    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora
    from lightning_paged.lightning.strategies import PagedQLoRAStrategy

    settings = dict(lora_r=workload.lora_r, lora_alpha=workload.lora_alpha)  # compute dtype: the default
    ours = _checkpoint(
        lightning_module(build_model(workload), workload),
        PagedQLoRAStrategy(lora_dropout=0.0, gradient_checkpointing=False, **settings),
        workload,
        directory / "lightning_paged.ckpt",
    )

    module = lightning_module(build_model(workload), workload)

    def configure_model() -> (
        None
    ):  # the same conversion, done where Lightning's default strategy keeps it all
        if not hasattr(module.model, "peft_config"):
            convert_to_qlora(
                module.model, QLoRAConfig(lora_dropout=0.0, gradient_checkpointing=False, **settings)
            )

    module.configure_model = configure_model
    default = _checkpoint(module, "auto", workload, directory / "lightning_default.ckpt")
    expected = ours["trainable_bytes"] + ours["live_optimizer_state_bytes"]
    return {
        "model": workload.__dict__,
        "parameters": workload.parameter_count(),
        "lightning_paged": ours,
        "lightning_default_full": default,
        "lora_plus_optimizer_state_bytes": expected,
        "ours_over_lora_plus_optimizer_state": ours["file_bytes"] / expected,
        "ours_over_default_full": ours["file_bytes"] / default["file_bytes"],
        "whole_model_16_bit_bytes": workload.parameter_count() * 2,
    }


# --- report -------------------------------------------------------------------------------------------


def markdown(rep: dict[str, Any]) -> str:
    weight_rows = []
    for name, pair in rep["weights"].items():
        for entry in pair:
            b = entry["bytes"]
            weight_rows.append(
                [
                    name,
                    f"{entry['quantized_parameters'] / 1e6:.2f}M",
                    "yes" if entry["double_quant"] else "no",
                    fmt_bytes(b["packed"] + b["absmax"] + b["nested_absmax"]),
                    fmt_bytes(entry["same_layers_at_16_bit_bytes"]),
                    f"{entry['bits_per_param']:.4f}",
                    f"{entry['theory_bits_per_param']:.4f}",
                    f"{entry['bits_per_param_with_constants']:.4f}",
                ]
            )
    c = rep["checkpoint"]
    ours, default = c["lightning_paged"], c["lightning_default_full"]
    ckpt_rows = [
        [
            "lightning_paged checkpoint (file)",
            fmt_bytes(ours["file_bytes"]),
            f"{ours['state_dict_tensors']} tensors",
        ],
        ["  of which adapter weights", fmt_bytes(ours["state_dict_bytes"]), "float32 LoRA A and B"],
        [
            "  of which optimizer state",
            fmt_bytes(ours["optimizer_states_bytes"]),
            "8-bit AdamW moments, block maxima",
        ],
        [
            "LoRA weights + live optimizer state",
            fmt_bytes(c["lora_plus_optimizer_state_bytes"]),
            "what must be saved",
        ],
        [
            "Lightning default full checkpoint (file)",
            fmt_bytes(default["file_bytes"]),
            f"{default['state_dict_tensors']} tensors: 4-bit base, embeddings, head, adapters",
        ],
        ["whole model at 16 bits", fmt_bytes(c["whole_model_16_bit_bytes"]), "for scale"],
    ]
    return "\n".join(
        [
            "## Memory truth",
            "",
            "Quantized weights (NF4, blocks of 64; theory excludes per-layer code tables and offset):",
            "",
            markdown_table(
                [
                    "model",
                    "4-bit params",
                    "double quant",
                    "stored",
                    "same at 16 bits",
                    "bits/param",
                    "theory",
                    "with per-layer constants",
                ],
                weight_rows,
            ),
            "",
            f"Checkpoints after {CHECKPOINT_STEPS} steps, {c['parameters'] / 1e6:.1f}M-parameter Llama, LoRA r="
            f"{c['model']['lora_r']} on all 7 projections, paged_adamw_8bit, default settings (bfloat16 "
            "embeddings and head):",
            "",
            markdown_table(["", "bytes", "what"], ckpt_rows),
            "",
            f"lightning_paged / (LoRA + optimizer state) = {c['ours_over_lora_plus_optimizer_state']:.3f}; "
            f"lightning_paged / Lightning default = {c['ours_over_default_full']:.4f}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON and Markdown go (default bench/results)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info(args.threads)

    models = QUICK_MODELS if args.quick else FULL_MODELS
    weights = {name: [weight_truth(w, True), weight_truth(w, False)] for name, w in models.items()}
    with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as tmp:
        checkpoint = checkpoint_truth(models[CHECKPOINT_MODEL["quick" if args.quick else "full"]], Path(tmp))
    rep = {
        "what": "bytes of NF4 weights vs theory; adapter-only checkpoint vs LoRA + optimizer state and vs "
        "Lightning's default full checkpoint",
        "command": "python bench/memory_truth.py" + (" --quick" if args.quick else ""),
        "machine": machine,
        "settings": {"blocksize": BLOCKSIZE, "nested_blocksize": NESTED_BLOCKSIZE, "models": list(models)},
        "weights": weights,
        "checkpoint": checkpoint,
    }
    write_results(NAME, rep, markdown(rep), args.quick, args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
