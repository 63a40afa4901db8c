"""The memory plan against a GPU: predicted against ``torch.cuda.max_memory_reserved`` at three lengths.

For each sequence length the plan of one training step (``target="cuda"``) is set beside the same
step run on the GPU (random weights, NF4 QLoRA, ``paged_adamw_8bit``, gradient checkpointing):

- ``max_memory_reserved`` against the plan's peak less the CUDA context and the paged state (neither
  is in torch's allocator). Goal: within 10 %;
- ``max_memory_allocated`` against the plan's peak less context, paged state and allocator slack;
- the counter's own peak of live tensor bytes during the GPU step, against the same figure: what the
  CPU dry run misses of the GPU's kernels shows here.

The default model is a 1.2B Llama (Llama 3.2 1B's dimensions), built from its config; nothing is
downloaded. It needs a CUDA GPU with about 8 GiB free; ``compare`` also runs on the CPU (without the
CUDA statistics), which is how the test suite keeps it working.

    python bench/plan_gpu.py                          # 512, 1024, 2048 tokens at batch 1
    python bench/plan_gpu.py --seq-lens 1024 4096 8192 --batch-size 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, fmt_bytes, machine_info, markdown_table, write_results

sys.path.insert(0, str(REPO))

NAME = "plan_gpu"
GOAL = 0.10
LLAMA_1B = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
    rope_theta=500000.0,
)


def compare(
    config: Any = None,
    seq_lens: tuple[int, ...] = (512, 1024, 2048),
    batch_size: int = 1,
    device: str = "cuda",
    qlora: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per length: the plan's figures beside the GPU's (or, on ``device="cpu"``, the counter's only)."""
    import torch

    from lightning_paged.core.optimizers import OptimizerConfig
    from lightning_paged.core.plan import RealRun, plan_memory, resolve_model_config
    from lightning_paged.core.qlora import QLoRAConfig

    config = resolve_model_config(config or LLAMA_1B)
    qlora_settings = QLoRAConfig(**(qlora or {}))
    optimizer_settings = OptimizerConfig(**(optimizer or {"name": "paged_adamw_8bit"}))
    cuda = device.startswith("cuda")
    plan = plan_memory(
        config,
        qlora=qlora_settings,
        optimizer=optimizer_settings,
        batch_size=batch_size,
        seq_len=max(seq_lens),
        seq_lens=seq_lens,
        target="cuda",
        search=False,
    )
    run = RealRun(config, qlora_settings, optimizer_settings, device=device)
    rows = []
    for point in plan.by_seq_len:
        c = point.components
        outside = c.get("cuda_context", 0) + c.get("optimizer_paged", 0)
        reserved = point.peak_bytes - outside
        allocated = reserved - c.get("allocator_slack", 0)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        measured = run.measure(batch_size, point.seq_len)
        row: dict[str, Any] = {
            "seq_len": point.seq_len,
            "planned_reserved": reserved,
            "planned_allocated": allocated,
            "counted_on_device": measured.peak_bytes - c.get("optimizer_paged", 0),
            "phase_planned": point.phase,
            "phase_measured": measured.phase,
        }
        if cuda:
            row["max_memory_reserved"] = torch.cuda.max_memory_reserved()
            row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
            row["error_reserved"] = reserved / row["max_memory_reserved"] - 1
            row["error_allocated"] = allocated / row["max_memory_allocated"] - 1
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    headers = [
        "seq_len",
        "planned reserved",
        "max_memory_reserved",
        "error",
        "planned allocated",
        "max_memory_allocated",
        "error",
        "counted live bytes",
    ]
    table = [
        [
            r["seq_len"],
            fmt_bytes(r["planned_reserved"]),
            fmt_bytes(r.get("max_memory_reserved")),
            f"{r['error_reserved']:+.1%}" if "error_reserved" in r else "n/a",
            fmt_bytes(r["planned_allocated"]),
            fmt_bytes(r.get("max_memory_allocated")),
            f"{r['error_allocated']:+.1%}" if "error_allocated" in r else "n/a",
            fmt_bytes(r["counted_on_device"]),
        ]
        for r in rows
    ]
    errors = [abs(r["error_reserved"]) for r in rows if "error_reserved" in r]
    verdict = f"worst reserved error {max(errors):.1%} (goal {GOAL:.0%})" if errors else "no GPU statistics"
    return f"### The plan against the GPU: {verdict}\n\n" + markdown_table(headers, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--model", help="a model directory or config.json (default: a 1.2B Llama)")
    parser.add_argument("--out-dir", type=Path, help="where to write the results (default bench/results)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("plan_gpu.py needs a CUDA GPU (compare(device='cpu') runs the same code without one)")
    rows = compare(args.model, tuple(args.seq_lens), args.batch_size)
    report = {"machine": machine_info(device=torch.cuda.get_device_name()), "rows": rows}
    write_results(NAME, report, markdown(rows), False, args.out_dir)


if __name__ == "__main__":
    main()
