"""Instruction data for causal-LM fine-tuning, framework-free: a JSON or JSON Lines file in, padded batches out.

Two sample shapes, mixed freely in one file:

- alpaca style: ``{"instruction": ..., "input": ... (optional), "output": ...}``
- chat style: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}``

Labels are ``-100`` everywhere except response tokens (``output``, assistant turns and the
end-of-sequence token after them), so the loss is on responses only. Each batch is padded to its
own longest sample: sequence length varies from step to step, as it does in real fine-tuning.

With ``packing=True`` whole samples are packed into rows of at most ``max_length`` tokens instead
(:mod:`lightning_paged.core.packing`): a batch is ``batch_size`` rows, each sample attends only to
itself (``position_ids`` restart per sample, no 2-D attention mask), and far less of every step is
spent on padding.

:class:`InstructionData` does it all without a framework: a hand-written loop (Fabric, Accelerate,
plain PyTorch) calls :meth:`~InstructionData.load` and :meth:`~InstructionData.train_loader`;
:class:`~lightning_paged.lightning.data.InstructionDataModule` is the same class as a Lightning data module.
"""

from __future__ import annotations

import logging
import string
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_paged.core.data_files import read_records
from lightning_paged.core.errors import SettingError
from lightning_paged.core.packing import IGNORE_INDEX, PackCollator, PackedDataset, PadCollator
from lightning_paged.core.sampling import LengthGroupedBatchSampler, ResumableSampler
from lightning_paged.core.tokenizer import encode_texts, load_tokenizer

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
ROLE_HEADER = "### {role}:\n"

Segment = tuple[str, bool]
"""A piece of a formatted sample and whether the loss covers it."""

log = logging.getLogger(__name__)


class InstructionData:
    """Alpaca-style or chat instruction data from a local JSON/JSONL file, with response-only labels."""

    def __init__(
        self,
        data_path: str,
        tokenizer: str = "byte",
        max_length: int = 512,
        batch_size: int = 8,
        val_split: int | float = 0.05,
        group_by_length: bool = False,
        packing: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        prompt_template: str = ALPACA_PROMPT,
        input_template: str = ALPACA_INPUT,
        role_header: str = ROLE_HEADER,
    ) -> None:
        """
        Args:
            data_path: A ``.json`` file (a list of samples) or a ``.jsonl`` file (one sample per line),
                or a directory written by ``datasets.Dataset.save_to_disk``.
            tokenizer: ``"byte"`` for the built-in byte-level tokenizer (259 ids, for demos), or the path
                of a local directory holding a transformers tokenizer. Nothing is downloaded.
            max_length: Samples longer than this many tokens are cut at the end; how many were cut is
                reported once.
            batch_size: Samples per batch (per device).
            val_split: Validation samples taken out of ``data_path``: a fraction in [0, 1) or a count.
                0 turns validation off.
            group_by_length: Batch samples of similar length together (in shuffled groups of 50 batches)
                to waste less compute on padding. The order of batches stays random.
            packing: Pack whole samples into rows of at most ``max_length`` tokens (first-fit decreasing
                over shuffled windows of 1,000 samples, fixed for the run; the sampler shuffles the rows
                every epoch), and make each batch ``batch_size`` such rows. No sample is split or sees
                another: batches carry ``position_ids`` that restart per sample and no attention mask,
                which the model's ``sdpa``, ``eager``, ``flex_attention`` or flash attention turns into
                a block-diagonal causal mask (other attention implementations are refused). The loss
                is still the mean over the batch's response tokens. Validation is packed the same way;
                a validation split that fills fewer than ``batch_size`` rows is one smaller batch.
            num_workers: DataLoader worker processes.
            seed: Seed of the validation split and of the shuffling.
            prompt_template: Prompt of an alpaca-style sample, with ``{instruction}`` and ``{input}``
                fields; ``{input}`` receives ``input_template`` filled in, or nothing when the sample has
                no input.
            input_template: The ``input`` block of the prompt, with an ``{input}`` field.
            role_header: Header before each chat message, with a ``{role}`` field.
        """
        self.data_path = data_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_split = val_split
        self.group_by_length = group_by_length
        self.packing = packing
        self.num_workers = num_workers
        self.seed = seed
        self.prompt_template = prompt_template
        self.input_template = input_template
        self.role_header = role_header
        self._validate()
        self.tokenizer = load_tokenizer(tokenizer)
        self.train_data: list[dict[str, list[int]]] | None = None
        self.val_data: list[dict[str, list[int]]] = []
        self.train_rows: PackedDataset | None = None
        self.val_rows: PackedDataset | None = None
        self.num_truncated = 0
        self.num_dropped = 0

    def _validate(self) -> None:
        if not Path(self.data_path).expanduser().exists():
            raise SettingError(
                "data_path", self.data_path, "does not exist; give a local .json or .jsonl file"
            )
        for name, value in (("max_length", self.max_length), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingError(name, value, "must be a positive integer")
        if self.max_length < 2:
            raise SettingError(
                "max_length", self.max_length, "must leave room for a prompt and a response (>= 2)"
            )
        if not isinstance(self.packing, bool):
            raise SettingError("packing", self.packing, "must be true or false")
        if self.packing and self.group_by_length:
            raise SettingError(
                "group_by_length",
                self.group_by_length,
                "and packing are two ways to cut padding; packed rows are all close to max_length, so "
                "grouping them by length does nothing: turn one off",
            )
        if self.num_workers < 0:
            raise SettingError("num_workers", self.num_workers, "must be 0 or more")
        split = self.val_split
        if isinstance(split, bool) or not isinstance(split, (int, float)) or split < 0:
            raise SettingError("val_split", split, "must be a fraction in [0, 1) or a sample count")
        if isinstance(split, float) and split >= 1:
            raise SettingError(
                "val_split", split, "as a fraction must be below 1; give a count as an integer"
            )
        _check_fields("prompt_template", self.prompt_template, {"instruction", "input"})
        _check_fields("input_template", self.input_template, {"input"})
        _check_fields("role_header", self.role_header, {"role"})

    def check_data(self) -> None:
        """Read ``data_path`` and check every sample, without tokenizing: what ``setup`` would refuse.

        Cheap enough to run before ``fit`` starts its loggers, which clear an existing log directory.
        """
        for record, where in read_records(self.data_path):
            self._segments(record, where)

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt the model sees for an alpaca-style sample (what generation should start from)."""
        block = self.input_template.format(input=input) if input else ""
        return self.prompt_template.format(instruction=instruction, input=block)

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        """Token ids of :meth:`format_prompt`, with the beginning-of-sequence token as in training."""
        return self._bos() + encode_texts(self.tokenizer, [self.format_prompt(instruction, input)])[0]

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [] if bos is None else [bos]

    def load(self) -> None:
        """Read, check, tokenize and split the data (and pack it, with ``packing``); once."""
        if self.train_data is not None:
            return
        records = read_records(self.data_path)
        segments = [self._segments(record, where) for record, where in records]
        if self.packing and any(record.get("messages") is None for record, _ in records):
            self._check_prompt_room()
        samples, lengths = self._tokenize(segments)
        if self.num_truncated:
            dropped = (
                self.num_dropped
                and f"; {self.num_dropped} of them lost their whole response and were left out"
            )
            self.warn(
                f"{self.num_truncated} of {len(records)} samples are longer than max_length={self.max_length} "
                f"tokens (longest: {max(lengths)}) and were cut at the end{dropped or ''}. "
                "Raise max_length to keep them whole."
            )
        if not samples:
            raise SettingError(
                "max_length", self.max_length, f"cuts every response of {self.data_path} away; raise it"
            )
        self.train_data, self.val_data = self._split(samples)
        kept = [len(s["input_ids"]) for s in samples]
        self.info(
            f"Instruction data: {len(self.train_data)} training and {len(self.val_data)} validation samples "
            f"from {self.data_path}; {min(kept)}-{max(kept)} tokens (median {sorted(kept)[len(kept) // 2]})"
        )
        if self.packing:
            self.train_rows = PackedDataset(self.train_data, self.max_length, seed=self.seed)
            self.val_rows = PackedDataset(self.val_data, self.max_length, seed=self.seed)
            self.info(
                f"Packing: {len(self.train_rows)} training rows ({self.train_rows.fill_rate:.1%} filled) and "
                f"{len(self.val_rows)} validation rows of at most {self.max_length} tokens"
            )

    def _check_prompt_room(self) -> None:
        """With packing, a ``max_length`` the prompt template's fixed text already fills is a clear error."""
        fixed = len(self.prompt_ids(""))
        if self.max_length <= fixed:
            raise SettingError(
                "max_length",
                self.max_length,
                f"leaves no room for a response: the fixed part of prompt_template alone is {fixed} tokens "
                "(with the beginning-of-sequence token); raise max_length well above it",
            )

    def _segments(self, record: Any, where: str) -> list[Segment]:
        def bad(problem: str) -> SettingError:
            return SettingError("data_path", self.data_path, f"has a sample at {where} that {problem}")

        if not isinstance(record, dict):
            raise bad(f"is a {type(record).__name__}, not an object")
        if record.get("messages") is not None:
            return self._chat_segments(record["messages"], bad)
        missing = [key for key in ("instruction", "output") if record.get(key) is None]
        if missing:
            raise bad(
                f"lacks {' and '.join(repr(k) for k in missing)} (keys: {', '.join(map(repr, record)) or 'none'}); "
                "each sample needs 'instruction' and 'output' (and optionally 'input'), or 'messages'"
            )
        fields: dict[str, str] = {}
        for key in ("instruction", "input", "output"):
            value = record.get(key)
            if value is not None and not isinstance(value, str):
                raise bad(f"has a {type(value).__name__} as {key!r}, not a string")
            fields[key] = value or ""
        prompt = self.format_prompt(fields["instruction"], fields["input"])
        return [(prompt, False), (fields["output"], True)]

    def _chat_segments(self, messages: Any, bad: Any) -> list[Segment]:
        if not isinstance(messages, list) or not messages:
            raise bad("has 'messages' that is not a non-empty list of {role, content} objects")
        segments: list[Segment] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad(f"has message {i} without a 'role' string")
            if not isinstance(message.get("content"), str):
                raise bad(f"has message {i} without a 'content' string")
            if i:
                segments.append(("\n\n", False))
            segments.append((self.role_header.format(role=message["role"]), False))
            segments.append((message["content"], message["role"] == "assistant"))
        if not any(trainable for _, trainable in segments):
            raise bad("has no 'assistant' message to learn from")
        return segments

    def _tokenize(self, samples: Sequence[list[Segment]]) -> tuple[list[dict[str, list[int]]], list[int]]:
        """Token ids and labels of each sample, all texts encoded in one batched call."""
        ids = iter(encode_texts(self.tokenizer, [text for segments in samples for text, _ in segments]))
        eos = self.tokenizer.eos_token_id
        out, lengths = [], []
        self.num_truncated = self.num_dropped = 0
        for segments in samples:
            input_ids = self._bos()
            labels = [IGNORE_INDEX] * len(input_ids)
            for (_, trainable), piece in zip(segments, ids):
                if trainable and eos is not None:
                    piece = [*piece, eos]
                input_ids += piece
                labels += piece if trainable else [IGNORE_INDEX] * len(piece)
            lengths.append(len(input_ids))
            if len(input_ids) > self.max_length:
                self.num_truncated += 1
                input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
                if all(label == IGNORE_INDEX for label in labels[1:]):  # the loss predicts labels[1:]
                    self.num_dropped += 1
                    continue
            out.append({"input_ids": input_ids, "labels": labels})
        return out, lengths

    def _split(self, samples: list[dict[str, list[int]]]) -> tuple[list[dict[str, list[int]]], list[dict]]:
        n = len(samples)
        split = self.val_split
        n_val = split if isinstance(split, int) else (max(1, round(split * n)) if split > 0 else 0)
        if n_val >= n:
            raise SettingError(
                "val_split", split, f"leaves no training samples out of {n}; use a smaller fraction or count"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = sorted(order[:n_val])
        train = sorted(order[n_val:])
        return [samples[i] for i in train], [samples[i] for i in val]

    def _loader(self, data: Any, **kwargs: Any) -> DataLoader:
        collate = PackCollator if self.packing else PadCollator
        return DataLoader(
            data,
            collate_fn=collate(self.tokenizer.pad_token_id),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_loader(self) -> DataLoader:
        """The training batches: a seeded, resumable order (grouped by length with ``group_by_length``)."""
        assert self.train_data is not None, "call load() (a data module's setup('fit')) first"
        data: Any = self.train_rows if self.packing else self.train_data
        # A seeded, epoch-aware order whose position checkpoints save, so a resume continues mid-epoch.
        sampler = ResumableSampler(data, seed=self.seed)
        # Loader workers' seeds come from this generator, not from the global RNG.
        generator = torch.Generator().manual_seed(self.seed)
        if not self.group_by_length:
            return self._loader(data, batch_size=self.batch_size, sampler=sampler, generator=generator)
        lengths = [len(s["input_ids"]) for s in self.train_data]
        batches = LengthGroupedBatchSampler(sampler, self.batch_size, False, lengths=lengths, seed=self.seed)
        return self._loader(self.train_data, batch_sampler=batches, generator=generator)

    def val_loader(self) -> DataLoader | list:
        """The validation batches, in file order; ``[]`` without a validation split."""
        assert self.train_data is not None, "call load() (a data module's setup('fit')) first"
        if not self.val_data:
            return []
        return self._loader(self.val_rows if self.packing else self.val_data, batch_size=self.batch_size)

    def info(self, message: str) -> None:
        """Report what :meth:`load` did (a Lightning data module: on rank zero)."""
        log.info(message)

    def warn(self, message: str) -> None:
        """Warn about the data, once (a Lightning data module: on rank zero)."""
        warnings.warn(message, stacklevel=3)


def _check_fields(setting: str, template: str, allowed: set[str]) -> None:
    if not isinstance(template, str):
        raise SettingError(
            setting,
            template,
            "must be a string; in YAML (config files and command-line values) an unquoted # starts a comment, "
            f'so a template that starts with ### arrives empty: quote it in the config ({setting}: "### ...")',
        )
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise SettingError(setting, template, f"is not a valid format string ({err})") from err
    unknown, missing = fields - allowed, allowed - fields
    if unknown or missing:
        wanted = ", ".join("{" + f + "}" for f in sorted(allowed))
        raise SettingError(
            setting, template, f"must use exactly the fields {wanted} (write {{{{ for a brace)"
        )
