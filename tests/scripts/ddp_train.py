"""Run by tests/lightning/test_ddp.py: two CPU processes (gloo) fine-tune a tiny Llama with paged_qlora_ddp.

Each rank builds its model from a different seed on purpose: the strategy must give every rank
rank zero's base weights before quantizing. Then, in the same processes, each rank fine-tunes a
model saved in a directory, which every rank reads from the files itself. Each rank writes what
the test compares. The directory model is ``<out_dir>/model``, when the test saved one.
"""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

import lightning_paged  # noqa: F401  (registers the strategies)
from lightning_paged.core.loading import empty_model
from lightning_paged.testing import tiny_llama_config


class Module(pl.LightningModule):
    def __init__(self, seed: int, directory: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        if directory is not None:
            self.model = empty_model(directory)  # no weights until the strategy's setup
            return
        config = tiny_llama_config(max_position_embeddings=2048)
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return bnb.optim.PagedAdamW8bit([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _quick_trainer(max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        strategy="paged_qlora_ddp",
        accelerator="cpu",
        devices=2,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _weights(module: Module) -> dict:
    layer = module.model.model.layers[0].self_attn.q_proj.base_layer
    return {
        "lora": {n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
        "packed": layer.weight.data.clone(),
        "absmax": layer.weight.quant_state.absmax.clone(),
    }


def main(out_dir: str) -> None:
    import os

    rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.manual_seed(0)
    data = torch.randint(0, 128, (16, 12))
    trainer = _quick_trainer(max_steps=4)
    module = Module(seed=100 + rank)
    trainer.fit(module, DataLoader(data, batch_size=2))
    torch.save(
        {**_weights(module), "world_size": trainer.world_size}, f"{out_dir}/rank{trainer.global_rank}.pt"
    )
    model_dir = f"{out_dir}/model"
    if not os.path.isdir(model_dir):
        return
    trainer = _quick_trainer(max_steps=2)  # the process group of the first fit is reused
    module = Module(seed=100 + rank, directory=model_dir)
    trainer.fit(module, DataLoader(data, batch_size=2))
    report = trainer.strategy.conversion_report
    torch.save(
        {**_weights(module), "tensors_read": report.tensors_read, "summary": report.summary()},
        f"{out_dir}/dir_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # gloo can abort at exit without it (see end_process_group)
        torch.distributed.destroy_process_group()
