"""Greedy answers of a causal LM to a prompt: the one loop behind the run's sample and ``lightning-paged generate``.

Framework-free. The prompt comes from :meth:`~lightning_paged.core.encoding.SampleEncoder.prompt`,
rendered as the model was trained; generation stops at the encoder's stop tokens (a chat
template's end-of-turn token such as ``<|im_end|>`` or ``<|end|>``, then the end-of-sequence token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_paged.core.encoding import Prompt


@dataclass(frozen=True)
class Answer:
    """A generated answer."""

    text: str
    """The new tokens decoded, special tokens left out."""
    ids: list[int]
    """The new token ids, the stop token included."""
    note: str = ""
    """Why the answer is empty (its first token ended it, or it is special tokens only); else empty."""


@torch.no_grad()
def generate_answer(
    model: Any,
    tokenizer: Any,
    prompt: Prompt,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    synced_gpus: bool = False,
) -> Answer:
    """Greedy decoding of at most ``max_new_tokens`` tokens after ``prompt``, on the model's device.

    The model is put in eval mode for the call and back in the mode it was in after. With
    ``synced_gpus`` (a model sharded over several processes, each of which calls this with the same
    prompt) every process runs every forward until all have finished, as each gathers weights
    from the others.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt.ids], device=device)
    was_training = model.training
    model.eval()
    try:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(stop_ids) or None,
            synced_gpus=synced_gpus,
        )
    finally:
        model.train(was_training)
    new = [int(i) for i in output[0, len(prompt.ids) :].tolist()]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Answer(text, new, "" if text else _why_empty(tokenizer, new, stop_ids))


def _why_empty(tokenizer: Any, new: list[int], stop_ids: Sequence[int]) -> str:
    if not new:
        return "empty: nothing was generated"
    first = tokenizer.decode(new[:1])
    if new[0] in stop_ids:
        return f"empty: the first token generated was {first!r}, which ends an answer"
    return f"empty: only special tokens were generated, the first {first!r}"
