"""Call 2 of the GPU validation, long sequences and the memory plan: parts k and l.

k. One training step's peak device memory and tokens/s at 16,384 tokens with a 128,256-word vocabulary
   (``bench/long_sequence_gpu.py``'s model cut to 8 blocks: the logits do not depend on the depth),
   three ways: the model's own loss (every logit), the chunked loss, and the chunked loss with
   ``offload_activations``. Checked: each fits, the chunked loss's first loss equals the standard
   one's (same weights, same tokens; bfloat16 tolerance), and the chunked peak is lower than the
   standard one by at least half of what the full float32 logits take (the physics: the standard
   loss holds them and their gradient at once, the chunked one never does).
l. The memory plan against the GPU (``bench/plan_gpu.py``): ``plan_memory`` of one step beside
   ``torch.cuda.max_memory_reserved`` of the same step at two lengths; the goal is within 10 %.

The variants of k run one after the other in the part's process, the device's cache emptied and its
peak statistics reset between them. The CPU path (``--dry-run``) runs the same code on a small model.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import Any

from gpu_registry import Context, part

K_VARIANTS = ("standard", "chunked", "chunked+offload")
K_LOSS_TOLERANCE = 2e-2
"""Standard against chunked first-step loss: bfloat16 logits against float32 chunks."""
L_SEQ_LENS = (1024, 4096)
L_GOAL = 0.10


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def long_sequence_rows(model: Any, variants: tuple[str, ...], ctx: Context) -> dict[str, dict[str, Any]]:
    """Each variant measured at the model's one length, in this process, logged as it finishes."""
    import long_sequence_gpu

    rows: dict[str, dict[str, Any]] = {}
    for variant in variants:
        _release()
        rows[variant] = long_sequence_gpu.measure(model, variant, model.lengths[0])
        ctx.progress({"variant": variant, **rows[variant]})
    _release()
    return rows


def judge_long_sequences(rows: dict[str, dict[str, Any]], seq_len: int, vocab_size: int) -> dict[str, Any]:
    """The checks of part k on measured rows (device figures only where the rows have them)."""
    fits = all(r["fits"] for r in rows.values())
    checks: dict[str, Any] = {"all_fit": fits}
    if fits:
        standard, chunked = rows["standard"]["losses"][0], rows["chunked"]["losses"][0]
        checks["first_loss_difference"] = abs(standard - chunked)
        checks["losses_agree"] = checks["first_loss_difference"] <= K_LOSS_TOLERANCE
    reserved = {k: r.get("max_memory_reserved") for k, r in rows.items() if r["fits"]}
    if fits and all(v is not None for v in reserved.values()):
        logits_fp32 = seq_len * vocab_size * 4
        checks["chunked_saves_bytes"] = reserved["standard"] - reserved["chunked"]
        checks["chunked_saves_enough"] = checks["chunked_saves_bytes"] >= logits_fp32 // 2
        checks["offload_saves_bytes"] = reserved["chunked"] - reserved["chunked+offload"]
    passed = fits and checks.get("losses_agree", False) and checks.get("chunked_saves_enough", True)
    return {"passed": passed, "checks": checks, "reserved": reserved}


@part("k", "long sequences: chunked loss and activation offloading vs the full logits", budget_s=50)
def part_long_sequences(ctx: Context) -> dict[str, Any]:
    import long_sequence_gpu
    from common import fmt_bytes

    if ctx.dry_run:
        model = replace(
            long_sequence_gpu.QUICK,
            device="cpu",
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=256,
            lengths=(128,),
            steps=2,
            chunk_size=32,
        )
    else:
        model = replace(long_sequence_gpu.Model(), num_layers=8, lengths=(16384,), steps=2)
    rows = long_sequence_rows(model, K_VARIANTS, ctx)
    verdict = judge_long_sequences(rows, model.lengths[0], model.vocab_size)
    cells = ", ".join(
        f"{k}: "
        + (
            "out of memory"
            if not r["fits"]
            else (fmt_bytes(r["max_memory_reserved"]) + ", " if "max_memory_reserved" in r else "")
            + f"{r['tokens_per_second']:.0f} tok/s"
        )
        for k, r in rows.items()
    )
    return {
        "status": "passed" if verdict["passed"] else "failed",
        "headline": f"{model.lengths[0]:,} tokens, vocabulary {model.vocab_size:,}: {cells}",
        "settings": {"num_layers": model.num_layers, "chunk_size": model.chunk_size, "steps": model.steps},
        "rows": rows,
        **verdict,
    }


def judge_plan(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Part l's verdict: the worst reserved-memory error of the plan, where the rows have GPU figures."""
    errors = [abs(r["error_reserved"]) for r in rows if "error_reserved" in r]
    worst = max(errors) if errors else None
    return {"worst_reserved_error": worst, "passed": bool(rows) and (worst is None or worst <= L_GOAL)}


@part("l", "the memory plan against the GPU's own peak", budget_s=40)
def part_memory_plan(ctx: Context) -> dict[str, Any]:
    import plan_gpu

    if ctx.dry_run:
        tiny = dict(plan_gpu.LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        tiny.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
        rows = plan_gpu.compare(tiny, seq_lens=(32, 64), device="cpu", qlora={"compute_dtype": "float32"})
    else:
        rows = plan_gpu.compare(seq_lens=L_SEQ_LENS)
    for row in rows:
        ctx.progress(row)
    verdict = judge_plan(rows)
    worst = verdict["worst_reserved_error"]
    headline = (
        "dry run: the plan and the step ran, no CUDA statistics on a CPU"
        if worst is None
        else f"worst error of the planned reserved memory {worst:.1%} (goal {L_GOAL:.0%}) at "
        + ", ".join(f"{r['seq_len']}" for r in rows)
        + " tokens"
    )
    ctx.path("rows.md").write_text(plan_gpu.markdown(rows) + "\n")
    return {
        "status": "passed" if verdict["passed"] else "failed",
        "headline": headline,
        "rows": rows,
        **verdict,
    }
