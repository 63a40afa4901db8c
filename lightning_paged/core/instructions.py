"""Fine-tuning data for a causal LM, framework-free: a data file in, padded or packed batches out.

The formats (:mod:`lightning_paged.core.formats`, mixed freely in one file): ``messages`` chats,
ShareGPT ``conversations``, alpaca ``instruction``/``input``/``output``, ``prompt``/``completion``
and plain ``text``; ``columns`` maps other field names. Files: JSON, JSON Lines, CSV, Parquet or a
``datasets`` ``save_to_disk`` directory (:mod:`lightning_paged.core.data_files`).

Conversations are rendered with the tokenizer's chat template when it has one, else with role
headers (the ``chat_template`` setting chooses; :mod:`lightning_paged.core.chat`). Labels are
``-100`` everywhere except what the loss covers: assistant turns (with their end-of-turn token),
the alpaca ``output``, the completion, or, for ``text``, everything; ``train_on_inputs`` puts the
loss on every token. Each batch is padded to its own longest sample: sequence length varies from
step to step, as it does in real fine-tuning.

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
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lightning_paged.core.chat import TemplateError
from lightning_paged.core.data_files import read_records
from lightning_paged.core.encoding import (
    ALPACA_INPUT,
    ALPACA_PROMPT,
    ROLE_HEADER,
    Prompt,
    RenderError,
    SampleEncoder,
    fit_to_length,
)
from lightning_paged.core.errors import SettingError
from lightning_paged.core.formats import FormatSetting, Sample, SampleReader
from lightning_paged.core.packing import IGNORE_INDEX, PackCollator, PackedDataset, PadCollator
from lightning_paged.core.sampling import LengthGroupedBatchSampler, ResumableSampler
from lightning_paged.core.tokenizer import load_tokenizer

__all__ = ["ALPACA_INPUT", "ALPACA_PROMPT", "IGNORE_INDEX", "ROLE_HEADER", "InstructionData"]
Examples = list[dict[str, list[int]]]

log = logging.getLogger(__name__)


class InstructionData:
    """Instruction, chat or text data from a local file, with labels on what the model should learn."""

    def __init__(
        self,
        data_path: str,
        tokenizer: str = "byte",
        max_length: int = 512,
        batch_size: int = 8,
        val_split: int | float | None = None,
        val_path: str | None = None,
        group_by_length: bool = False,
        packing: bool = False,
        num_workers: int = 0,
        seed: int = 42,
        format: FormatSetting = "auto",
        columns: dict[str, str] | None = None,
        chat_template: str = "auto",
        train_on_inputs: bool = False,
        prompt_template: str = ALPACA_PROMPT,
        input_template: str = ALPACA_INPUT,
        role_header: str = ROLE_HEADER,
    ) -> None:
        """
        Args:
            data_path: A ``.jsonl``, ``.json`` (a list of samples), ``.csv``, ``.tsv`` or ``.parquet`` file, or
                a directory written by ``datasets.Dataset.save_to_disk``.
            tokenizer: ``"byte"`` for the built-in byte-level tokenizer (259 ids, for demos), or the path
                of a local directory holding a transformers tokenizer. Nothing is downloaded.
            max_length: Samples longer than this many tokens are cut at the end; how many were cut is
                reported once.
            batch_size: Samples per batch (per device).
            val_split: Validation samples taken out of ``data_path``: a fraction in [0, 1) or a count.
                0 turns validation off. Default: 0.05, or 0 when ``val_path`` is given.
            val_path: A separate validation file (any of ``data_path``'s kinds), instead of a split.
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
            format: ``auto`` tells each sample's format by its fields; or one of ``messages``, ``sharegpt``,
                ``alpaca``, ``prompt_completion``, ``text`` for every sample.
            columns: Your file's field names for the formats' fields, e.g. ``{instruction: question,
                output: answer}``; the fields are messages, conversations, instruction, input, output,
                prompt, completion, text.
            chat_template: How conversations are rendered: ``auto`` (the tokenizer's chat template when it has
                one, else role headers), ``tokenizer``, ``headers``, or a Jinja template or the path of a
                file holding one.
            train_on_inputs: Put the loss on every token, prompts and user turns included.
            prompt_template: Prompt of an alpaca-style sample, with ``{instruction}`` and ``{input}``
                fields; ``{input}`` receives ``input_template`` filled in, or nothing when the sample has
                no input.
            input_template: The ``input`` block of the prompt, with an ``{input}`` field.
            role_header: Header before each chat message when conversations are rendered with headers,
                with a ``{role}`` field.
        """
        self.data_path = data_path
        self.val_path = val_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_split: int | float = (0 if val_path else 0.05) if val_split is None else val_split
        self.group_by_length = group_by_length
        self.packing = packing
        self.num_workers = num_workers
        self.seed = seed
        self._validate()
        self.reader = SampleReader(data_path, format, columns, need_response=not train_on_inputs)
        self.tokenizer = load_tokenizer(tokenizer)
        self.encoder = SampleEncoder(
            self.tokenizer, chat_template, prompt_template, input_template, role_header, train_on_inputs
        )
        self.sample_format = "alpaca"
        """The format the sample prompt is rendered in: that of most training samples."""
        self.train_data: Examples | None = None
        self.val_data: Examples = []
        self.train_rows: PackedDataset | None = None
        self.val_rows: PackedDataset | None = None
        self.num_truncated = 0
        self.num_dropped = 0

    def _validate(self) -> None:
        for setting, path in (("data_path", self.data_path), ("val_path", self.val_path)):
            if path is not None and not Path(path).expanduser().exists():
                raise SettingError(
                    setting,
                    path,
                    "does not exist; give a local .jsonl, .json, .csv, .parquet file or directory",
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
        if self.val_path and split:
            raise SettingError(
                "val_split", split, f"and val_path ({self.val_path}) are two validation sets: give one"
            )

    def check_data(self) -> None:
        """Read the data files and check every sample and its rendering, without tokenizing.

        What ``setup`` would refuse; cheap enough to run before ``fit`` starts its loggers, which
        clear an existing log directory.
        """
        files = [("data_path", self.data_path)] + ([("val_path", self.val_path)] if self.val_path else [])
        for setting, path in files:
            samples, wheres = self._read(setting, path)
            for sample, where in zip(samples, wheres):
                try:
                    self.encoder.check(sample)
                except TemplateError as err:
                    raise _render_error(setting, path, where, str(err)) from None

    def _read(self, setting: str, path: str) -> tuple[list[Sample], list[str]]:
        """The samples of a data file, and where each is in it."""
        reader = self.reader if setting == "data_path" else self._val_reader()
        records = read_records(path, setting)
        return [reader.read(record, where) for record, where in records], [where for _, where in records]

    def _val_reader(self) -> SampleReader:
        r = self.reader
        return SampleReader(str(self.val_path), r.format, r.columns, "val_path", r.need_response)

    def generation_prompt(self, text: str) -> Prompt:
        """What the model continues for ``text``, rendered as the training samples are (see ``sample_format``)."""
        return self.encoder.prompt(text, self.sample_format)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: the chat template's end-of-turn token, then end-of-sequence."""
        return self.encoder.stop_ids

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """The prompt the model sees for an alpaca-style sample (what generation should start from)."""
        return self.encoder.format_prompt(instruction, input)

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        """Token ids of :meth:`format_prompt`, with the beginning-of-sequence token as in training."""
        return self.encoder.prompt(self.format_prompt(instruction, input), "text").ids

    def load(self) -> None:
        """Read, check, tokenize and split the data (and pack it, with ``packing``); once."""
        if self.train_data is not None:
            return
        samples, wheres = self._read("data_path", self.data_path)
        counts = Counter(sample.format for sample in samples)
        self.sample_format = counts.most_common(1)[0][0]
        if self.packing and any(s.format == "alpaca" for s in samples):
            self._check_prompt_room()
        examples = self._encode("data_path", self.data_path, samples, wheres)
        formats = ", ".join(f"{n} {name}" for name, n in counts.most_common())
        if self.val_path:
            self.train_data = examples
            self.val_data = self._encode("val_path", self.val_path, *self._read("val_path", self.val_path))
        else:
            self.train_data, self.val_data = self._split(examples)
        kept = [len(s["input_ids"]) for s in self.train_data + self.val_data]
        source = f"{self.data_path} and {self.val_path}" if self.val_path else self.data_path
        self.info(
            f"Instruction data: {len(self.train_data)} training and {len(self.val_data)} validation samples "
            f"from {source} ({formats}); {min(kept)}-{max(kept)} tokens (median {sorted(kept)[len(kept) // 2]})"
        )
        if any(s.is_chat for s in samples):
            self.info(f"Conversations rendered with {self.encoder.rendering}")
        if self.packing:
            self.train_rows = PackedDataset(self.train_data, self.max_length, seed=self.seed)
            self.val_rows = PackedDataset(self.val_data, self.max_length, seed=self.seed)
            self.info(
                f"Packing: {len(self.train_rows)} training rows ({self.train_rows.fill_rate:.1%} filled) and "
                f"{len(self.val_rows)} validation rows of at most {self.max_length} tokens"
            )

    def _encode(self, setting: str, path: str, samples: list[Sample], wheres: list[str]) -> Examples:
        """Token ids and labels cut to ``max_length``; the cut ones are reported once."""
        try:
            fitted = fit_to_length(self.encoder.encode(samples), self.max_length)
        except RenderError as err:
            raise _render_error(setting, path, wheres[err.index], err.reason) from None
        self.num_truncated += fitted.truncated
        self.num_dropped += fitted.dropped
        if fitted.truncated:
            dropped = (
                fitted.dropped and f"; {fitted.dropped} of them lost their whole response and were left out"
            )
            of = "" if setting == "data_path" else f" of {setting}"
            self.warn(
                f"{fitted.truncated} of {len(samples)} samples{of} are longer than max_length={self.max_length} "
                f"tokens (longest: {max(fitted.lengths)}) and were cut at the end{dropped or ''}. "
                "Raise max_length to keep them whole."
            )
        if not fitted.examples:
            raise SettingError("max_length", self.max_length, f"cuts every response of {path} away; raise it")
        return fitted.examples

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
        """The validation batches, in file order; ``[]`` without validation data."""
        assert self.train_data is not None, "call load() (a data module's setup('fit')) first"
        if not self.val_data:
            return []
        return self._loader(self.val_rows if self.packing else self.val_data, batch_size=self.batch_size)

    def info(self, message: str) -> None:
        """Report what :meth:`load` did (a Lightning data module: on rank zero)."""
        log.info(message)

    def warn(self, message: str) -> None:
        """Warn about the data, once (a Lightning data module: on rank zero)."""
        warnings.warn(message, stacklevel=4)  # at the call of load(): warn, _encode, load, caller


def _render_error(setting: str, path: str, where: str, reason: str) -> SettingError:
    return SettingError(
        setting, path, f"has a sample at {where} that the chat template cannot render: {reason}"
    )
