"""Samples to token ids and labels, and prompts to the token ids a model continues, in one rendering.

Framework-free. :class:`SampleEncoder` holds everything that decides how text reaches the model:
the tokenizer, the chat template or role headers (:mod:`lightning_paged.core.chat`), the alpaca
prompt templates and ``train_on_inputs``. Training samples and the prompts a model is asked to
answer (the sample after each validation, ``lightning-paged generate``) go through the same object,
so a model is prompted the way it was trained.

- A conversation with a chat template: the template's token ids, the loss on the assistant turns'
  tokens (their end-of-turn token included, the tokenizer's end-of-sequence token not added).
- A conversation with role headers: ``<bos>### user:\\n...\\n\\n### assistant:\\n...<eos>``, the loss on
  each assistant message and the end-of-sequence token after it.
- alpaca, prompt/completion, text: ``<bos>`` + prompt + response + ``<eos>``, the loss on the response
  and the end-of-sequence token (text: everything).

``train_on_inputs`` puts the loss on every token instead; the token ids do not change.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_paged.core.chat import ChatTemplate, resolve_template
from lightning_paged.core.errors import SettingError
from lightning_paged.core.formats import CHAT_FORMATS, Sample
from lightning_paged.core.packing import IGNORE_INDEX
from lightning_paged.core.tokenizer import encode_texts

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
ROLE_HEADER = "### {role}:\n"

Segment = tuple[str, bool]
"""A piece of a formatted sample and whether it is a response (the loss covers it, an end-of-sequence token follows)."""
Example = dict[str, list[int]]
"""``{"input_ids": [...], "labels": [...]}``."""


@dataclass(frozen=True)
class Prompt:
    """What a model is asked to continue."""

    ids: list[int]
    text: str
    """The prompt as the model receives it: rendered, special tokens written out."""


class RenderError(ValueError):
    """Sample ``index`` cannot be rendered (``reason``): the chat template refused it."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


class SampleEncoder:
    """Renders and tokenizes samples and prompts. Errors name the settings as written here.

    Args:
        tokenizer: What :func:`~lightning_paged.core.tokenizer.load_tokenizer` returns.
        chat_template: ``auto``, ``tokenizer``, ``headers``, a Jinja template or a template file.
        prompt_template: The alpaca prompt, with ``{instruction}`` and ``{input}``.
        input_template: The alpaca ``input`` block, with ``{input}``.
        role_header: The header before each message when conversations are rendered with headers.
        train_on_inputs: Put the loss on every token, prompts included.
    """

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str = "auto",
        prompt_template: str = ALPACA_PROMPT,
        input_template: str = ALPACA_INPUT,
        role_header: str = ROLE_HEADER,
        train_on_inputs: bool = False,
    ) -> None:
        check_fields("prompt_template", prompt_template, {"instruction", "input"})
        check_fields("input_template", input_template, {"input"})
        check_fields("role_header", role_header, {"role"})
        if not isinstance(train_on_inputs, bool):
            raise SettingError("train_on_inputs", train_on_inputs, "must be true or false")
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.input_template = input_template
        self.role_header = role_header
        self.train_on_inputs = train_on_inputs
        template, source = resolve_template(chat_template, tokenizer)
        self.chat = ChatTemplate(tokenizer, template, source, chat_template) if template else None
        self.rendering = (
            self.chat.describe()
            if self.chat is not None
            else f"{source}: {role_header!r} before each message, the end-of-sequence token after each answer"
        )
        """Which rendering conversations get, in words (logged once per run)."""

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an answer: the template's end-of-turn token, then the end-of-sequence token."""
        ids = [self.chat.end_of_turn_id] if self.chat is not None else []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return [i for i in dict.fromkeys([*ids, eos]) if i is not None]

    def format_prompt(self, instruction: str, input: str = "") -> str:
        """The alpaca prompt for an instruction (and input)."""
        block = self.input_template.format(input=input) if input else ""
        return self.prompt_template.format(instruction=instruction, input=block)

    def bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [] if bos is None else [bos]

    def check(self, sample: Sample) -> None:
        """Render ``sample``'s text (no tokenizing); raise :class:`~lightning_paged.core.chat.TemplateError` if it cannot be."""
        if sample.messages is not None and self.chat is not None:
            self.chat.render(sample.messages)

    def encode(self, samples: Sequence[Sample]) -> list[Example]:
        """Token ids and labels of each sample (uncut); header-rendered texts are tokenized in one batched call.

        Raises :class:`RenderError` with the index of a sample the chat template cannot render.
        """
        segments = {i: self.segments(s) for i, s in enumerate(samples) if not self._templated(s)}
        pieces = iter(
            encode_texts(self.tokenizer, [text for parts in segments.values() for text, _ in parts])
        )
        eos = getattr(self.tokenizer, "eos_token_id", None)
        out = []
        for i, sample in enumerate(samples):
            if self._templated(sample):
                out.append(self._encode_chat(i, sample))
                continue
            input_ids = self.bos()
            labels = [IGNORE_INDEX] * len(input_ids)
            for (_, response), piece in zip(segments[i], pieces):
                if response and eos is not None:
                    piece = [*piece, eos]
                input_ids += piece
                labels += piece if response else [IGNORE_INDEX] * len(piece)
            out.append(
                {"input_ids": input_ids, "labels": list(input_ids) if self.train_on_inputs else labels}
            )
        return out

    def _templated(self, sample: Sample) -> bool:
        return sample.messages is not None and self.chat is not None

    def _encode_chat(self, index: int, sample: Sample) -> Example:
        from lightning_paged.core.chat import TemplateError

        assert self.chat is not None and sample.messages is not None
        try:
            ids, mask = self.chat.encode(sample.messages, train_from=sample.train_from)
        except TemplateError as err:
            raise RenderError(index, str(err)) from err
        if self.train_on_inputs:
            return {"input_ids": ids, "labels": list(ids)}
        return {"input_ids": ids, "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]}

    def segments(self, sample: Sample) -> list[Segment]:
        """The texts of a sample rendered without a chat template, each with whether it is a response."""
        if sample.messages is not None:
            parts: list[Segment] = []
            for i, message in enumerate(sample.messages):
                if i:
                    parts.append(("\n\n", False))
                parts.append((self.role_header.format(role=message["role"]), False))
                response = message["role"] == "assistant" and i >= sample.train_from
                parts.append((message["content"], response))
            return parts
        if sample.format == "alpaca":
            return [(self.format_prompt(sample.prompt, sample.input), False), (sample.response, True)]
        if sample.format == "prompt_completion":
            return [(sample.prompt, False), (sample.response, True)]
        return [(sample.response, True)]

    def prompt(self, text: str | list[dict[str, str]], format: str = "alpaca", input: str = "") -> Prompt:
        """What the model is asked to continue for ``text``, rendered as ``format``'s samples are trained.

        A chat format (or ``text`` a list of ``{role, content}`` messages, the conversation so far):
        ``text`` as a user message, then the generation prompt (the chat template's
        ``add_generation_prompt=True``, or the assistant's role header). alpaca: the alpaca prompt
        (with ``input``). prompt_completion and text: ``text`` itself. Every rendering but the chat
        template's starts with the beginning-of-sequence token, as training samples do.
        """
        if isinstance(text, list) or format in CHAT_FORMATS:
            messages = text if isinstance(text, list) else [{"role": "user", "content": text}]
            if self.chat is not None:
                ids, rendered = self.chat.prompt(messages)
                return Prompt(ids, rendered)
            # the conversation's own segments, as training tokenizes them, then the assistant's header
            [sample] = self.encode([Sample("messages", messages=messages)])
            header = encode_texts(self.tokenizer, ["\n\n", self.role_header.format(role="assistant")])
            ids = sample["input_ids"] + header[0] + header[1]
            return Prompt(ids, self.tokenizer.decode(ids))
        if format == "alpaca":
            body = self.format_prompt(text, input)
        else:
            body = text
        ids = self.bos() + encode_texts(self.tokenizer, [body])[0]
        return Prompt(ids, self.tokenizer.decode(ids))


@dataclass
class Fitted:
    """Examples cut to ``max_length``, and what was cut."""

    examples: list[Example]
    lengths: list[int]
    """Every sample's length before cutting (dropped ones included)."""
    truncated: int
    """Samples longer than ``max_length``, cut at the end."""
    dropped: int
    """Cut samples left without a token for the loss, and left out."""


def fit_to_length(examples: Sequence[Example], max_length: int) -> Fitted:
    """Cut each example to ``max_length`` tokens; leave out those the cut leaves nothing to learn."""
    kept, lengths, truncated, dropped = [], [], 0, 0
    for example in examples:
        input_ids, labels = example["input_ids"], example["labels"]
        lengths.append(len(input_ids))
        if len(input_ids) > max_length:
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):  # the loss predicts labels[1:]
                dropped += 1
                continue
        kept.append({"input_ids": input_ids, "labels": labels})
    return Fitted(kept, lengths, truncated, dropped)


def check_fields(setting: str, template: str, allowed: set[str]) -> None:
    """Raise :class:`SettingError` unless ``template`` is a format string with exactly the fields ``allowed``."""
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
