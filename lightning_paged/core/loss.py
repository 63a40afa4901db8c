"""Cross-entropy through the output layer, chunk by chunk: the causal-LM loss without the full logits.

The standard causal-LM loss materializes every logit: ``sequence x vocabulary`` of them in the compute
dtype, then again in float32 for the loss, plus their gradient. At 16,384 tokens and a 128,256-word
vocabulary that is 8.4 GB in float32 alone. :func:`chunked_cross_entropy` computes the same loss
from the output layer's *input* instead:

1. The positions whose (shifted) label is ``ignore_index`` are dropped before the head: prompt and
   padding tokens never meet the vocabulary.
2. The kept positions go through the head ``chunk_size`` at a time. Each chunk's logits live only
   while that chunk is computed, so the loss's peak is ``chunk_size x vocabulary``, whatever the length.
3. Gradients:

   - A plain linear head (``nn.Linear``, or a weight tensor) runs one autograd function that computes
     each chunk's gradient in the forward pass, while the chunk's logits exist, and keeps only the
     gradient of the chunk's input (``chunk x hidden``; the head's weight gradient too when the head
     trains). The backward pass scales what was kept: no logits are computed twice, so it costs the
     standard loss's three matrix products.
   - Any other head (a LoRA or 4-bit layer, a module with hooks) runs each chunk under non-reentrant
     activation checkpointing: the backward pass recomputes that chunk's logits from its input.

Models that transform the logits before the loss (Gemma 2/3 soft-capping, Cohere's ``logit_scale``,
Granite's ``logits_scaling``) give a :class:`LogitTransform`; it is applied in the same order and the
same dtype as the model's forward does, before the float32 upcast of transformers' loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from lightning_paged.core.compat.torch import has_module_hooks, is_fake_parameter
from lightning_paged.core.packing import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 256
"""Positions per chunk: 256 x 128,256 float32 logits are 131 MB (TRL's chunked loss uses 256 too)."""

Reduction = Literal["mean", "sum"]

LossKind = Literal["chunked", "standard"]
"""How a causal LM's loss is computed: from the head's input chunk by chunk, or from all the logits."""
LOSS_KINDS: tuple[str, ...] = get_args(LossKind)


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to its head's output before the loss, in this order, in the head's dtype.

    ``multiply`` (Cohere's ``logit_scale``), ``divide`` (Granite's ``logits_scaling``), then
    ``softcap``: ``tanh(logits / softcap) * softcap`` (Gemma 2/3's ``final_logit_softcapping``).
    """

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.multiply, self.divide, self.softcap))

    def apply(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transformed logits and, with soft-capping, the ``tanh`` output its derivative needs."""
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        capped = None
        if self.softcap is not None:
            capped = torch.tanh(logits / self.softcap)
            logits = capped * self.softcap
        return logits, capped

    def backward(self, grad: torch.Tensor, capped: torch.Tensor | None) -> torch.Tensor:
        """The gradient through :meth:`apply`, step by step as autograd takes it (in place on ``grad``)."""
        if self.softcap is not None:
            assert capped is not None
            grad = grad.mul_(self.softcap).mul_(1 - capped * capped).div_(self.softcap)
        if self.divide is not None:
            grad = grad.div_(self.divide)
        if self.multiply is not None:
            grad = grad.mul_(self.multiply)
        return grad


def chunked_cross_entropy(
    hidden_states: torch.Tensor,
    head: nn.Module | torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transform: LogitTransform | None = None,
) -> torch.Tensor:
    """The cross-entropy of ``head(hidden_states)`` against ``labels``, without all the logits at once.

    Equal, within float tolerance, to transformers' causal-LM loss on ``head(hidden_states)``: the
    logits upcast to float32, position ``t`` predicting ``labels[t + 1]`` when ``shift`` (packed rows
    need nothing more: each example's first label is ``ignore_index``), the mean over the positions
    whose label is not ``ignore_index``. A batch with no such position gives a zero loss with zero
    gradients (where transformers gives NaN).

    Args:
        hidden_states: The head's input, ``[..., sequence, hidden]``.
        head: The output layer: an ``nn.Linear``, its weight (``[vocabulary, hidden]``), or any module
            from ``hidden`` to ``vocabulary`` features (LoRA, 4-bit: run under checkpointing).
        labels: ``[..., sequence]`` token ids, ``ignore_index`` where nothing is predicted.
        shift: Labels are the input ids (the causal shift is done here); False: ``labels[t]`` is the
            target of position ``t`` already.
        ignore_index: The label of positions to skip.
        reduction: ``"mean"`` over the labelled positions, or their ``"sum"``.
        chunk_size: Positions per chunk; the loss's peak memory is about ``chunk_size x vocabulary``
            logits in float32 plus one copy in the head's dtype.
        transform: What the model does to its logits before the loss (see :class:`LogitTransform`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions; got {chunk_size}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
    if shift:
        hidden_states, labels = hidden_states[..., :-1, :], labels[..., 1:]
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} do not match "
            f"(after the shift: {shift})"
        )
    keep = labels != ignore_index
    hidden = hidden_states[keep]  # [N, hidden]: only the positions that carry a label
    targets = labels[keep].to(hidden.device)
    total = _sum_of_losses(hidden, head, targets, chunk_size, transform or LogitTransform())
    if reduction == "sum":
        return total
    return total / max(targets.numel(), 1)


def _sum_of_losses(
    hidden: torch.Tensor,
    head: nn.Module | torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    transform: LogitTransform,
) -> torch.Tensor:
    weight, bias = _plain_linear(head)
    if weight is None:
        assert isinstance(head, nn.Module)
        return _checkpointed_chunks(hidden, head, targets, chunk_size, transform)
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not wants_grad:
        w, b = _operands(hidden, weight, bias)
        total = hidden.new_zeros((), dtype=torch.float32)
        with _no_autocast(hidden):
            for rows in _chunks(hidden.shape[0], chunk_size):
                logits, _ = transform.apply(F.linear(hidden[rows].to(w.dtype), w, b))
                total += _chunk_loss(logits.float(), targets[rows])
        return total
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, transform)


def _operands(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in the dtype its matmul runs in: autocast's when autocast is on.

    Cast once here rather than by autocast in every chunk (a ``vocabulary x hidden`` copy each time).
    """
    kind = hidden.device.type
    if not torch.is_autocast_enabled(kind):
        return weight, bias
    dtype = torch.get_autocast_dtype(kind)
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _no_autocast(hidden: torch.Tensor) -> Any:
    return torch.autocast(hidden.device.type, enabled=False)


def _plain_linear(head: nn.Module | torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight and bias of a head that is a bare linear map, else ``(None, None)``."""
    if isinstance(head, torch.Tensor):
        return head, None
    plain = type(head) is nn.Linear and not has_module_hooks(head)
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    # Not a DTensor shard nor a 4-bit parameter (the memory plan's fake parameters stand for plain ones).
    if not plain or not (type(weight) is nn.Parameter or is_fake_parameter(weight)):
        return None, None
    return weight, bias


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of ``logsumexp(logits) - logits[target]``: cross-entropy with reduction 'sum'."""
    return (torch.logsumexp(logits, dim=-1) - logits.gather(1, targets[:, None])[:, 0]).sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies through a linear head, its gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        transform: LogitTransform,
    ) -> torch.Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Weight and bias gradients add up over chunks: in float32, whatever the head's dtype.
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_bias else None
        )
        w, b = _operands(hidden, weight, bias)
        total = hidden.new_zeros((), dtype=torch.float32)
        with _no_autocast(hidden):
            for rows in _chunks(hidden.shape[0], chunk_size):
                total += _LinearCrossEntropy.chunk(
                    hidden[rows], w, b, targets[rows], transform, rows, grad_hidden, grad_weight, grad_bias
                )
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def chunk(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        transform: LogitTransform,
        rows: slice,
        grad_hidden: torch.Tensor | None,
        grad_weight: torch.Tensor | None,
        grad_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """One chunk's loss sum; its gradients written into ``grad_hidden[rows]`` and added to the others."""
        x = hidden.to(weight.dtype)
        logits, capped = transform.apply(F.linear(x, weight, bias))
        dtype = logits.dtype
        probs = logits.float()  # transformers' loss upcasts; a float32 head's logits are this tensor
        del logits
        lse = torch.logsumexp(probs, dim=-1)
        loss = (lse - probs.gather(1, targets[:, None])[:, 0]).sum()
        # d(loss)/d(logits) = softmax - one_hot(target), then back through the cast and the transform.
        probs.sub_(lse[:, None]).exp_()
        probs[torch.arange(targets.numel(), device=targets.device), targets] -= 1
        grad = transform.backward(probs.to(dtype), capped)
        del probs, capped
        if grad_hidden is not None:
            grad_hidden[rows] = grad @ weight
        if grad_weight is not None:
            grad_weight.addmm_(grad.t().float(), x.float())
        if grad_bias is not None:
            grad_bias += grad.float().sum(0)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes

        def scaled(grad: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
            if grad is None:
                return None
            out = grad * grad_output.to(grad.dtype)
            return out if dtype is None else out.to(dtype)

        return (
            scaled(grad_hidden, None),
            scaled(grad_weight, weight_dtype),
            scaled(grad_bias, bias_dtype),
            None,
            None,
            None,
        )


def _checkpointed_chunks(
    hidden: torch.Tensor,
    head: nn.Module,
    targets: torch.Tensor,
    chunk_size: int,
    transform: LogitTransform,
) -> torch.Tensor:
    """Sum of cross-entropies through any head module, each chunk under non-reentrant checkpointing."""
    from torch.utils.checkpoint import checkpoint

    def chunk(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits, _ = transform.apply(head(x))
        return F.cross_entropy(logits.float(), t, reduction="sum")

    run: Callable[..., torch.Tensor] = chunk
    if torch.is_grad_enabled():
        run = lambda x, t: checkpoint(chunk, x, t, use_reentrant=False)  # noqa: E731
    total = hidden.new_zeros((), dtype=torch.float32)
    for rows in _chunks(hidden.shape[0], chunk_size):
        total = total + run(hidden[rows], targets[rows])
    return total
