"""Run by tests/fabric/test_strategies.py: two CPU processes (gloo) fine-tune a tiny Llama with Fabric's paged_qlora_ddp.

Each rank builds its model from a different seed on purpose: the strategy must give every rank
rank zero's base weights before quantizing. Each rank writes what the test compares; rank zero
also writes the adapter-only checkpoint, and both ranks the eviction log.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from transformers import LlamaForCausalLM

from lightning_paged.fabric import build_paged_optimizer, fabric_eviction_monitor
from lightning_paged.testing import tiny_llama_config


def main(out_dir: str) -> None:
    out = Path(out_dir)
    fabric = Fabric(accelerator="cpu", devices=2, strategy="paged_qlora_ddp")
    fabric.launch()
    torch.manual_seed(100 + fabric.global_rank)  # different base weights on each rank
    config = tiny_llama_config(max_position_embeddings=2048)
    model = fabric.setup_module(LlamaForCausalLM(config))
    optimizer, _ = build_paged_optimizer(model, {"name": "paged_adamw_8bit", "lr": 1e-2})
    optimizer = fabric.setup_optimizers(optimizer)
    model.train()

    data = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    monitor = fabric_eviction_monitor(fabric, out, source="none")
    for step in range(3):
        ids = data[2 * step + fabric.global_rank].unsqueeze(0)  # each rank its own sample
        with monitor.step({"input_ids": ids}):
            fabric.backward(model(input_ids=ids, labels=ids).loss)
            with monitor.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
    monitor.close()

    fabric.save(out / "adapters.ckpt", {"model": model, "optimizer": optimizer})
    inner = model.module  # the converted LlamaForCausalLM inside Fabric's and DDP's wrappers
    layer = inner.model.layers[0].self_attn.q_proj.base_layer
    torch.save(
        {
            "lora": {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad},
            "packed": layer.weight.data.clone(),
            "absmax": layer.weight.quant_state.absmax.clone(),
            "world_size": fabric.world_size,
        },
        out / f"rank{fabric.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
    if torch.distributed.is_initialized():  # gloo can abort at exit without it (see end_process_group)
        torch.distributed.destroy_process_group()
