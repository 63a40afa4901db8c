"""How far two models' logits are apart on the same probe tokens: a merged model against the model as trained."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LogitComparison:
    """How far two models' logits are apart on the same probe tokens."""

    max_abs: float
    mean_abs: float
    top1_agreement: float
    """Share of positions where both models rank the same token first."""
    tokens: int

    def summary(self) -> str:
        return (
            f"largest logit difference {self.max_abs:.4g} (mean {self.mean_abs:.3g}; same top-1 token at "
            f"{100 * self.top1_agreement:.1f}% of {self.tokens} probe positions)"
        )


@torch.no_grad()
def compare_logits(
    model: nn.Module, reference: nn.Module, vocab_size: int, batch: int = 2, length: int = 32, seed: int = 0
) -> LogitComparison:
    """Logits of ``model`` against ``reference`` on ``batch x length`` random probe tokens (seeded)."""
    ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        ours = model(input_ids=ids.to(_device(model))).logits.float().cpu()
        theirs = reference(input_ids=ids.to(_device(reference))).logits.float().cpu()
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    difference = (ours - theirs).abs()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return LogitComparison(difference.max().item(), difference.mean().item(), agree, ids.numel())


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
