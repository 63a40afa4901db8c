"""Run by tests/test_fsdp.py: paged_qlora_fsdp on CPU (gloo), and the single-process runs it must equal.

``fsdp OUT``: one of two processes started by the test (LOCAL_RANK, WORLD_SIZE, MASTER_* set).
Each rank builds its model from a different seed on purpose: the strategy gives every rank rank
zero's base weights. Three fits: 32-bit state (checkpoints at steps 2 and 4); 8-bit state with a
checkpoint at step 2; the same resumed from that checkpoint; then the 32-bit run again as a Fabric loop. ``single OUT``: one process runs
``paged_qlora`` over the same global batches, and resumes the 2-rank 8-bit checkpoint.
Each writes what the test compares.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

import lightning_paged
from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.paging import paging_coverage
from lightning_paged.core.sampling import ResumableSampler
from lightning_paged.lightning.mixin import PagedOptimizerMixin
from lightning_paged.lightning.monitor import EvictionMonitor
from lightning_paged.testing import HostMemory, tiny_llama_config

STEPS = 4
GLOBAL_BATCH = 4
CLIP = 0.01
"""Gradient norm clipping of the 32-bit runs: small enough to act at every step."""


class Module(PagedOptimizerMixin, pl.LightningModule):
    def __init__(self, seed: int, optimizer: str, paged: bool = False) -> None:
        super().__init__()
        if paged:  # host memory marked paged stands in for managed memory
            self.managed_memory = HostMemory()
        torch.manual_seed(seed)
        config = tiny_llama_config(max_position_embeddings=2048)
        self.model = LlamaForCausalLM(config)
        self.optimizer_config = OptimizerConfig(name=optimizer, lr=1e-3)

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def strategy_settings(lora_r: int) -> dict:
    return dict(compute_dtype="float32", lora_r=lora_r, lora_alpha=16, lora_dropout=0.0)


def fit(
    strategy, devices, module, out, *, ckpt_every=None, ckpt_path=None, name="run", monitor=False, **trainer
):
    losses = Losses()
    callbacks: list[Callback] = [losses]
    if monitor:
        callbacks.append(EvictionMonitor(source="none"))
    if ckpt_every:
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / name, every_n_train_steps=ckpt_every, save_top_k=-1, filename="{step}"
            )
        )
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=bool(ckpt_every),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=out / name,
        **trainer,
    )
    data = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    rank = int(os.environ.get("LOCAL_RANK", 0))
    sampler = ResumableSampler(data, shuffle=False, num_replicas=devices, rank=rank)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    module.paged_fraction = paging_coverage(trainer.optimizers[0]).paged_fraction
    adapters = trainer.strategy.lightning_module_state_dict()  # gathered whole under FSDP
    return trainer, losses.losses, {k: v.detach().cpu().clone() for k, v in adapters.items()}


def run_fsdp(out: Path) -> None:
    rank = int(os.environ["LOCAL_RANK"])
    results = {}

    def strategy(lora_r):
        return lightning_paged.PagedQLoRAFSDPStrategy(
            **strategy_settings(lora_r), process_group_backend="gloo"
        )

    trainer, losses, adapters = fit(
        strategy(8),
        2,
        Module(100 + rank, "paged_adamw_32bit"),
        out,
        ckpt_every=2,
        name="fsdp32",
        monitor=True,
        gradient_clip_val=CLIP,
    )
    report = trainer.strategy.shard_report
    optimizer = trainer.optimizers[0]
    results["fsdp32"] = {
        "losses": losses,
        "adapters": adapters,
        "local_packed": report.local_packed_bytes,
        "total_packed": report.total_packed_bytes,
        "quant_state": report.quant_state_bytes,
        "blocks": report.blocks,
        "block_class": report.block_class,
        "state_bytes": sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for k, t in s.items()
            if k in ("state1", "state2")
        ),
        "local_adapter_elements": sum(p.numel() for p, _ in optimizer.fsdp_shards),
    }
    module = Module(100 + rank, "paged_adamw_8bit", paged=True)
    _, losses, adapters = fit(strategy(32), 2, module, out, ckpt_every=2, name="fsdp8")
    results["fsdp8"] = {"losses": losses, "adapters": adapters, "paged_fraction": module.paged_fraction}
    module = Module(100 + rank, "paged_adamw_8bit", paged=True)
    _, losses, adapters = fit(strategy(32), 2, module, out, ckpt_path=out / "fsdp8" / "step=2.ckpt")
    results["fsdp8_resumed"] = {
        "losses": losses,
        "adapters": adapters,
        "paged_fraction": module.paged_fraction,
    }
    results["fabric"] = run_fabric(out, rank)
    results["refused"] = {
        "bf16-true": refusal(
            lambda: fit(strategy(8), 2, Module(100, "paged_adamw_8bit"), out, precision="bf16-true")
        ),
        "lamb": refusal(lambda: fit(strategy(8), 2, Module(100, "lamb_8bit"), out)),
    }
    torch.save(results, out / f"fsdp_rank{rank}.pt")


def run_fabric(out: Path, rank: int) -> dict:
    """The 32-bit run again, as a hand-written Fabric loop; then its checkpoint loaded into a fresh model."""
    from lightning.fabric import Fabric

    from lightning_paged.fabric import build_paged_optimizer

    def setup():
        fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
        fabric.launch()
        module = Module(100 + rank, "paged_adamw_32bit")
        model = fabric.setup_module(module.model)
        optimizer, _ = build_paged_optimizer(model, module.optimizer_config, memory=HostMemory())
        return fabric, model, fabric.setup_optimizers(optimizer)

    from lightning_paged.fabric import PagedQLoRAFabricFSDPStrategy

    strategy = PagedQLoRAFabricFSDPStrategy(qlora=strategy_settings(8), process_group_backend="gloo")
    fabric, model, optimizer = setup()
    model.train()
    data = torch.randint(0, 128, (16, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(STEPS):
        ids = data[step * GLOBAL_BATCH + rank : (step + 1) * GLOBAL_BATCH : 2]
        loss = model(input_ids=ids, labels=ids).loss
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=CLIP)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    paged_fraction = paging_coverage(optimizer.optimizer).paged_fraction
    fabric.save(out / "fabric.ckpt", {"model": model, "optimizer": optimizer})
    adapters = fabric.strategy.get_module_state_dict(model.module)
    state = fabric.strategy.get_optimizer_state(optimizer.optimizer)

    strategy = PagedQLoRAFabricFSDPStrategy(qlora=strategy_settings(8), process_group_backend="gloo")
    fabric, fresh, fresh_optimizer = setup()
    fabric.load(out / "fabric.ckpt", {"model": fresh, "optimizer": fresh_optimizer})
    return {
        "losses": losses,
        "adapters": adapters,
        "loaded_adapters": fabric.strategy.get_module_state_dict(fresh.module),
        "state": state,
        "loaded_state": fabric.strategy.get_optimizer_state(fresh_optimizer.optimizer),
        "paged_fraction": paged_fraction,
        "loaded_paged_fraction": paging_coverage(fresh_optimizer.optimizer).paged_fraction,
    }


def refusal(run) -> str:
    try:
        run()
    except SettingError as err:
        return str(err)
    return "not refused"


def run_single(out: Path) -> None:
    def strategy(lora_r):
        return lightning_paged.PagedQLoRAStrategy(**strategy_settings(lora_r))

    results = {}
    _, losses, adapters = fit(strategy(8), 1, Module(100, "paged_adamw_32bit"), out, gradient_clip_val=CLIP)
    results["single32"] = {"losses": losses, "adapters": adapters}
    _, losses, adapters = fit(
        strategy(32), 1, Module(100, "paged_adamw_8bit"), out, ckpt_path=out / "fsdp8" / "step=2.ckpt"
    )
    results["single8_resumed"] = {"losses": losses, "adapters": adapters}
    torch.save(results, out / "single.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    (run_fsdp if sys.argv[1] == "fsdp" else run_single)(Path(sys.argv[2]))
    if torch.distributed.is_initialized():  # gloo can abort at exit without it (see end_process_group)
        torch.distributed.destroy_process_group()
