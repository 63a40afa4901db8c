"""Where a long step's memory goes: weights, adapters, optimizer state, activations, logits.

An estimate from sizes only (the model's config and parameters, the optimizer's state tensors,
the loss and offloading settings), never from reading a tensor: the eviction summary prints it for
the step with the most tokens, next to what the driver actually evicted, so a reader sees which
part of the step grows with the sequence and which part paging can move out of the way.

- Paged optimizer state is managed memory: under pressure the driver evicts it to host memory, so
  it can make room for at most its own size.
- Activations and logits are ordinary device allocations. They grow with the tokens of the step,
  they are the pressure, and paging cannot absorb them: gradient checkpointing keeps only each
  layer's input (``offload_activations`` moves those to host memory too), and the chunked loss
  keeps one chunk of logits instead of all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lightning_paged.core.units import format_bytes


@dataclass
class MemoryBreakdown:
    """The sizes a step's memory is made of; :meth:`parts` scales them to a number of tokens."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    compute_bytes: int
    """Bytes per value of activations and logits (2 for bfloat16, 4 for float32)."""
    weights_bytes: int
    """The frozen parameters as stored (4-bit packed base weights, 16-bit embeddings, head and norms)."""
    trainable_bytes: int
    optimizer_state_bytes: int
    paged_state_bytes: int
    """The part of the optimizer state in paged (managed) memory."""
    loss: str = "standard"
    """``chunked`` or ``standard``."""
    chunk_size: int = 256
    checkpointing: bool = True
    offload: bool = False

    def parts(self, tokens: int) -> list[tuple[str, int, str]]:
        """``(what, bytes, where it lives)`` of a step over ``tokens`` tokens; activations and logits estimated."""
        c = self.compute_bytes
        block = tokens * (6 * self.hidden_size + 3 * self.intermediate_size) * c  # one block's working set
        inputs = self.num_layers * tokens * self.hidden_size * c
        standard_logits = tokens * self.vocab_size * (2 * c + 8)  # logits, float32 copy and gradient
        paged = self.paged_state_bytes
        state_note = (
            f"{format_bytes(paged)} paged: the driver can evict it to host memory under pressure"
            if paged
            else "not paged: stays on the device"
        )
        rows = [
            ("weights (frozen base, embeddings, head)", self.weights_bytes, "device"),
            ("trainable weights and their gradients", 2 * self.trainable_bytes, "device"),
            ("optimizer state", self.optimizer_state_bytes, state_note),
        ]
        if self.checkpointing:
            where = "host memory (offload_activations)" if self.offload else "device"
            rows.append(("checkpointed layer inputs", inputs, where))
            rows.append(
                ("one block's activations, recomputed in the backward pass", block, "device, transient")
            )
        else:
            rows.append(("every block's activations (no checkpointing)", self.num_layers * block, "device"))
        if self.loss == "chunked":
            chunk = min(tokens, self.chunk_size) * self.vocab_size * (2 * c + 4)
            rows.append(
                (
                    f"logits, {self.chunk_size} tokens at a time (chunked loss)",
                    chunk,
                    f"device, transient; the standard loss would take {format_bytes(standard_logits)}",
                )
            )
        else:
            rows.append(
                ("logits, their float32 copy and gradient (standard loss)", standard_logits, "device")
            )
        return rows

    def render(self, tokens: int) -> str:
        rows = self.parts(tokens)
        width = max(len(name) for name, _, _ in rows)
        lines = [
            f"  where the memory of the step with the most tokens ({tokens:,}) goes, estimated from sizes:"
        ]
        lines += [f"    {name:<{width}}  {format_bytes(n):>10}  {where}" for name, n, where in rows]
        grows = sum(n for name, n, where in rows[3:] if where.startswith("device"))
        lines.append(
            f"  Paging can absorb at most the {format_bytes(self.paged_state_bytes)} of paged optimizer state; the "
            f"{format_bytes(grows)} of activations and logits on the device grow with the tokens and must fit."
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_breakdown(
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    *,
    loss: str = "standard",
    chunk_size: int = 256,
    checkpointing: bool | None = None,
    offload: bool = False,
) -> MemoryBreakdown | None:
    """The sizes of ``model`` (a transformers causal LM, or a module holding one as ``model``) and its
    optimizers' state; None when it has no transformers config to read the shapes from."""
    inner = getattr(model, "model", model)
    config = getattr(inner, "config", None)
    if config is None or not isinstance(inner, nn.Module):
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        vocab, hidden, layers = int(text.vocab_size), int(text.hidden_size), int(text.num_hidden_layers)
    except (AttributeError, TypeError):
        return None
    get_embeddings: Any = getattr(inner, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.bfloat16
    state, paged = 0, 0
    for optimizer in optimizers:
        for values in optimizer.state.values():
            for tensor in values.values() if isinstance(values, dict) else []:
                if isinstance(tensor, torch.Tensor):
                    size = tensor.numel() * tensor.element_size()  # sizes only: never the contents
                    state += size
                    paged += size if getattr(tensor, "is_paged", False) else 0
    if checkpointing is None:
        checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in inner.modules())
    return MemoryBreakdown(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        num_layers=layers,
        compute_bytes=torch.empty((), dtype=dtype).element_size(),
        weights_bytes=sum(p.numel() * p.element_size() for p in inner.parameters() if not p.requires_grad),
        trainable_bytes=sum(p.numel() * p.element_size() for p in inner.parameters() if p.requires_grad),
        optimizer_state_bytes=state,
        paged_state_bytes=paged,
        loss=loss,
        chunk_size=chunk_size,
        checkpointing=checkpointing,
        offload=offload,
    )
