"""transformers' ``Conv1D`` (GPT-2's linear layer) seen as the linear layer it is.

``Conv1D(nf, nx)`` computes ``x @ weight + bias`` with ``weight`` stored ``in x out`` (``nx x nf``),
the transpose of ``nn.Linear``'s. transformers' own 4-bit load replaces it by a ``Linear4bit`` whose
weight is the transposed one (``integrations/bitsandbytes.py``, ``Bnb4bitQuantize``: ``value.T`` when
the source class is ``Conv1D``); so does the conversion here, byte for byte. A pre-quantized
directory stores those layers already transposed, so they are read as they are. LoRA on such a layer
is PEFT's 4-bit LoRA (which ignores ``fan_in_fan_out``), and the adapter is exported with
``fan_in_fan_out=True``: that is how PEFT applies it to the original ``Conv1D`` weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """A layer the conversion quantizes: ``nn.Linear`` (or a subclass) or ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: Any) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer or ``Conv1D``."""
    if is_conv1d(module):
        rows, columns = module.weight.shape
        return int(rows), int(columns)
    return int(module.in_features), int(module.out_features)


def as_linear_weight(module: Any, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``nn.Linear`` holds it (``out x in``): transposed for a ``Conv1D``."""
    return weight.t() if is_conv1d(module) else weight


def linear_weight_shape(module: nn.Module) -> tuple[int, int]:
    """The ``out x in`` shape of the layer's weight as a ``Linear4bit`` holds it."""
    in_features, out_features = linear_features(module)
    return out_features, in_features


__all__ = ["as_linear_weight", "is_conv1d", "is_linear", "linear_features", "linear_weight_shape"]
