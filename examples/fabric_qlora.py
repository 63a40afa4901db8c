# Command:  python examples/fabric_qlora.py --steps 40
# (two processes, data parallel: python examples/fabric_qlora.py --steps 40 --devices 2)
"""Fine-tune a tiny Llama as NF4 QLoRA with Lightning Fabric, in a loop written by hand.

The model is built from a config (random weights, nothing downloaded) and learns the string
tasks of ``examples/data/instructions.jsonl`` through the byte tokenizer. ``fabric.setup_module``
converts it (the ``paged_qlora`` strategy), :func:`build_paged_optimizer` builds the paged
optimizer over the adapters, and the eviction monitor records every step. On 2 CPU cores the
default run takes under a minute; pass ``--accelerator cuda`` on a GPU.

Writes to ``--out`` (default ``runs/fabric_qlora``): ``eviction_events.jsonl`` (one line per step),
``eviction_summary.txt`` and ``adapters.ckpt`` (adapter weights and optimizer state only).
``--resume runs/fabric_qlora/adapters.ckpt`` continues from such a checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_paged.core.instructions import InstructionData
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paging import paging_coverage
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.core.tokenizer import ByteTokenizer
from lightning_paged.fabric import (
    PagedQLoRAFabricDDPStrategy,
    PagedQLoRAFabricStrategy,
    build_paged_optimizer,
    fabric_eviction_monitor,
)

DATA = Path(__file__).with_name("data") / "instructions.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per step and process")
    parser.add_argument("--max-length", type=int, default=448, help="longest sample in tokens")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--optimizer", default="paged_adamw_8bit", help="an optimizer name")
    parser.add_argument("--accelerator", default="cpu", help="cpu, cuda, auto")
    parser.add_argument("--devices", type=int, default=1, help="processes; more than 1 trains data parallel")
    parser.add_argument("--data", default=str(DATA), help="instruction data (.json or .jsonl)")
    parser.add_argument("--out", default="runs/fabric_qlora", help="directory of the logs and the checkpoint")
    parser.add_argument("--resume", default=None, help="an adapters.ckpt to continue from")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def tiny_llama(vocab_size: int, max_length: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    on_cpu = args.accelerator == "cpu" or (args.accelerator == "auto" and not torch.cuda.is_available())
    # float32 matmuls are faster than bfloat16 on most CPUs; activation checkpointing pays off on a GPU only
    qlora = QLoRAConfig(
        compute_dtype="float32" if on_cpu else "bfloat16",
        lora_dropout=0.0,
        gradient_checkpointing=not on_cpu,
    )
    strategy_cls = PagedQLoRAFabricDDPStrategy if args.devices > 1 else PagedQLoRAFabricStrategy
    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy=strategy_cls(qlora))
    fabric.launch()
    fabric.seed_everything(args.seed)

    data = InstructionData(
        args.data, tokenizer="byte", max_length=args.max_length, batch_size=args.batch_size, val_split=0
    )
    data.load()
    loader = fabric.setup_dataloaders(data.train_loader())

    model = fabric.setup_module(tiny_llama(len(ByteTokenizer()), args.max_length))  # converted here
    settings = OptimizerConfig(
        name=args.optimizer, lr=args.lr, scheduler="cosine", warmup_steps=args.steps // 10
    )
    optimizer, scheduler = build_paged_optimizer(model, settings, total_steps=args.steps)
    optimizer = fabric.setup_optimizers(optimizer)

    start = 0
    if args.resume:
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        start = fabric.load(args.resume, state)["step"]
        fabric.print(f"resumed from {args.resume} at step {start}")

    monitor = fabric_eviction_monitor(fabric, args.out)
    model.train()
    losses: list[float] = []
    batches = itertools.cycle(loader)
    for step in range(start, args.steps):
        batch = next(batches)
        with monitor.step(batch):
            loss = model(**batch).loss
            fabric.backward(loss)
            with monitor.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        losses.append(loss.item())
        fabric.log_dict({"train/loss": losses[-1], **monitor.metrics()}, step=step)
        if step == start:
            fabric.print(paging_coverage(optimizer.optimizer).summary())
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            record = monitor.last_record
            fabric.print(
                f"step {step + 1:4d}  loss {losses[-1]:.3f}  seq_len {record.seq_len if record else '-'}"
            )
    monitor.close()

    checkpoint = Path(args.out) / "adapters.ckpt"
    fabric.save(
        checkpoint, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "step": args.steps}
    )
    fabric.print(f"adapters and optimizer state saved to {checkpoint}")
    return {
        "fabric": fabric,
        "model": model,
        "optimizer": optimizer,
        "losses": losses,
        "checkpoint": checkpoint,
    }


if __name__ == "__main__":
    main()
