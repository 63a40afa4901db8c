"""The bitsandbytes side of the conversion: one linear layer to a frozen ``Linear4bit``, and back to training.

The second floor of the conversion, on the settings of :mod:`~lightning_paged.core.qlora_config`:
quantizing a layer (``nn.Linear`` or transformers' ``Conv1D``) on its target device, the dtypes of everything that stays in floating point,
activation checkpointing, and undoing bitsandbytes' CPU inference repacking.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.bitsandbytes import undo_cpu_packing
from lightning_paged.core.conv1d import as_linear_weight, linear_features
from lightning_paged.core.experts4bit import ExpertWeights4bit
from lightning_paged.core.qlora_config import DTYPES, STORAGE_DTYPES, QLoRAConfig


def quantize_weight(
    weight: torch.Tensor, config: QLoRAConfig, device: torch.device, module: Any = None
) -> Any:
    """One linear weight as a frozen bitsandbytes ``Params4bit``, quantized on ``device`` from ``compute_dtype``.

    bitsandbytes records the dtype of the tensor it quantizes in ``quant_state.dtype`` and
    dequantizes back to it in every forward, backward and checkpointed recompute, casting to the
    activations' dtype afterwards: a float32 source would cost a float32 copy of each weight every
    time. So the weight is cast to ``compute_dtype`` first (on the host, one layer at a time).
    transformers' 4-bit loading does the same: it casts each checkpoint tensor to the load dtype
    (``dtype=``, the compute dtype in the QLoRA recipe) before ``Params4bit`` quantizes it, so
    the packed bytes match its load of the same files at that dtype. ``module`` is the
    ``Linear4bit`` that shares the quantization state. Every path that quantizes a base weight
    (the conversion, a streaming loader) goes through this function.
    """
    return params4bit(weight, config, module).to(device)  # quantizes on the target device


def params4bit(weight: torch.Tensor, config: QLoRAConfig, module: Any = None) -> Any:
    """``weight`` cast to ``compute_dtype`` in a frozen, not yet quantized ``Params4bit`` of ``config``'s 4-bit settings."""
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(
        weight.to(DTYPES[config.compute_dtype]),
        requires_grad=False,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=STORAGE_DTYPES[config.quant_storage],
        module=module,
    )


def quantize_linear(
    linear: Any, config: QLoRAConfig, device: torch.device, weight: torch.Tensor | None = None
) -> nn.Module:
    """The ``Linear4bit`` for ``linear``, quantized on ``device`` from ``weight`` (default: its own).

    ``linear`` is an ``nn.Linear`` or a ``Conv1D``, whose weight (stored ``in x out``) is transposed
    first, as transformers' 4-bit load does.
    """
    source = as_linear_weight(linear, linear.weight.data if weight is None else weight)
    return linear4bit(linear, config, device, lambda new: quantize_weight(source, config, device, module=new))


def linear4bit(
    linear: Any, config: QLoRAConfig, device: torch.device, weight: Callable[[Any], nn.Parameter]
) -> nn.Module:
    """A ``Linear4bit`` in place of ``linear`` whose 4-bit weight ``weight(new_layer)`` makes on ``device``."""
    import bitsandbytes as bnb

    compute_dtype = DTYPES[config.compute_dtype]
    in_features, out_features = linear_features(linear)
    new = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=STORAGE_DTYPES[config.quant_storage],
        device="meta",
    )
    new.weight = weight(new)
    # On CPUs with AVX512-BF16 an eval forward would repack the weight in place for inference,
    # storing absmax in bfloat16; undoing that re-quantizes it, so every validation pass would
    # nudge the frozen base weights. Training needs them bit-stable: keep the training layout.
    new.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data.to(device=device, dtype=compute_dtype), requires_grad=False)
    return new


def quantized_weight_bytes(layer: nn.Module) -> int:
    """Bytes of a ``Linear4bit`` weight: packed data plus its absmax constants (code tables excluded)."""
    weight: Any = layer.weight
    total = weight.data.numel() * weight.data.element_size()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        total += state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            total += state.offset.numel() * state.offset.element_size()
    return total


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _cast_back_to_input_dtype(module: nn.Module, args: tuple, output: object) -> object:
    if (
        args
        and isinstance(args[0], torch.Tensor)
        and isinstance(output, torch.Tensor)
        and output.dtype != args[0].dtype
    ):
        return output.to(args[0].dtype)
    return output


def place_non_quantized(
    model: nn.Module, config: QLoRAConfig, device: torch.device, modules: Iterable[nn.Module] | None = None
) -> None:
    """Own the dtype of every weight that stays in floating point.

    Embeddings, head and biases take ``compute_dtype`` (float32 with ``upcast_non_quantized``).
    Norm weights are kept in float32 for stability, with their output cast back to the input's
    dtype so activations stay in ``compute_dtype``. ``modules`` limits it to those modules' own weights.
    """
    import bitsandbytes as bnb

    for module in model.modules() if modules is None else modules:
        if isinstance(module, (bnb.nn.Linear4bit, ExpertWeights4bit)):
            continue
        dtype = non_quantized_dtype(module, config)
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(device=device, dtype=dtype)
        if _is_norm(module) and not config.upcast_non_quantized:
            module.register_forward_hook(_cast_back_to_input_dtype)


def non_quantized_dtype(module: nn.Module, config: QLoRAConfig) -> torch.dtype:
    """The dtype of a floating-point weight of ``module`` that stays unquantized (see ``place_non_quantized``)."""
    if config.upcast_non_quantized or _is_norm(module):
        return torch.float32
    return DTYPES[config.compute_dtype]


def enable_checkpointing(model: Any) -> bool:
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    return True


def param_count(param: torch.Tensor) -> int:
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def restore_training_layout(layers: Iterable[nn.Module]) -> int:
    """Undo bitsandbytes' CPU repacking of 4-bit weights; returns how many layers it undid.

    On a CPU with AVX512-BF16, a ``Linear4bit`` forward in eval or no-grad mode repacks its weight
    in place for fast inference. Training on such a weight fails or silently loses input gradients,
    so any validation or generation on CPU must be followed by this before the next training step.
    """
    restored = 0
    for layer in layers:
        weight: Any = layer.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = undo_cpu_packing(weight.data, state)
            layer.quant_state = weight.quant_state
            restored += 1
    return restored
