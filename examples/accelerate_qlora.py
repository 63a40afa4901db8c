# Command:  python examples/accelerate_qlora.py --steps 40
# (on a GPU: accelerate launch examples/accelerate_qlora.py --steps 40 --no-cpu)
"""Fine-tune a tiny Llama as NF4 QLoRA with Hugging Face Accelerate, in a loop written by hand.

The model is built from a config (random weights, nothing downloaded) and learns the string
tasks of ``examples/data/instructions.jsonl`` through the byte tokenizer.
:func:`prepare_paged_qlora` converts it on the accelerator's device, builds the paged optimizer
over the adapters and prepares model, optimizer and schedule; the eviction monitor records every
step. On 2 CPU cores the default run takes under a minute.

Writes to ``--out`` (default ``runs/accelerate_qlora``): ``eviction_events.jsonl`` (one line per
step), ``eviction_summary.txt`` and ``state/`` (``accelerator.save_state``: adapter weights,
optimizer, schedule and RNG state only). ``--resume runs/accelerate_qlora/state`` continues from it.
Needs the optional extra: ``pip install lightning-paged[accelerate]``.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_paged.accelerate import accelerate_eviction_monitor, prepare_paged_qlora
from lightning_paged.core.instructions import InstructionData
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paging import paging_coverage
from lightning_paged.core.qlora import QLoRAConfig
from lightning_paged.core.tokenizer import ByteTokenizer

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
    parser.add_argument(
        "--cpu", action=argparse.BooleanOptionalAction, default=True, help="train on the CPU (--no-cpu: GPU)"
    )
    parser.add_argument("--data", default=str(DATA), help="instruction data (.json or .jsonl)")
    parser.add_argument("--out", default="runs/accelerate_qlora", help="directory of the logs and the state")
    parser.add_argument("--resume", default=None, help="a state directory written by this script")
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


class Progress:
    """The step counter, saved and restored with the accelerator's state (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from accelerate.utils import set_seed

    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.cpu)
    set_seed(args.seed)
    on_cpu = accelerator.device.type == "cpu"

    data = InstructionData(
        args.data, tokenizer="byte", max_length=args.max_length, batch_size=args.batch_size, val_split=0
    )
    data.load()
    loader = accelerator.prepare(data.train_loader())

    # float32 matmuls are faster than bfloat16 on most CPUs; activation checkpointing pays off on a GPU only
    qlora = QLoRAConfig(
        compute_dtype="float32" if on_cpu else "bfloat16",
        lora_dropout=0.0,
        gradient_checkpointing=not on_cpu,
    )
    settings = OptimizerConfig(
        name=args.optimizer, lr=args.lr, scheduler="cosine", warmup_steps=args.steps // 10
    )
    model, optimizer, scheduler = prepare_paged_qlora(
        accelerator,
        tiny_llama(len(ByteTokenizer()), args.max_length),
        qlora,
        settings,
        total_steps=args.steps,
    )

    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    if args.resume:
        accelerator.load_state(args.resume)
        accelerator.print(f"resumed from {args.resume} at step {progress.step}")
    start = progress.step

    monitor = accelerate_eviction_monitor(accelerator, args.out)
    model.train()
    losses: list[float] = []
    batches = itertools.cycle(loader)
    for step in range(start, args.steps):
        batch = next(batches)
        with monitor.step(batch):
            loss = model(**batch).loss
            accelerator.backward(loss)
            with monitor.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        progress.step = step + 1
        losses.append(loss.item())
        if step == start:
            accelerator.print(paging_coverage(optimizer.optimizer).summary())
        if (step + 1) % 10 == 0 or step + 1 == args.steps:
            record = monitor.last_record
            accelerator.print(
                f"step {step + 1:4d}  loss {losses[-1]:.3f}  seq_len {record.seq_len if record else '-'}"
            )
    monitor.close()

    state_dir = Path(args.out) / "state"
    accelerator.save_state(str(state_dir))
    accelerator.print(f"adapters, optimizer and schedule saved to {state_dir}")
    return {
        "accelerator": accelerator,
        "model": model,
        "optimizer": optimizer,
        "losses": losses,
        "state_dir": state_dir,
    }


if __name__ == "__main__":
    main()
