"""Mixture-of-experts weights in 4 bits: each expert of a fused 3-D parameter quantized on its own.

transformers 5 stores the experts of a mixture-of-experts layer as fused 3-D parameters
(``experts.gate_up_proj``: experts x 2*intermediate x hidden, ``experts.down_proj``), not as
``nn.Linear`` layers, so a bitsandbytes 4-bit load leaves them in 16 bits although they are 90 %+ of
the model. Here each expert's matrix is quantized as a ``Linear4bit`` weight would be (NF4 or FP4,
blocks of 64, double quantization, from ``compute_dtype``), and the packed experts are stacked in one
frozen parameter per fused tensor (:class:`ExpertWeights4bit`): about 4.13 bits per expert parameter
with double quantization.

The experts module keeps its class, router interplay and attributes; its forward becomes
:func:`experts_forward`, which runs only the experts the router picked, each through bitsandbytes'
``matmul_4bit`` on that expert's packed weight: forward and backward dequantize one expert at a
time, never the layer. It follows transformers' experts interface (``use_experts_implementation``:
``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``, ``has_post_expert_norm``), so every
family built on it is covered; an experts module outside that interface is refused by name.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.torch import own_parameters
from lightning_paged.core.compat.transformers import apply_expert_gate, is_expert_parallel
from lightning_paged.core.errors import SettingError
from lightning_paged.core.experts_lora import ORDER, add_expert_lora, expert_lora_delta
from lightning_paged.core.qlora_config import DTYPES, STORAGE_DTYPES, QLoRAConfig

EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
"""The fused expert weights of transformers' experts interface (``integrations/moe.py``)."""
INTERFACE = ("has_gate", "has_bias", "is_transposed")
"""Attributes ``use_experts_implementation`` gives an experts module; their presence marks the interface."""
BLOCKSIZE = 64
"""Values per 4-bit block (bitsandbytes' ``Params4bit`` default)."""
NESTED_BLOCKSIZE = 256
"""Block maxima per block of the double quantization (``quantize_4bit``'s ``compress_statistics``)."""

ExpertReader = Callable[[str, int], torch.Tensor]
"""Given a fused parameter's name and an expert index, that expert's 2-D weight (as the parameter stores it)."""


class ExpertWeights4bit(nn.Module):
    """One fused expert parameter in 4 bits, each expert quantized on its own; in place of the 3-D parameter.

    ``weight`` holds the packed experts, one row each (frozen); the buffers hold each expert's
    quantization state (``absmax``; with double quantization its 8-bit codes plus ``nested_absmax``
    and ``offset``). Expert ``e`` is stored as ``out x in`` (a ``Linear4bit`` weight's orientation),
    transposed first when the module stores its experts ``in x out`` (``is_transposed``).
    """

    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor
    nested_code: torch.Tensor
    offset: torch.Tensor

    def __init__(
        self, shape: tuple[int, int, int], transposed: bool, config: QLoRAConfig, device: torch.device
    ) -> None:
        super().__init__()
        experts, rows, columns = shape
        self.num_experts = experts
        self.out_features, self.in_features = (columns, rows) if transposed else (rows, columns)
        self.transposed = transposed
        self.quant_type = config.quant_type
        self.compute_dtype = DTYPES[config.compute_dtype]
        self.nested = config.double_quant
        storage = STORAGE_DTYPES[config.quant_storage]
        values = self.out_features * self.in_features
        blocks = -(-values // BLOCKSIZE)
        packed = (values + 1) // (storage.itemsize * 2)
        self.weight = nn.Parameter(
            torch.empty(experts, packed, dtype=storage, device=device), requires_grad=False
        )
        absmax_dtype = torch.uint8 if self.nested else torch.float32
        self.register_buffer("absmax", torch.empty(experts, blocks, dtype=absmax_dtype, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))
        if self.nested:
            nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax", torch.empty(experts, nested_blocks, device=device))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.empty(experts, dtype=torch.float32, device=device))

    @property
    def stored_shape(self) -> tuple[int, int, int]:
        """The shape of the 3-D parameter this replaces."""
        if self.transposed:
            return (self.num_experts, self.in_features, self.out_features)
        return (self.num_experts, self.out_features, self.in_features)

    @torch.no_grad()
    def set_expert(self, expert: int, weight: torch.Tensor) -> None:
        """Quantize expert ``expert`` from its 2-D weight as the parameter stored it (cast to ``compute_dtype`` first).

        The cast happens where ``weight`` is (the host, for a weight read from a file), then the
        quantization on this module's device, exactly as ``Params4bit`` quantizes a linear weight.
        """
        from bitsandbytes.functional import quantize_4bit

        matrix = weight.t() if self.transposed else weight
        matrix = matrix.to(self.compute_dtype).contiguous().to(self.weight.device)
        packed, state = quantize_4bit(
            matrix,
            blocksize=BLOCKSIZE,
            compress_statistics=self.nested,
            quant_type=self.quant_type,
            quant_storage=self.weight.dtype,
        )
        self.weight.data[expert].copy_(packed.reshape(-1))
        self.absmax[expert].copy_(state.absmax)
        self.code.copy_(state.code)
        if self.nested:
            self.nested_absmax[expert].copy_(state.state2.absmax)
            self.nested_code.copy_(state.state2.code)
            self.offset[expert].copy_(state.offset)

    def quant_state(self, expert: int) -> Any:
        """bitsandbytes' ``QuantState`` of expert ``expert`` (views of this module's buffers)."""
        from bitsandbytes.functional import QuantState

        nested = None
        if self.nested:
            nested = QuantState(
                absmax=self.nested_absmax[expert],
                code=self.nested_code,
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        return QuantState(
            absmax=self.absmax[expert],
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.code,
            blocksize=BLOCKSIZE,
            quant_type=self.quant_type,
            dtype=self.compute_dtype,
            offset=self.offset[expert] if self.nested else None,
            state2=nested,
        )

    def matmul(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """``x @ W_e^T`` through bitsandbytes' ``matmul_4bit``: backward dequantizes this expert again, alone."""
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x, self.weight[expert], quant_state=self.quant_state(expert))

    @torch.no_grad()
    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """The dense weight of one expert (``out x in``), or of all as the 3-D parameter stored them."""
        from bitsandbytes.functional import dequantize_4bit

        if expert is not None:
            return dequantize_4bit(self.weight[expert], self.quant_state(expert))
        dense = torch.stack([self.dequantize(e) for e in range(self.num_experts)])
        return dense.transpose(1, 2) if self.transposed else dense

    def nbytes(self) -> int:
        """Bytes of the packed experts and their quantization state (the code tables excluded, as for ``Linear4bit``)."""
        tensors = [self.weight, self.absmax]
        if self.nested:
            tensors += [self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
            f"quant_type={self.quant_type}, double_quant={self.nested}"
        )


def expert_parameters(module: nn.Module) -> list[str]:
    """The fused 3-D expert parameters a module holds itself, in their registration order."""
    return [
        name
        for name, param in own_parameters(module).items()
        if name in EXPERT_PARAMETERS and param is not None and param.ndim == 3
    ]


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding fused 3-D expert weights (in 16 or 4 bits), by name."""
    found = {}
    for name, module in model.named_modules():
        if expert_parameters(module) or is_4bit_experts(module):
            found[name] = module
    return found


def is_4bit_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module whose weights :func:`quantize_experts` made 4-bit."""
    return any(isinstance(getattr(module, n, None), ExpertWeights4bit) for n in EXPERT_PARAMETERS)


def check_interface(name: str, module: nn.Module, setting: str = "quantize_experts") -> None:
    """Refuse, by name, an experts module that does not follow transformers' experts interface."""
    missing = [a for a in (*INTERFACE, "num_experts") if not hasattr(module, a)]
    if missing or is_expert_parallel(module):
        raise SettingError(
            setting,
            True,
            f"cannot handle the experts of {name} ({type(module).__name__}): its forward is not transformers' "
            "experts interface (use_experts_implementation: Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE, DeepSeek, "
            f"GPT-OSS, ...) or it is expert-parallel. Set {setting} to false to keep its experts in 16 bits",
        )


def check_experts(model: nn.Module, config: QLoRAConfig) -> None:
    """Refuse, before anything is converted, experts that ``quantize_experts`` or ``lora_on_experts`` cannot handle."""
    if config.quantize_experts or config.lora_on_experts:
        setting = "quantize_experts" if config.quantize_experts else "lora_on_experts"
        for name, module in find_experts(model).items():
            check_interface(name, module, setting)


def _record_order(module: nn.Module) -> None:
    module.__dict__.setdefault(ORDER, tuple(expert_parameters(module)))


@dataclass
class ExpertsReport:
    """What :func:`quantize_experts` did."""

    tensors: list[str] = field(default_factory=list)
    """Fused expert parameters now 4-bit (``model.layers.0.mlp.experts.gate_up_proj``, ...)."""
    experts: int = 0
    """Experts quantized, counting each fused parameter's experts."""
    parameters: int = 0
    """Expert parameters (matrix entries) now in 4 bits."""
    packed_elements: int = 0
    """Elements of the packed parameters that hold them (for parameter counts)."""
    nbytes: int = 0
    """Bytes of the 4-bit experts with their quantization state."""
    nbytes_16bit: int = 0
    """What the same experts take at 16 bits."""


def quantize_experts(
    model: nn.Module, config: QLoRAConfig, device: torch.device, read: ExpertReader | None = None
) -> ExpertsReport:
    """Replace every fused expert parameter of ``model`` by :class:`ExpertWeights4bit`, one expert at a time.

    ``read(name, e)`` gives expert ``e`` of parameter ``name`` (default: the parameter's own data), so a
    streaming load quantizes experts as it reads them and never holds a layer's experts at 16 bits.
    """
    report = ExpertsReport()
    for module_name, module in find_experts(model).items():
        check_interface(module_name, module)
        _record_order(module)
        prefix = f"{module_name}." if module_name else ""
        for param_name in expert_parameters(module):
            full = prefix + param_name
            param = own_parameters(module)[param_name]
            assert param is not None
            shape = (param.shape[0], param.shape[1], param.shape[2])
            weights = ExpertWeights4bit(shape, bool(module.is_transposed), config, device)
            for expert in range(weights.num_experts):
                weights.set_expert(expert, read(full, expert) if read is not None else param.data[expert])
            del own_parameters(module)[param_name]
            setattr(module, param_name, weights)
            report.tensors.append(full)
            report.experts += weights.num_experts
            report.parameters += param.numel()
            report.packed_elements += weights.weight.numel()
            report.nbytes += weights.nbytes()
            report.nbytes_16bit += param.numel() * 2
        module.forward = types.MethodType(experts_forward, module)
    return report


def adapt_experts(model: nn.Module, config: QLoRAConfig, device: torch.device) -> list[str]:
    """LoRA on every fused expert parameter (4 or 16-bit), PEFT's layout; returns its ``target_parameters``."""
    modules = find_experts(model)
    for module_name, module in modules.items():
        check_interface(module_name, module, "lora_on_experts")
        _record_order(module)
        module.forward = types.MethodType(experts_forward, module)
    return add_expert_lora(modules, config, device)


def experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The forward of a 4-bit experts module: transformers' eager expert loop, one 4-bit expert at a time.

    Tokens are grouped by the experts the router chose; each chosen expert runs its projections
    through ``matmul_4bit`` (plus its LoRA pair, when the experts are adapted), and its outputs,
    weighted by the router, are added back where the tokens came from.
    """
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        chosen = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for expert in chosen:
        top_k_position, tokens = torch.where(mask[expert])
        state = hidden_states[tokens]
        if self.has_gate:
            state = apply_expert_gate(self, _project(self, "gate_up_proj", state, expert))
        else:
            state = self.act_fn(_project(self, "up_proj", state, expert))
        state = _project(self, "down_proj", state, expert)
        if getattr(self, "has_post_expert_norm", False):
            state = self.post_expert_norm(state)
        state = state * top_k_weights[tokens, top_k_position, None]
        final.index_add_(0, tokens, state.to(final.dtype))
    return final


def _project(module: Any, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
    weights = getattr(module, name)
    if isinstance(weights, ExpertWeights4bit):
        out = weights.matmul(x, expert)
    else:  # 16-bit experts (quantize_experts off) with LoRA on them
        matrix = weights[expert]
        out = nn.functional.linear(x, matrix.t() if module.is_transposed else matrix)
    if module.has_bias:
        out = out + getattr(module, f"{name}_bias")[expert].to(out.dtype)
    delta = expert_lora_delta(module, name, x, expert)
    return out if delta is None else out + delta.to(out.dtype)


def dense_copy_of_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every 4-bit fused expert parameter dequantized to its dense 3-D form, by parameter name."""
    dense = {}
    for module_name, module in find_experts(model).items():
        for param_name in EXPERT_PARAMETERS:
            weights = getattr(module, param_name, None)
            if isinstance(weights, ExpertWeights4bit):
                dense[f"{module_name}.{param_name}"] = weights.dequantize()
    return dense


__all__ = [
    "ExpertWeights4bit",
    "ExpertsReport",
    "adapt_experts",
    "dense_copy_of_experts",
    "experts_forward",
    "find_experts",
    "is_4bit_experts",
    "quantize_experts",
]
