"""Reading a directory's experts one at a time while they are quantized, and undoing it when a read fails.

A fused expert tensor whose conversion stacks the experts first (Mixtral's ``experts.N.w1/w3``,
Qwen-MoE's ``experts.N.gate_proj/up_proj``) or that is stored stacked (GraniteMoE's
``input_linear``) is read expert by expert: the host holds one expert at 16 bits at a time. Any
other conversion is run once for the whole tensor, which is then handed out expert by expert.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_paged.core.compat.torch import own_parameters
from lightning_paged.core.experts4bit import (
    EXPERT_PARAMETERS,
    ExpertWeights4bit,
    expert_parameters,
    find_experts,
)
from lightning_paged.core.experts_lora import ORDER, PATHS

if TYPE_CHECKING:
    from lightning_paged.core.loading.files import WeightFiles
    from lightning_paged.core.loading.keys import Source


class ExpertStash:
    """The model's 16-bit (empty) expert parameters, kept to put back should the load fail, and the reader."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.originals = {
            name: (module, {p: own_parameters(module)[p] for p in expert_parameters(module)})
            for name, module in find_experts(model).items()
        }
        self._whole: tuple[str, torch.Tensor] | None = None

    def read(
        self, source: Source, files: WeightFiles, name: str, index: int, counter: list[int]
    ) -> torch.Tensor:
        """Expert ``index`` of the model's fused parameter ``name``; ``counter[0]`` counts file tensors read."""
        if source.per_expert:
            counter[0] += len(set(source.patterns)) if source.converter is not None else int(index == 0)
            return source.read_expert(files, index, self.model)
        if self._whole is None or self._whole[0] != name:
            self._whole = (name, source.read(files, self.model)[name])
            counter[0] += len(source.keys)
        expert = self._whole[1][index]
        if index == self._whole[1].shape[0] - 1:
            self._whole = None
        return expert

    def restore(self) -> None:
        """Put the original (empty) expert parameters and the class's forward back."""
        self._whole = None
        for module, params in self.originals.values():
            for param_name in EXPERT_PARAMETERS:
                if isinstance(getattr(module, param_name, None), ExpertWeights4bit):
                    delattr(module, param_name)
            for param_name, param in params.items():
                own_parameters(module)[param_name] = param
            for attribute in ("forward", ORDER, PATHS):
                module.__dict__.pop(attribute, None)


__all__ = ["ExpertStash"]
