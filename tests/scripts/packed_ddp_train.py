"""Run by tests/lightning/test_packing.py: two CPU processes (gloo, plain ``ddp``) take one optimizer step
on packed rows of different token counts; each rank saves the gradients the optimizer would use.

The rows are those of ``packed_data_module`` below; with one row per rank, the step covers the first
two rows of the epoch's order, which one process sees as a batch of two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import quiet_trainer

from lightning_paged.lightning.data import InstructionDataModule
from lightning_paged.lightning.module import CausalLMModule

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
}


class GradRecorder(CausalLMModule):
    """Keeps the gradients the optimizer is about to use (after the module's own rescaling)."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def packed_data_module(out_dir: Path, batch_size: int) -> InstructionDataModule:
    """Examples of very different lengths packed into rows of at most 128 tokens."""
    words = ["a", "owl", "horse", "tiger", "elephant", "hippopotamus", "ox", "crocodile"]
    rows = [
        {"instruction": f"Spell: {w * (1 + i % 4)}", "output": w * (1 + i % 4)} for i, w in enumerate(words)
    ]
    path = out_dir / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return InstructionDataModule(str(path), batch_size=batch_size, val_split=0, packing=True, max_length=128)


def train(out_dir: Path, devices: int, batch_size: int) -> tuple[pl.Trainer, GradRecorder]:
    torch.manual_seed(0)
    module = GradRecorder(model_config=TINY)
    strategy = "ddp" if devices > 1 else "auto"
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=packed_data_module(out_dir, batch_size))
    return trainer, module


def main(out_dir: str) -> None:
    trainer, module = train(Path(out_dir), devices=2, batch_size=1)
    torch.save(
        {"grads": module.grads, "world_size": trainer.world_size},
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # gloo can abort at exit without it (see end_process_group)
        torch.distributed.destroy_process_group()
