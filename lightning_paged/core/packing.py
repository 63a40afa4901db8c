"""Padding-free packing: several whole examples in one row, none of them attending to another.

Framework-free, so a Fabric or Accelerate loop packs exactly as the Lightning data module does:

- :func:`pack_examples` places example indices into rows of at most ``max_length`` tokens: the
  examples are shuffled with a seed, then each window of ``window`` examples is packed by *first-fit
  decreasing* (longest first, each into the first row with room, a new row when none has). No
  example is split; one longer than ``max_length`` must have been cut before (the data module does,
  and counts it).
- :class:`PackedDataset` holds those rows; a sampler shuffles the rows, so the order of an epoch
  depends only on the seed and the epoch (:class:`~lightning_paged.core.sampling.ResumableSampler`).
- :class:`PadCollator` is the padded alternative: each example a row, padded to the longest, with
  an ``attention_mask``.
- :class:`PackCollator` turns a list of rows into a batch the model reads without a 2-D attention
  mask: ``input_ids``, ``labels`` (-100 off the response and on each example's first token, which no
  earlier token of the same example predicts), ``position_ids`` restarting at 0 for every example
  (and 0 on every padding token) and ``num_tokens``, the count of real (non-padding) tokens.
- :func:`model_inputs` is what to pass to a transformers causal LM for a batch of either kind: for a
  packed one ``attention_mask=None`` and ``use_cache=False``, the two conditions under which
  transformers derives the block-diagonal causal mask from ``position_ids``
  (``masking_utils._preprocess_mask_arguments`` calls ``find_packed_sequence_indices`` only then),
  plus the boundaries flash-attention kernels need when the model runs one.
- :func:`check_packing_support` refuses a model whose attention implementation would let packed
  examples attend to one another.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_paged.core.compat.transformers import attn_implementation
from lightning_paged.core.errors import SettingError

IGNORE_INDEX = -100
"""Label of tokens the loss skips (prompt and padding); the value transformers' losses ignore."""

PACKING_WINDOW = 1000
"""Examples packed together by one first-fit-decreasing pass."""

BOUNDARY_AWARE = ("sdpa", "eager", "flex_attention")
"""Attention implementations whose mask transformers builds block-diagonal from restarting ``position_ids``
(``masking_utils.create_causal_mask`` with ``packed_sequence_mask``)."""

FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
"""Flash-attention implementations: boundaries go to the kernel as ``cu_seq_lens_*`` (see :func:`model_inputs`)."""

ATTENTION_SETTING = "model_config.attn_implementation"


def pack_examples(
    lengths: Sequence[int], max_length: int, seed: int = 0, window: int = PACKING_WINDOW
) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most ``max_length``.

    The indices are shuffled with ``seed``; every ``window`` consecutive ones are packed by first-fit
    decreasing. Rows come out in the order they were opened (a sampler shuffles them). Raises
    ``ValueError`` for an example longer than ``max_length``.
    """
    if max_length < 1 or window < 1:
        raise ValueError(f"max_length and window must be positive; got {max_length}, {window}")
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"example {i} has {lengths[i]} tokens, more than max_length={max_length}; cut it first"
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: (-lengths[i], i))
        opened: list[list[int]] = []
        room: list[int] = []
        for i in group:
            n = lengths[i]
            for r, left in enumerate(room):
                if n <= left:
                    opened[r].append(i)
                    room[r] -= n
                    break
            else:
                opened.append([i])
                room.append(max_length - n)
        rows += opened
    return rows


def fill_rate(rows: Sequence[Sequence[int]], lengths: Sequence[int], max_length: int) -> float:
    """Fraction of the rows' ``max_length`` capacity that real tokens fill."""
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * max_length) if rows else 0.0


Example = Mapping[str, Sequence[int]]
"""One tokenized example: ``input_ids`` and ``labels`` of the same length."""


class PackedDataset(Dataset):
    """The rows :func:`pack_examples` makes of ``examples``; item ``i`` is the list of row ``i``'s examples.

    The packing is fixed at construction (from ``seed``); shuffle the rows with a sampler. Examples
    longer than ``max_length`` raise ``ValueError``: cut them first.
    """

    def __init__(
        self, examples: Sequence[Example], max_length: int, seed: int = 0, window: int = PACKING_WINDOW
    ) -> None:
        self.examples = examples
        self.max_length = max_length
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.rows = pack_examples(self.lengths, max_length, seed=seed, window=window)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[Example]:
        return [self.examples[i] for i in self.rows[index]]

    @property
    def fill_rate(self) -> float:
        """Fraction of the rows' capacity that real tokens fill (1 - the padding a full-width batch has)."""
        return fill_rate(self.rows, self.lengths, self.max_length)


class PadCollator:
    """Pads a list of samples on the right to the longest one: ``input_ids``, ``attention_mask``, ``labels``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.tensor(sample["input_ids"])
            labels[row, :n] = torch.tensor(sample["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PackCollator:
    """A list of packed rows (each a list of examples) as one batch, padded on the right to the longest row.

    Keys: ``input_ids``, ``labels``, ``position_ids`` (``[rows, width]`` long tensors) and
    ``num_tokens`` (0-d: real tokens, padding excluded). Padding tokens get label -100 and position
    0, so each is a one-token block of its own and the longest example is ``position_ids.max() + 1``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        tokens = 0
        for r, row in enumerate(rows):
            at = 0
            for example in row:
                n = len(example["input_ids"])
                input_ids[r, at : at + n] = torch.tensor(example["input_ids"])
                labels[r, at + 1 : at + n] = torch.tensor(example["labels"][1:], dtype=torch.long)
                position_ids[r, at : at + n] = torch.arange(n)
                at += n
            tokens += at
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "num_tokens": torch.tensor(tokens),
        }


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` came from :class:`PackCollator` (it has ``position_ids`` and no attention mask)."""
    return "position_ids" in batch and batch.get("attention_mask") is None


def attention_implementation(model: Any) -> str | None:
    """The attention implementation a transformers model (or a PEFT wrapper of one) runs."""
    return attn_implementation(model)


def check_packing_support(model: Any) -> None:
    """Raise :class:`SettingError` unless packed examples stay apart in ``model``'s attention.

    Accepted: ``sdpa``, ``eager``, ``flex_attention`` (transformers builds the block-diagonal mask
    from ``position_ids``) and ``flash_attention_2/3/4`` (:func:`model_inputs` passes the boundaries).
    Anything else (a kernel registered outside transformers' mask functions, or a model without a
    transformers config) would attend across boundaries without a word.
    """
    impl = attention_implementation(model)
    if impl in BOUNDARY_AWARE or impl in FLASH:
        return
    what = (
        f"attention implementation {impl!r}" if impl else f"{type(model).__name__} (no transformers config)"
    )
    raise SettingError(
        ATTENTION_SETTING,
        impl,
        f"is not one that keeps packed examples apart: with {what} every token of a packed row would "
        f"attend to the examples before it. Use one of {', '.join(BOUNDARY_AWARE + FLASH)}, or turn "
        "packing off (--data.init_args.packing false)",
    )


def model_inputs(batch: Mapping[str, Any], model: Any = None) -> dict[str, Any]:
    """The keyword arguments of a transformers causal LM's forward for ``batch``, packed or padded.

    A padded batch passes ``input_ids``, ``attention_mask`` and ``labels``. A packed one passes
    ``input_ids``, ``labels`` and ``position_ids`` with ``attention_mask=None`` and ``use_cache=False``;
    when ``model`` runs a flash-attention kernel, also ``cu_seq_lens_q/k`` and ``max_length_q/k`` over
    the flattened batch (transformers infers them from ``position_ids`` only for a single row).
    """
    if not is_packed(batch):
        out = {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if key in batch}
        return out
    out = {
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
        "use_cache": False,
    }
    if model is not None and attention_implementation(model) in FLASH:
        out.update(flash_boundaries(batch["position_ids"]))
    return out


def flash_boundaries(position_ids: torch.Tensor) -> dict[str, Any]:
    """``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (int) of the examples of a flattened packed batch.

    Every example, and every padding token, starts at position 0; the boundaries are where the
    flattened ``position_ids`` are 0, as in transformers' ``prepare_fa_kwargs_from_position_ids``.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)])
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def response_targets(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the causal-LM loss predicts in a batch (labels after the shift that are not -100), 0-d."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def batch_tokens(batch: Mapping[str, Any]) -> torch.Tensor:
    """Real (non-padding) tokens of a packed or padded batch, as a 0-d tensor on the batch's device."""
    if "num_tokens" in batch:
        return torch.as_tensor(batch["num_tokens"])
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum()
    ids = batch["input_ids"]
    return torch.tensor(ids.numel(), device=ids.device)
