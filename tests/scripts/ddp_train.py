"""Run by tests/lightning/test_ddp.py: two CPU processes (gloo) fine-tune a tiny Llama with paged_qlora_ddp.

Each rank builds its model from a different seed on purpose: the strategy must give every rank
rank zero's base weights before quantizing. Each rank writes what the test compares.
"""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_paged  # noqa: F401  (registers the strategies)


class Module(pl.LightningModule):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return bnb.optim.PagedAdamW8bit([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def main(out_dir: str) -> None:
    import os

    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(0)
    data = torch.randint(0, 128, (16, 12))
    trainer = pl.Trainer(
        strategy="paged_qlora_ddp",
        accelerator="cpu",
        devices=2,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Module(seed=100 + rank)
    trainer.fit(module, DataLoader(data, batch_size=2))
    layer = module.model.model.layers[0].self_attn.q_proj.base_layer
    torch.save(
        {
            "lora": {n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
            "packed": layer.weight.data.clone(),
            "absmax": layer.weight.quant_state.absmax.clone(),
            "world_size": trainer.world_size,
        },
        f"{out_dir}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
