"""Run by tests/core/test_fsdp_shards.py on 2 or 5 CPU processes (gloo), through the core alone.

``fsdp_shards.py OUT``, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set. Every rank:

1. loads ``OUT/model`` sharded block by block (``convert_and_shard``, lora_r=8) and keeps its local
   packed 4-bit bytes and quantization constants, for the test to compare with a whole-model
   quantization;
2. trains the sharded adapters with AdEMAMix, every rank on the same batch (so the gradient is the
   same at any world size), recording the size of every tensor bitsandbytes is handed;
3. at world size 2: saves the gathered optimizer state after 2 steps (8-bit state with
   ``min_8bit_size=256``, and 32-bit state), trains 2 more, then builds everything afresh, loads the
   gathered adapters and state and trains the same 2 steps; at world size 5: loads the 32-bit state
   saved at world size 2 and trains those 2 steps, and tries the 8-bit one.

Writes ``OUT/world<W>_rank<R>.pt``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STEPS_BEFORE_SAVE = 2
STEPS_AFTER_SAVE = 2


def qlora_config() -> Any:
    from lightning_paged.core.qlora import QLoRAConfig

    return QLoRAConfig(
        compute_dtype="float32",
        quant_storage="float32",
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        gradient_checkpointing=False,
    )


def sharded_model(directory: Path, mesh: Any) -> tuple[Any, Any, Any]:
    from lightning_paged.core.fsdp_load import convert_and_shard
    from lightning_paged.core.loading import empty_model

    torch.manual_seed(7)
    model = empty_model(directory)
    report, shard = convert_and_shard(model, qlora_config(), torch.device("cpu"), mesh)
    return model, report, shard


class Handed:
    """Records the size of every parameter bitsandbytes' optimizer is given to initialise or update."""

    def __init__(self, optimizer: Any) -> None:
        self.numels: list[int] = []
        for name in ("init_state", "update_step"):
            original = getattr(optimizer, name)

            def recorded(group: Any, p: Any, gindex: int, pindex: int, _original: Any = original) -> Any:
                self.numels.append(p.numel())
                return _original(group, p, gindex, pindex)

            setattr(optimizer, name, recorded)


def optimizer_for(model: Any, name: str, **settings: Any) -> Any:
    from lightning_paged.core.fsdp_optimizer import shard_optimizer
    from lightning_paged.core.optimizers import build_optimizer

    optimizer = build_optimizer(name, [p for p in model.parameters() if p.requires_grad], lr=1e-2, **settings)
    shard_optimizer(optimizer)
    return optimizer


def train(model: Any, optimizer: Any, steps: range) -> list[float]:
    losses = []
    for step in steps:
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def adapters(model: Any) -> dict[str, torch.Tensor]:
    from lightning_paged.core.fsdp import gather_full

    return gather_full({n: p for n, p in model.named_parameters() if p.requires_grad})


def resumed(directory: Path, mesh: Any, name: str, saved: dict, settings: dict) -> dict[str, Any]:
    """A fresh model and optimizer given the saved adapters and gathered state, then the same steps."""
    from lightning_paged.core.fsdp import distribute_like
    from lightning_paged.core.fsdp_optimizer import load_gathered_optimizer_state

    model, _, _ = sharded_model(directory, mesh)
    model.load_state_dict(distribute_like(model, saved["adapters"]), strict=False)
    optimizer = optimizer_for(model, name, **settings)
    handed = Handed(optimizer)
    load_gathered_optimizer_state(optimizer, saved["state"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    index_of = {id(p): index for index, p in enumerate(params)}
    loaded = {
        index_of[id(p)]: {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        for p, state in optimizer.state.items()
    }
    losses = train(model, optimizer, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE))
    return {
        "loaded_state": loaded,
        "places": [
            place for group in getattr(optimizer, "fsdp_layout", [range(len(params))]) for place in group
        ],
        "losses": losses,
        "adapters": adapters(model),
        "handed": handed.numels,
        "group_numels": [p.numel() for p in params],
    }


def main(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_paged.core.fsdp import local_tensor
    from lightning_paged.core.fsdp_optimizer import gathered_optimizer_state
    from lightning_paged.core.layers4bit import linear4bit_layers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    directory = out / "model"
    result: dict[str, Any] = {}

    model, report, shard = sharded_model(directory, mesh)
    result["load"] = {
        "packed": [
            local_tensor(layer.weight).detach().view(torch.uint8).clone()
            for layer in linear4bit_layers(model)
        ],
        "absmax": [layer.quant_state.absmax.clone() for layer in linear4bit_layers(model)],
        "nested_absmax": [layer.quant_state.state2.absmax.clone() for layer in linear4bit_layers(model)],
        "summary": report.summary(),
        "shard_summary": shard.summary(),
        "adapters": adapters(model),
        "empty_adapter_shards": sorted(
            n for n, p in model.named_parameters() if p.requires_grad and local_tensor(p).numel() == 0
        ),
    }

    kinds = {"8bit": ("paged_ademamix_8bit", {"min_8bit_size": 256}), "32bit": ("ademamix", {})}
    if world == 2:
        for kind, (name, settings) in kinds.items():
            model, _, _ = sharded_model(directory, mesh)
            optimizer = optimizer_for(model, name, **settings)
            handed = Handed(optimizer)
            losses = train(model, optimizer, range(STEPS_BEFORE_SAVE))
            saved = {"adapters": adapters(model), "state": gathered_optimizer_state(optimizer)}
            state_list = [None]
            if rank == 0:
                state_list = [saved["state"]]
                torch.save(saved, out / f"ademamix_{kind}.pt")
            dist.broadcast_object_list(state_list, src=0)  # every rank loads the whole state
            saved["state"] = state_list[0]
            losses += train(model, optimizer, range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE))
            result[kind] = {
                "losses": losses,
                "adapters": adapters(model),
                "handed": handed.numels,
                "resumed": resumed(directory, mesh, name, saved, settings),
            }
    else:
        from lightning_paged.core.fingerprint import CheckpointMismatchError

        saved = torch.load(out / "ademamix_32bit.pt", weights_only=False)
        result["32bit"] = {"resumed": resumed(directory, mesh, "ademamix", saved, {})}
        try:
            eight = torch.load(out / "ademamix_8bit.pt", weights_only=False)
            resumed(directory, mesh, "paged_ademamix_8bit", eight, {"min_8bit_size": 256})
            result["8bit_refused"] = None
        except CheckpointMismatchError as err:
            result["8bit_refused"] = str(err)
            dist.barrier()
    torch.save(result, out / f"world{world}_rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    os._exit(0)
