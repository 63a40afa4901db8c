"""What the conversion applies to: the target module, and which of its linear layers are quantized and adapted.

A linear layer is an ``nn.Linear`` (subclasses included, such as Falcon's ``FalconLinear``) or
transformers' ``Conv1D`` (GPT-2's linear layer, its weight stored ``in x out``: :mod:`.conv1d`).
Names only, nothing is changed: a front door can check a selection before anything starts, and the
whole-model conversion (:mod:`~lightning_paged.core.qlora`) and the sharded load
(:mod:`~lightning_paged.core.fsdp_load`) select the same layers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_paged.core.conv1d import is_linear
from lightning_paged.core.errors import SettingError
from lightning_paged.core.qlora_config import QLoRAConfig


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


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a layer name is one of ``patterns`` or ends with ``.<pattern>``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Every linear layer of ``model`` (``nn.Linear`` or ``Conv1D``), in module order."""
    return [n for n, m in model.named_modules() if is_linear(m)]


def short_names(names: Sequence[str]) -> list[str]:
    """Layer names with block indices folded (``model.layers.*.self_attn.q_proj``), for messages."""
    folded = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return list(folded)


def _resolve_targets(config: QLoRAConfig, linear_names: Sequence[str], quantized: Sequence[str]) -> list[str]:
    if config.target_modules == "all-linear":
        return list(quantized)
    wanted = list(config.target_modules)
    unmatched = [p for p in wanted if not any(matches(n, [p]) for n in linear_names)]
    if unmatched:
        raise SettingError(
            "target_modules",
            unmatched,
            "match no linear layer; linear layers found: " + ", ".join(short_names(linear_names)),
        )
    skipped_hits = [n for n in linear_names if matches(n, wanted) and n not in quantized]
    if skipped_hits:
        raise SettingError(
            "target_modules",
            wanted,
            f"select layers that skip_modules leaves unquantized ({', '.join(skipped_hits)}); "
            "remove them from one of the two lists",
        )
    return [n for n in quantized if matches(n, wanted)]


def peft_target_spec(targets: Sequence[str], module_names: Sequence[str]) -> list[str]:
    """The shortest PEFT ``target_modules`` list that selects exactly ``targets`` among ``module_names``.

    Leaf names (``q_proj``) when they select no other module (a skipped layer, or 4-bit experts named
    ``down_proj``), full names otherwise, so the exported ``adapter_config.json`` stays readable and
    loads onto the same model elsewhere.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in targets})
    chosen = {n for n in module_names if matches(n, leaves)}
    if chosen == set(targets):
        return leaves
    return list(targets)


def tied_elsewhere(model: nn.Module, layers: Iterable[str]) -> dict[str, str]:
    """Layers among ``layers`` whose weight is also another module's parameter (tied embeddings): layer to the other."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append(
                f"{module_name}.{param_name}" if module_name else param_name
            )
    tied = {}
    for layer in layers:
        weight = model.get_submodule(layer).weight
        others = [n for n in owners.get(id(weight), []) if n != f"{layer}.weight"]
        if others:
            tied[layer] = others[0].removesuffix(".weight")
    return tied


def select_layers(model: nn.Module, config: QLoRAConfig) -> tuple[list[str], list[str], list[str]]:
    """``(linear layers, those to quantize, those to adapt)`` of ``model`` under ``config``'s selection.

    Raises :class:`SettingError` for a selection the conversion would refuse.
    """
    linear_names = linear_layer_names(model)
    if not linear_names:
        raise SettingError(
            "model",
            type(model).__name__,
            "has no linear layers (nn.Linear or transformers' Conv1D) to quantize; QLoRA needs a model built of "
            "linear layers (set model_attr to the submodule that holds them)",
        )
    # Every entry must select a layer (a typo would quantize what it meant to keep), but the default
    # "lm_head": models without an output layer keep the default.
    unmatched = [
        p for p in config.skip_modules if p != "lm_head" and not any(matches(n, [p]) for n in linear_names)
    ]
    if unmatched:
        raise SettingError(
            "skip_modules",
            unmatched,
            "match no linear layer; linear layers found: " + ", ".join(short_names(linear_names)),
        )
    quantized = [n for n in linear_names if not matches(n, config.skip_modules)]
    if not quantized:
        raise SettingError(
            "skip_modules",
            config.skip_modules,
            f"leaves none of the {len(linear_names)} linear layers to quantize",
        )
    tied = tied_elsewhere(model, quantized)
    if tied:
        layer, other = next(iter(tied.items()))
        raise SettingError(
            "skip_modules",
            config.skip_modules,
            f"leaves {layer} to quantize, but its weight is {other}'s too (tied embeddings): quantizing it "
            f"would untie them. Keep {layer.rpartition('.')[2]} in skip_modules",
        )
    return linear_names, quantized, _resolve_targets(config, linear_names, quantized)


__all__ = [
    "linear_layer_names",
    "matches",
    "peft_target_spec",
    "select_layers",
    "select_target",
    "short_names",
    "tied_elsewhere",
]
