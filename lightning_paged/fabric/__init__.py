"""Lightning Fabric: NF4 QLoRA at ``fabric.setup_module``, the paged optimizer, adapter-only checkpoints.

Three strategies, registered in Fabric's strategy registry as ``"paged_qlora"`` (one device),
``"paged_qlora_ddp"`` (data parallel) and ``"paged_qlora_fsdp"`` (sharded with FSDP2), convert
each module Fabric sets up to NF4 + LoRA right before its device move, so DDP wraps (or FSDP
shards) the converted model. ``fabric.save``/``fabric.load`` then
hold only the trainable (adapter) weights and the optimizer state.

The helpers a hand-written loop needs besides the strategy are framework-free and shared with
:mod:`lightning_paged.accelerate`: :func:`build_paged_optimizer` (the optimizer by name, over
trainable weights, with its schedule), :func:`adapter_state_dict` / :func:`load_adapter_state_dict`
and :class:`LoopEvictionMonitor` (the eviction monitor's per-step records and summary)::

    fabric = Fabric(accelerator="cuda", devices=1, strategy="paged_qlora")
    fabric.launch()
    model = fabric.setup_module(model)                      # converted here
    optimizer, scheduler = build_paged_optimizer(model, total_steps=1000)
    optimizer = fabric.setup_optimizers(optimizer)
    monitor = fabric_eviction_monitor(fabric, "runs/fabric")
    for batch in loader:
        with monitor.step(batch):
            fabric.backward(model(**batch).loss)
            with monitor.optimizer_step():
                optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
    monitor.close()
    fabric.save("runs/fabric/adapters.ckpt", {"model": model, "optimizer": optimizer})
"""

from lightning_paged.core.adapters import adapter_state_dict, load_adapter_state_dict
from lightning_paged.core.paged_optimizer import build_paged_optimizer
from lightning_paged.fabric.fsdp import PagedQLoRAFabricFSDPStrategy
from lightning_paged.fabric.monitor import LoopEvictionMonitor, fabric_eviction_monitor
from lightning_paged.fabric.strategies import PagedQLoRAFabricDDPStrategy, PagedQLoRAFabricStrategy

__all__ = [
    "LoopEvictionMonitor",
    "PagedQLoRAFabricDDPStrategy",
    "PagedQLoRAFabricFSDPStrategy",
    "PagedQLoRAFabricStrategy",
    "adapter_state_dict",
    "build_paged_optimizer",
    "fabric_eviction_monitor",
    "load_adapter_state_dict",
]
