"""A batch's sequence length, longest example and real token count, and when a length counts as long."""

from __future__ import annotations

import math
from bisect import insort
from collections.abc import Callable, Mapping, Sequence
from typing import Any

SeqLenFn = Callable[[Any], int | tuple[int, int | None]]
"""User function for other batch shapes: returns the padded length, or ``(length, real_tokens)``."""

MIN_HISTORY = 10
"""Lengths seen before the running percentile starts to flag long sequences."""


def batch_length(batch: Any, seq_len_fn: SeqLenFn | None = None) -> tuple[int | None, Any]:
    """``(seq_len, tokens)`` of a batch; ``tokens`` may be a 0-d tensor, read at the end of the step.

    Without ``seq_len_fn``: a mapping uses ``input_ids.shape[-1]`` (else ``attention_mask``'s) as the
    padded length and the sum of ``attention_mask`` as the real token count (every position when
    there is no mask, or a packed batch's ``num_tokens``); a tensor, or a tuple/list whose first item is a tensor, uses its last
    dimension. Anything else gives ``(None, None)``. Summing the mask is queued on the device here and
    read after the step, so it adds no synchronisation.
    """
    if seq_len_fn is not None:
        out = seq_len_fn(batch)
        if isinstance(out, tuple):
            return _as_int(out[0]), out[1]
        return _as_int(out), None
    if isinstance(batch, Mapping):
        ids: Any = batch.get("input_ids")
        mask: Any = batch.get("attention_mask")
        shaped: Any = ids if _is_tensor(ids) else mask
        if not _is_tensor(shaped):
            return None, None
        seq_len = int(shaped.shape[-1]) if shaped.ndim else None
        packed: Any = batch.get("num_tokens")
        if _is_tensor(mask):
            tokens = mask.sum()
        else:
            tokens = packed if packed is not None else int(shaped.numel())
        return seq_len, tokens
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and batch:
        batch = batch[0]
    if _is_tensor(batch) and batch.ndim:
        return int(batch.shape[-1]), int(batch.numel())
    return None, None


def batch_longest(batch: Any) -> Any:
    """The longest single example of a mapping batch, as a 0-d tensor read at the end of the step, or None.

    A packed batch (``position_ids`` that restart at 0 per example, padding at 0): ``position_ids.max()
    + 1``. A padded batch: the largest row sum of ``attention_mask``. Other batches: None.
    """
    if not isinstance(batch, Mapping):
        return None
    positions: Any = batch.get("position_ids")
    mask: Any = batch.get("attention_mask")
    if mask is None and _is_tensor(positions) and positions.numel():
        return positions.max() + 1
    if _is_tensor(mask) and mask.ndim == 2 and mask.numel():
        return mask.sum(-1).max()
    return None


def resolve_tokens(tokens: Any) -> int | None:
    """An int from what :func:`batch_length` returned for tokens."""
    if tokens is None:
        return None
    return int(tokens.item()) if hasattr(tokens, "item") else int(tokens)


def _is_tensor(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "ndim") and hasattr(x, "numel")


def _as_int(x: Any) -> int | None:
    return None if x is None else int(x)


class LongSequenceDetector:
    """Decides whether a step's sequence length counts as long.

    With ``threshold`` set: ``seq_len >= threshold``. Without: ``seq_len`` above the ``percentile``-th
    percentile (nearest rank) of the lengths seen in earlier steps, once at least :data:`MIN_HISTORY`
    have been seen.
    """

    def __init__(self, threshold: int | None = None, percentile: float = 90.0) -> None:
        self.threshold = threshold
        self.percentile = percentile
        self._seen: list[int] = []

    def cutoff(self) -> int | None:
        """The length a step must exceed to count as long, or None while there is too little history."""
        if self.threshold is not None:
            return self.threshold - 1
        if len(self._seen) < MIN_HISTORY:
            return None
        rank = max(1, math.ceil(self.percentile / 100.0 * len(self._seen)))
        return self._seen[rank - 1]

    def __call__(self, seq_len: int | None) -> bool:
        if seq_len is None:
            return False
        cutoff = self.cutoff()
        if self.threshold is None:
            insort(self._seen, seq_len)
        return cutoff is not None and seq_len > cutoff
