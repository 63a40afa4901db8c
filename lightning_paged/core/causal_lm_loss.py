"""The causal-LM loss of a transformers model without its full logits, or the model's own loss where that is unsafe.

:func:`causal_lm_loss` runs the model with its output layer standing aside (the layer's input is
kept, an empty tensor goes on in place of the logits) and computes the loss from that input with
:func:`~lightning_paged.core.loss.chunked_cross_entropy`. What the model does *after* its output
layer must be known for that to be the model's loss, so :func:`loss_plan` reads the model class's
``forward``: every statement between the output layer's call and the loss must be one of the logit
transforms below, reproduced exactly; anything else, and every model that is not a transformers
causal LM with ``ForCausalLMLoss``, falls back to the model's own (standard) loss, with the reason.

Reproduced transforms (transformers 5.25 sources):

- ``final_logit_softcapping`` (Gemma 2, Gemma 3, VaultGemma, ...): ``tanh(logits / cap) * cap``;
- ``logit_scale`` (Cohere, Cohere 2): ``logits * logit_scale``;
- ``logits_scaling`` (Granite, Granite MoE): ``logits / logits_scaling``.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_paged.core.loss import (
    DEFAULT_CHUNK_SIZE,
    LogitTransform,
    LossKind,
    Reduction,
    chunked_cross_entropy,
)
from lightning_paged.core.packing import IGNORE_INDEX, model_inputs

# Statements transformers' causal-LM forwards run between the output layer and the loss (comments
# removed, spaces collapsed), with the transform each belongs to.
_SOFTCAP, _MULTIPLY, _DIVIDE = "softcap", "multiply", "divide"
_KNOWN_STATEMENTS = {
    "if self.config.final_logit_softcapping is not None:": _SOFTCAP,
    "logits = logits / self.config.final_logit_softcapping": _SOFTCAP,
    "logits = torch.tanh(logits)": _SOFTCAP,
    "logits = logits * self.config.final_logit_softcapping": _SOFTCAP,
    "if (final_logit_softcapping := self.config.get_text_config().final_logit_softcapping) is not None:": _SOFTCAP,
    "logits = logits / final_logit_softcapping": _SOFTCAP,
    "logits = logits * final_logit_softcapping": _SOFTCAP,
    "logits = logits * self.logit_scale": _MULTIPLY,
    "logits = logits / self.config.logits_scaling": _DIVIDE,
}
_END_OF_HEAD = re.compile(r"^(loss\s*=|if labels is not None|return\b)")


@dataclass(frozen=True)
class LossPlan:
    """How the loss of one model is computed: chunked through ``head`` with ``transform``, or the model's own.

    ``fallback`` is None for the chunked loss, else the reason the model's own loss runs instead.
    """

    head: nn.Module | None = None
    transform: LogitTransform = field(default_factory=LogitTransform)
    fallback: str | None = None

    @property
    def chunked(self) -> bool:
        return self.fallback is None


def loss_plan(model: nn.Module) -> LossPlan:
    """Whether the chunked loss reproduces ``model``'s own loss, and with which head and transform.

    ``model`` is a transformers causal LM, converted or not, or a PEFT model around one.
    """
    base = _base_model(model)
    name = type(base).__name__
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module) or getattr(base, "config", None) is None:
        return LossPlan(fallback=f"{name} is not a transformers causal LM with an output layer")
    if not _uses_causal_lm_loss(base):
        return LossPlan(fallback=f"{name} computes its loss with {_loss_name(base)}, not ForCausalLMLoss")
    if any(_is_dtensor(p) for p in model.parameters()):
        return LossPlan(
            fallback=f"{name} is sharded (FSDP): its output layer's weight is gathered only inside the "
            "model's forward"
        )
    attribute = next((n for n, m in base.named_children() if m is head), None)
    if attribute is None:
        return LossPlan(fallback=f"{name}'s output layer is not one of its own attributes")
    model_class: Any = type(base)
    kinds = _head_statements(model_class, attribute)
    if isinstance(kinds, str):
        return LossPlan(fallback=f"{name}'s forward {kinds}")
    try:
        transform = _transform(base, kinds)
    except AttributeError as err:
        return LossPlan(
            fallback=f"{name}'s forward transforms its logits with a value it does not hold ({err})"
        )
    return LossPlan(head=head, transform=transform)


def causal_lm_loss(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reduction: Reduction = "mean",
    plan: LossPlan | None = None,
) -> torch.Tensor:
    """The causal-LM loss of a transformers model on ``inputs``, chunked when that reproduces the model's.

    Args:
        model: A transformers causal LM (or a PEFT model around one), converted to QLoRA or not.
        inputs: Its forward's keyword arguments, ``labels`` included (e.g.
            :func:`~lightning_paged.core.packing.model_inputs` of a batch, packed or padded).
        chunk_size: Positions per chunk (see :func:`~lightning_paged.core.loss.chunked_cross_entropy`).
        reduction: ``"mean"`` over the labelled positions, or their ``"sum"``.
        plan: :func:`loss_plan` of ``model``, to skip reading it again; without it, a fallback to the
            model's own loss is warned about (once per reason).

    Returns the same value as ``model(**inputs).loss`` (its mean; times the labelled positions for
    ``"sum"``), within float tolerance; a batch with no labelled position gives zero, not NaN.
    """
    if plan is None:
        plan = loss_plan(model)
        if plan.fallback is not None and plan.fallback not in _WARNED:
            _WARNED.add(plan.fallback)
            warnings.warn(fallback_message(plan.fallback), stacklevel=2)
    if not plan.chunked:
        loss = model(**inputs).loss
        if reduction == "sum":
            loss = loss * (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
        return loss
    assert plan.head is not None
    arguments = dict(inputs)
    labels = arguments.pop("labels")
    hidden = head_input(model, plan.head, arguments)
    return chunked_cross_entropy(
        hidden, plan.head, labels, reduction=reduction, chunk_size=chunk_size, transform=plan.transform
    )


def batch_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    loss: LossKind = "chunked",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    plan: LossPlan | None = None,
) -> torch.Tensor:
    """The training loss of a batch (padded or packed, as the data module makes it) through ``model``.

    ``loss="chunked"``: :func:`causal_lm_loss` (the model's own where it falls back); ``"standard"``:
    the model's own loss, every logit in memory. ``CausalLMModule`` trains with it, and the memory
    plan runs it on the model of its dry run.
    """
    inputs = model_inputs(batch, model)
    if loss == "standard":
        return model(**inputs).loss
    return causal_lm_loss(model, inputs, chunk_size=chunk_size, plan=plan)


def fallback_message(reason: str) -> str:
    """The one line that says the standard loss runs instead of the chunked one, and why."""
    return f"The chunked loss is off for this model: {reason}. Its standard loss runs, with every logit in memory."


_WARNED: set[str] = set()
"""Fallback reasons already warned about by :func:`causal_lm_loss`."""


def head_input(model: nn.Module, head: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``model``'s forward on ``inputs`` up to ``head``: the hidden states the head would map to logits.

    While the model runs, ``head`` returns an empty tensor (``[..., sequence, 0]``) in place of the
    logits; everything the model does before its head (norms, scaling, slicing) runs as usual.
    """
    captured: list[torch.Tensor] = []

    def stand_aside(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        captured.append(hidden)
        return hidden[..., :0]

    own = head.__dict__.get("forward")  # a forward set on the instance (hooks of accelerate, ...)
    head.forward = stand_aside  # type: ignore[method-assign]
    try:
        model(**inputs)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own  # type: ignore[method-assign]
    if len(captured) != 1:
        raise RuntimeError(f"the output layer ran {len(captured)} times in one forward; expected once")
    return captured[0]


_WRAPPERS = ("_FabricModule", "DistributedDataParallel", "DataParallel")
"""Wrappers whose ``module`` is the model (Fabric's ``setup_module``, DDP as Accelerate and Fabric apply it)."""


def _base_model(model: nn.Module) -> nn.Module:
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    get_base = getattr(model, "get_base_model", None)  # a PEFT model
    base = get_base() if callable(get_base) else model
    return base if isinstance(base, nn.Module) else model


def _uses_causal_lm_loss(model: nn.Module) -> bool:
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:
        return False
    return getattr(model, "loss_function", None) is LOSS_MAPPING.get("ForCausalLM")


def _loss_name(model: nn.Module) -> str:
    function = getattr(model, "loss_function", None)
    return getattr(function, "__name__", type(function).__name__)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


@functools.cache
def _head_statements(model_class: Any, attribute: str) -> frozenset[str] | str:
    """The transforms ``model_class.forward`` applies after ``self.<attribute>(...)``; a reason string if unknown."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return "has no readable source"
    lines = [line.split("#", 1)[0].strip() for line in source.splitlines()]
    start = next((i for i, line in enumerate(lines) if f"self.{attribute}(" in line), None)
    head_call = re.match(rf"(\w+) = self\.{attribute}\(", lines[start]) if start is not None else None
    if start is None or head_call is None:
        return f"does not compute its logits as `logits = self.{attribute}(...)`"
    name = head_call.group(1)  # `logits`, `lm_logits`
    kinds: set[str] = set()
    for line in lines[start + 1 :]:
        if not line:
            continue
        if _END_OF_HEAD.match(line):
            return frozenset(kinds)
        kind = _KNOWN_STATEMENTS.get(re.sub(rf"\b{name}\b", "logits", " ".join(line.split())))
        if kind is None:
            return f"transforms its logits in a way not reproduced here (`{line}`)"
        kinds.add(kind)
    return "has no loss after its output layer"


def _transform(model: nn.Module, kinds: frozenset[str]) -> LogitTransform:
    holder: Any = model
    config = holder.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return LogitTransform(
        multiply=float(holder.logit_scale) if _MULTIPLY in kinds else None,
        divide=float(config.logits_scaling) if _DIVIDE in kinds else None,
        softcap=_optional_float(text_config.final_logit_softcapping) if _SOFTCAP in kinds else None,
    )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
