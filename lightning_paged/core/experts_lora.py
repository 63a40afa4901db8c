"""LoRA on fused expert weights, laid out exactly as PEFT's ``target_parameters`` lays it out.

PEFT adapts a 3-D expert parameter with ``lora.ParamWrapper`` (peft 0.21.2 ``tuners/lora/layer.py``):
``lora_A`` is a ``Linear(in, r * experts)``, ``lora_B`` a ``Linear(r * experts, out)``, and expert
``e``'s update is ``B_e @ A_e * scaling`` with ``A_e = A.view(experts, r, in)[e]`` and
``B_e = B.view(out, r, experts)[..., e]``. Two adapted parameters of one module are nested wrappers:
the parameter registered first sits innermost (``experts.base_layer.lora_A``), the last one outermost
(``experts.lora_A``). PEFT's wrapper cannot work on 4-bit weights (it adds the update to the stored
parameter), so the adapters live on the experts module under those same names and the 4-bit forward
adds each chosen expert's LoRA term; an adapter exported from here loads in PEFT onto the 16-bit
model with the same ``target_parameters``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_paged.core.qlora_config import QLoRAConfig

ORDER = "_lightning_paged_expert_parameters"
"""Attribute of an experts module: its fused parameters in registration order (PEFT's nesting order)."""
PATHS = "_lightning_paged_expert_lora"
"""Attribute of an adapted experts module: fused parameter name to (holder path, scaling)."""
HOLDER = "base_layer"
"""The child that holds the LoRA pair of an inner parameter (PEFT's nested ``ParamWrapper``)."""


def parameter_order(module: nn.Module) -> tuple[str, ...]:
    """The module's fused expert parameters in registration order (recorded before they were replaced)."""
    return tuple(module.__dict__.get(ORDER, ()))


def features(module: Any, name: str) -> tuple[int, int, int]:
    """``(experts, in_features, out_features)`` of one fused expert parameter, in 4 or 16 bits."""
    weights = getattr(module, name)
    if hasattr(weights, "in_features"):  # ExpertWeights4bit
        return weights.num_experts, weights.in_features, weights.out_features
    experts, rows, columns = weights.shape
    return (experts, rows, columns) if module.is_transposed else (experts, columns, rows)


def add_expert_lora(modules: dict[str, nn.Module], config: QLoRAConfig, device: torch.device) -> list[str]:
    """A rank-``lora_r`` pair per expert on every fused parameter of ``modules``; PEFT's ``target_parameters``.

    Initialised as PEFT initialises LoRA (``A`` Kaiming-uniform, ``B`` zero), so the model's output
    is unchanged until training moves ``B``.
    """
    targets: set[str] = set()
    for module_name, module in modules.items():
        order = parameter_order(module)
        paths = {}
        holder: Any = module
        path = ""
        for name in reversed(order):  # the last registered parameter is PEFT's outermost wrapper
            experts, in_features, out_features = features(module, name)
            lora_a = nn.Linear(in_features, config.lora_r * experts, bias=False, device=device)
            lora_b = nn.Linear(config.lora_r * experts, out_features, bias=False, device=device)
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
            holder.lora_A = nn.ModuleDict({"default": lora_a})
            holder.lora_B = nn.ModuleDict({"default": lora_b})
            scaling = config.lora_alpha / (math.sqrt(config.lora_r) if config.use_rslora else config.lora_r)
            paths[name] = (path, scaling)
            targets.add(f"{module_name.rpartition('.')[2]}.{name}")
            if name != order[0]:
                holder.add_module(HOLDER, nn.Module())
                holder = getattr(holder, HOLDER)
                path = f"{path}.{HOLDER}" if path else HOLDER
        module.__dict__[PATHS] = paths
    return sorted(targets)


def expert_lora_delta(module: Any, name: str, x: torch.Tensor, expert: int) -> torch.Tensor | None:
    """Expert ``expert``'s LoRA term ``x @ A_e^T @ B_e^T * scaling`` for parameter ``name``; None when not adapted."""
    paths = module.__dict__.get(PATHS)
    if not paths or name not in paths:
        return None
    path, scaling = paths[name]
    holder: Any = module.get_submodule(path) if path else module
    a: torch.Tensor = holder.lora_A["default"].weight
    b: torch.Tensor = holder.lora_B["default"].weight
    experts = features(module, name)[0]
    rank = a.shape[0] // experts
    a_e = a.view(experts, rank, a.shape[1])[expert]
    b_e = b.view(b.shape[0], rank, experts)[:, :, expert]
    hidden = nn.functional.linear(x.to(a.dtype), a_e)
    return nn.functional.linear(hidden, b_e) * scaling


__all__ = ["add_expert_lora", "expert_lora_delta", "features", "parameter_order"]
