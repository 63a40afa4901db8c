"""Turning a torch module into NF4 QLoRA: frozen 4-bit base weights with trainable LoRA adapters.

Framework-free: the Lightning strategy, the Fabric plugin and the Accelerate helper all call
:func:`convert_to_qlora` on the module they are about to move to a device.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lightning_paged.core.errors import SettingError

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORAGE_DTYPES = {"uint8": torch.uint8, **DTYPES}


@dataclass
class QLoRAConfig:
    """Settings of the NF4 + LoRA conversion. The single source of their defaults."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base weights."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.37 bits per parameter less)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Data type of the 4-bit matmuls and of the non-quantized weights (embeddings, head, biases)."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage type of the packed 4-bit weights (a float type lets FSDP-style sharding treat them uniformly)."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Linear layers left unquantized and without adapters: module names or name suffixes."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale is ``lora_alpha / lora_r``, or ``/ sqrt(lora_r)`` with rsLoRA)."""
    lora_dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """``"all-linear"`` (every quantized layer) or a list of layer names or name suffixes."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    gradient_checkpointing: bool = True
    """Non-reentrant activation checkpointing on models that support it (transformers models)."""
    upcast_non_quantized: bool = False
    """Cast every non-quantized weight to float32 (PEFT's ``prepare_model_for_kbit_training`` default). Costs memory."""

    def validate(self) -> None:
        """Raise :class:`SettingError` naming the first bad setting."""
        if self.quant_type not in QUANT_TYPES:
            raise SettingError("quant_type", self.quant_type, f"must be one of {', '.join(QUANT_TYPES)}")
        if self.compute_dtype not in DTYPES:
            raise SettingError("compute_dtype", self.compute_dtype, f"must be one of {', '.join(DTYPES)}")
        if self.quant_storage not in STORAGE_DTYPES:
            raise SettingError(
                "quant_storage", self.quant_storage, f"must be one of {', '.join(STORAGE_DTYPES)}"
            )
        if not isinstance(self.lora_r, int) or self.lora_r <= 0:
            raise SettingError("lora_r", self.lora_r, "must be a positive integer (typical: 8, 16, 64)")
        if self.lora_alpha <= 0:
            raise SettingError("lora_alpha", self.lora_alpha, "must be positive (typical: 2 * lora_r)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SettingError("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise SettingError(
                "target_modules", self.target_modules, "must be 'all-linear' or a list of layer names"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise SettingError("target_modules", self.target_modules, "must not be empty")


@dataclass
class ConversionReport:
    """What :func:`convert_to_qlora` did, for the one-line summary and for tests."""

    quantized: list[str]
    skipped: list[str]
    adapted: list[str]
    total_params: int
    trainable_params: int
    quantized_bytes: int
    replaced_16bit_bytes: int

    def summary(self) -> str:
        ratio = self.quantized_bytes / self.replaced_16bit_bytes if self.replaced_16bit_bytes else 0.0
        skipped = ", ".join(self.skipped) if self.skipped else "none"
        return (
            f"QLoRA: {len(self.quantized)} linear layers quantized to 4-bit, {len(self.skipped)} skipped "
            f"({skipped}); LoRA on {len(self.adapted)} layers; "
            f"{self.trainable_params:,} of {self.total_params:,} parameters trainable "
            f"({100.0 * self.trainable_params / max(self.total_params, 1):.2f}%); "
            f"4-bit weights {_fmt_bytes(self.quantized_bytes)} in place of "
            f"{_fmt_bytes(self.replaced_16bit_bytes)} at 16 bits ({ratio:.3f}x)"
        )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def select_target(module: nn.Module, attr: str | None = "auto") -> nn.Module:
    """The module the conversion applies to.

    The rule: ``attr="auto"`` takes the ``model`` attribute when it is an ``nn.Module`` (the usual
    LightningModule that holds a transformers model), else the module itself; ``attr=None`` or ``""``
    takes the module itself; any other string is a dotted attribute path.
    """
    if attr == "auto":
        inner = getattr(module, "model", None)
        return inner if isinstance(inner, nn.Module) else module
    if not attr:
        return module
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SettingError("model_attr", attr, f"names no attribute of {type(module).__name__}")
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        raise SettingError("model_attr", attr, f"is a {type(target).__name__}, not a torch module")
    return target


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _resolve_targets(config: QLoRAConfig, linear_names: Sequence[str], quantized: Sequence[str]) -> list[str]:
    if config.target_modules == "all-linear":
        return list(quantized)
    wanted = list(config.target_modules)
    unmatched = [p for p in wanted if not any(_matches(n, [p]) for n in linear_names)]
    if unmatched:
        raise SettingError(
            "target_modules",
            unmatched,
            "match no linear layer; linear layers found: " + ", ".join(_short_names(linear_names)),
        )
    skipped_hits = [n for n in linear_names if _matches(n, wanted) and n not in quantized]
    if skipped_hits:
        raise SettingError(
            "target_modules",
            wanted,
            f"select layers that skip_modules leaves unquantized ({', '.join(skipped_hits)}); "
            "remove them from one of the two lists",
        )
    return [n for n in quantized if _matches(n, wanted)]


def _short_names(names: Sequence[str]) -> list[str]:
    """Layer names with block indices folded (``model.layers.*.self_attn.q_proj``), for messages."""
    folded = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return list(folded)


def _peft_target_spec(targets: Sequence[str], linear_names: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``targets``.

    Leaf names (``q_proj``) when they select no other linear layer, full names otherwise, so the
    exported ``adapter_config.json`` stays readable and loads onto the same model elsewhere.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
    chosen = {n for n in linear_names if _matches(n, leaves)}
    if chosen == set(targets):
        return leaves
    return list(targets)


def _quantize_linear(linear: nn.Linear, config: QLoRAConfig, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    compute_dtype = DTYPES[config.compute_dtype]
    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=STORAGE_DTYPES[config.quant_storage],
        device="meta",
    )
    weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        compress_statistics=config.double_quant,
        quant_type=config.quant_type,
        quant_storage=STORAGE_DTYPES[config.quant_storage],
        module=new,
    )
    new.weight = weight.to(device)  # type: ignore[misc]  # quantizes on the target device
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


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
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


def _place_non_quantized(model: nn.Module, config: QLoRAConfig, device: torch.device) -> None:
    """Own the dtype of every weight that stays in floating point.

    Embeddings, head and biases take ``compute_dtype`` (float32 with ``upcast_non_quantized``).
    Norm weights are kept in float32 for stability, with their output cast back to the input's
    dtype so activations stay in ``compute_dtype``.
    """
    import bitsandbytes as bnb

    floating = torch.float32 if config.upcast_non_quantized else DTYPES[config.compute_dtype]
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            continue
        norm = _is_norm(module)
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                dtype = torch.float32 if norm else floating
                param.data = param.data.to(device=device, dtype=dtype)
        if norm and not config.upcast_non_quantized:
            module.register_forward_hook(_cast_back_to_input_dtype)


def _enable_checkpointing(model: Any) -> bool:
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


def convert_to_qlora(
    model: nn.Module, config: QLoRAConfig | None = None, device: torch.device | str | None = None
) -> ConversionReport:
    """Convert ``model`` in place: 4-bit base weights, LoRA adapters, only adapters trainable.

    Quantization happens on ``device`` (the model's current device when None), one layer at a
    time, so a model on the host never needs its 16-bit weights on the accelerator.
    """
    config = config or QLoRAConfig()
    config.validate()
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        raise SettingError("model", type(model).__name__, "is already quantized; convert a module only once")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear_names:
        raise SettingError(
            "model",
            type(model).__name__,
            "has no nn.Linear layers to quantize; QLoRA needs a model built of linear layers "
            "(set model_attr to the submodule that holds them)",
        )
    quantized = [n for n in linear_names if not _matches(n, config.skip_modules)]
    skipped = [n for n in linear_names if n not in quantized]
    if not quantized:
        raise SettingError(
            "skip_modules",
            config.skip_modules,
            f"leaves none of the {len(linear_names)} linear layers to quantize",
        )
    targets = _resolve_targets(config, linear_names, quantized)

    replaced_bytes = 0
    quantized_bytes = 0
    for name in quantized:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        replaced_bytes += linear.weight.numel() * 2
        new = _quantize_linear(linear, config, device)
        quantized_bytes += quantized_weight_bytes(new)
        _set_submodule(model, name, new)
        del linear

    _place_non_quantized(model, config, device)
    for param in model.parameters():
        param.requires_grad_(False)

    # PEFT picks its 4-bit LoRA layer only when the model says it is loaded in 4-bit.
    model.is_loaded_in_4bit = True  # type: ignore[assignment]
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=_peft_target_spec(targets, linear_names),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        bias="none",
    )
    inject_adapter_in_model(lora, model)
    model.peft_config = {"default": lora}  # type: ignore[assignment]
    for name, param in model.named_parameters():
        is_adapter = "lora_" in name
        param.requires_grad_(is_adapter)
        if is_adapter:  # adapters train in float32 whatever the compute dtype
            param.data = param.data.to(device=device, dtype=torch.float32)

    if config.gradient_checkpointing and not _enable_checkpointing(model):
        log.info("gradient_checkpointing: %s does not support it; running without", type(model).__name__)

    total = sum(_param_count(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ConversionReport(
        quantized=quantized,
        skipped=skipped,
        adapted=targets,
        total_params=total,
        trainable_params=trainable,
        quantized_bytes=quantized_bytes,
        replaced_16bit_bytes=replaced_bytes,
    )


def _param_count(param: torch.Tensor) -> int:
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
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    restored = 0
    for layer in layers:
        weight: Any = layer.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            layer.quant_state = weight.quant_state
            restored += 1
    return restored
