"""The converted model of a dry run, and its batches: the real code on tensors that hold no memory.

:func:`fake_qlora_model` builds a causal LM from its config on the meta device
(:func:`~lightning_paged.core.models.causal_lm`, as a run's ``model_config`` does), converts it
through the entry every front door calls, :func:`~lightning_paged.core.prepare.prepare_model`, each
4-bit weight quantized by bitsandbytes' own ``Params4bit._quantize`` (its ``quantize_4bit`` has a
fake kernel in bitsandbytes 0.50 ``_ops.py``, so packed weights and quantization constants get
their real shapes and dtypes), and gives every tensor a CPU fake storage
(``to_empty`` under ``FakeTensorMode``). CPU, because autograd through fake CUDA tensors fails on a
CPU-only torch; what the CUDA kernels do differently is :mod:`lightning_paged.core.plan.cuda`'s.

:class:`SmallOnesReal` runs an operator on real tensors when all its tensor inputs are real and its
outputs are small: the integer inputs of a batch stay real, so that transformers' data-dependent
choices (is there padding? are sequences packed?) go the way they go in a real run, where on fake
tensors it would take its tracing path and build masks a real run never builds.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.bitsandbytes import quantize_param4bit
from lightning_paged.core.compat.torch import (
    DispatchMode,
    fake_tensor_mode,
    index_put_impl,
    is_fake,
    real_tensors,
    tensor_leaves,
    value_dependent_errors,
)
from lightning_paged.core.conv1d import as_linear_weight
from lightning_paged.core.layers4bit import linear4bit, params4bit
from lightning_paged.core.models import causal_lm
from lightning_paged.core.prepare import prepare_model
from lightning_paged.core.qlora_config import QLoRAConfig

SMALL_BYTES = 8 << 20
"""Outputs up to this size, from real inputs only, are computed for real (batch indices, masks of short rows)."""
_PARAMS4BIT = (
    "blocksize",
    "compress_statistics",
    "quant_type",
    "quant_storage",
    "bnb_quantized",
    "quant_state",
)


def fake_mode() -> Any:
    """The fake-tensor mode of a dry run: real tensors (the batch, bitsandbytes' code tables) may flow in."""
    return fake_tensor_mode()


def meta_model(config: Any) -> nn.Module:
    """The causal LM of a transformers ``config``, parameters and buffers on the meta device."""
    with torch.device("meta"):
        return causal_lm(copy.deepcopy(config))


def convert_on_meta(model: nn.Module, qlora: QLoRAConfig) -> None:
    """:func:`~lightning_paged.core.prepare.prepare_model` on a meta model: the run's layers, adapters, dtypes, checkpointing."""

    def layer(name: str, linear: nn.Module) -> nn.Module:
        def weight(new: Any) -> Any:
            param = params4bit(
                as_linear_weight(linear, linear.get_parameter("weight").data), qlora, module=new
            )
            return quantize_param4bit(param, torch.device("meta"))  # what Params4bit.to(device) runs

        return linear4bit(linear, qlora, torch.device("meta"), weight)

    from bitsandbytes import functional as F

    # bitsandbytes caches its 8-bit code table on the device of its first use; a meta copy would
    # break every later real use. Make it where a first use on the host would.
    if "dynamic" not in F.name2qmap:
        F.name2qmap["dynamic"] = F.create_dynamic_map()
    with torch.device("meta"):  # PEFT makes its adapter layers on the default device
        prepare_model(model, qlora, torch.device("meta"), model_attr=None, layers=layer)


def fake_qlora_model(config: Any, qlora: QLoRAConfig, mode: Any) -> nn.Module:
    """The converted model of ``config`` with CPU fake tensors; ``mode`` must be the active fake mode."""
    import bitsandbytes as bnb

    with real_tensors():  # bitsandbytes' Params4bit cannot wrap a fake tensor: convert on meta first
        model = meta_model(config)
        convert_on_meta(model, qlora)
    saved = {
        module: {name: getattr(module.weight, name) for name in _PARAMS4BIT}
        for module in model.modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    model.to_empty(device="cpu")  # a Params4bit comes back as a plain fake parameter: restore its fields
    for module, fields in saved.items():
        fields["quant_state"] = _fake_quant_state(fields["quant_state"])
        fields["module"] = module
        for name, value in fields.items():
            setattr(module.weight, name, value)
        module.quant_state = fields["quant_state"]
    return model.train()


def _fake_quant_state(state: Any) -> Any:
    state = copy.copy(state)
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            setattr(state, name, torch.empty_like(value, device="cpu"))
    if getattr(state, "state2", None) is not None:
        state.state2 = _fake_quant_state(state.state2)
    return state


class SmallOnesReal(DispatchMode):
    """Runs an operator for real when its tensor inputs are all real and its outputs are small.

    A fake tensor indexed by a real boolean mask (the chunked loss keeps the labelled positions:
    ``hidden[labels != -100]``) gets the mask's positions as real integer indices first, as the
    indexing kernels turn a mask into ``nonzero`` indices themselves; a fake mode cannot know how
    many there are, a real mask says.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if any(is_fake(t) for t in tensor_leaves((args, kwargs))):
            if func in _INDEXING and len(args) > 1 and any(_real_mask(i) for i in args[1]):
                args = (args[0], _positions(args[1]), *args[2:])
            return func(*args, **kwargs)
        try:
            out = func(*args, **kwargs)  # the fake mode's answer gives the output sizes
        except value_dependent_errors():
            out = None  # reads values (``.item()``, ``nonzero``): real inputs can answer that
        if out is not None and _nbytes(out) > SMALL_BYTES:
            return out
        with real_tensors():
            return func(*args, **kwargs)


_INDEXING = (
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    index_put_impl(),
)
"""Operators whose second argument is a list of indices, where a boolean mask stands for its positions."""


def _real_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and not is_fake(index) and index.dtype in (torch.bool, torch.uint8)


def _positions(indices: list[Any]) -> list[Any]:
    """``indices`` with each real mask replaced by the integer positions it selects (one index per dimension)."""
    out: list[Any] = []
    with real_tensors():
        for index in indices:
            out.extend(index.nonzero(as_tuple=True) if _real_mask(index) else [index])
    return out


def _nbytes(out: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensor_leaves(out) if isinstance(t, torch.Tensor))


def planning_batch(batch_size: int, seq_len: int, vocab_size: int, packed: bool) -> dict[str, torch.Tensor]:
    """A batch of ``batch_size`` full rows of ``seq_len`` tokens, every position a target, as the data module makes it.

    Padded: ``input_ids``, an all-ones ``attention_mask`` and ``labels``. Packed: ``input_ids``,
    ``labels``, ``position_ids`` restarting half-way (two samples per row, so the model builds the
    block-diagonal mask a packed row needs) and ``num_tokens``.
    """
    ids = torch.ones(batch_size, seq_len, dtype=torch.long) % max(vocab_size, 1)
    if not packed:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    half = max(seq_len // 2, 1)
    positions = torch.cat([torch.arange(half), torch.arange(seq_len - half)])[:seq_len]
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": positions.expand(batch_size, seq_len).clone(),
        "num_tokens": torch.tensor(batch_size * seq_len),
    }
