"""Chat templates: conversations rendered as the model's tokenizer renders them, and the assistant's tokens.

Framework-free. The ``chat_template`` setting says how conversations are rendered:

- ``auto``: the tokenizer's chat template when it has one, else role headers (``### user:``);
- ``tokenizer``: the tokenizer's chat template; an error when it has none;
- ``headers``: role headers, whatever the tokenizer has;
- a Jinja template, or the path of a file holding one: that template.

With a template a sample's token ids are exactly those of
``tokenizer.apply_chat_template(messages, tokenize=True)`` and the loss covers the assistant turns'
tokens, found one of two ways:

- A template with a ``{% generation %}`` block: transformers' assistant-token mask
  (``return_assistant_tokens_mask=True``). In transformers 5.25 the block's ``AssistantTracker``
  records the character span of what it rendered (``utils/chat_template_utils.py:575-612``) and
  ``apply_chat_template`` marks every token whose offsets overlap a span
  (``tokenization_utils_base.py:3203-3229``); that needs a fast tokenizer's offsets.
- Any other template, turn by turn: assistant message ``i`` is what rendering the first ``i + 1``
  messages adds to rendering the first ``i`` with ``add_generation_prompt=True`` (the header the
  model's answer follows), without trailing whitespace: its content and its end-of-turn token.
  Tokens overlapping that span are marked, as transformers marks them. This needs a template that
  renders the first messages as the start of the whole conversation and starts an assistant turn
  with its generation prompt; one that does neither and has no ``{% generation %}`` block is
  refused with the reason.

Both agree on a template that has a ``{% generation %}`` block around an assistant turn's content
and end-of-turn token, as transformers' documentation writes them (tested).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from lightning_paged.core.errors import BadInput, SettingError

AUTO, TOKENIZER, HEADERS = "auto", "tokenizer", "headers"
CHOICES = (AUTO, TOKENIZER, HEADERS)
"""The named values of the ``chat_template`` setting (anything else is a template or a template file)."""

GENERATION_BLOCK = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
"""How transformers tells a template that can mark assistant tokens (``chat_template_utils.py:774``)."""

Marking = Literal["generation", "turns"]

PROBE = [
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus two?"},
    {"role": "assistant", "content": "Five."},
]
"""A conversation every chat template should render: checked once, before any data is read."""
FOLLOW_UP = {"role": "user", "content": "Thanks."}
"""The message rendered after an assistant turn to see where the turn ends."""


class TemplateError(BadInput, ValueError):
    """A conversation the chat template cannot render, or whose assistant tokens it cannot mark.

    Reading data names the sample's file and place instead; a prompt given to ``generate`` is told as it is.
    """


def resolve_template(setting: str, tokenizer: Any) -> tuple[str | None, str]:
    """``(template, where it comes from)`` for the ``chat_template`` setting; None means role headers."""
    own = tokenizer_template(tokenizer)
    if setting == HEADERS:
        return None, "role headers (chat_template: headers)"
    if setting == AUTO:
        if own is None:
            return None, "role headers (the tokenizer has no chat template)"
        return own, "the tokenizer's chat template"
    if setting == TOKENIZER:
        if own is None:
            raise SettingError(
                "chat_template",
                setting,
                f"asks for the tokenizer's chat template, but {getattr(tokenizer, 'name_or_path', 'it')} has "
                "none; use auto or headers, or give a Jinja template or the path of a file holding one",
            )
        return own, "the tokenizer's chat template"
    if not isinstance(setting, str) or not setting:
        raise SettingError("chat_template", setting, "must be auto, tokenizer, headers, a template or a file")
    if "{{" in setting or "{%" in setting:
        return setting, "the template given as chat_template"
    path = Path(setting).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8"), f"the chat template in {setting}"
    raise SettingError(
        "chat_template",
        setting,
        f"must be {', '.join(CHOICES)}, a Jinja chat template, or the path of a file holding one "
        "(no such file)",
    )


def tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (its default one when it has several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


class ChatTemplate:
    """A Jinja chat template applied with ``tokenizer``: rendering, token ids, assistant-token masks.

    Args:
        tokenizer: A transformers fast tokenizer.
        template: The Jinja template.
        source: Where the template comes from, for the log line.
        setting: The ``chat_template`` value as the user wrote it, for errors.

    Raises :class:`SettingError` (``chat_template``) for a template that cannot render the
    :data:`PROBE` conversation or mark its assistant tokens, with the reason.
    """

    def __init__(self, tokenizer: Any, template: str, source: str, setting: str = AUTO) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.source = source
        self.marking: Marking = "generation" if GENERATION_BLOCK.search(template) else "turns"
        if not getattr(tokenizer, "is_fast", False):
            raise SettingError(
                "chat_template",
                setting,
                f"needs a transformers fast tokenizer (its token offsets mark the assistant's tokens); "
                f"{type(tokenizer).__name__} is not one. Use chat_template: headers",
            )
        try:
            _, mask = self.encode(PROBE)
        except TemplateError as err:
            reason = (
                f"has no {{% generation %}} block to mark the assistant's tokens, and cannot be rendered turn by "
                f"turn: {err}"
                if self.marking == "turns"
                else f"cannot render a user/assistant conversation: {err}"
            )
            raise SettingError(
                "chat_template",
                setting,
                f"({source}) {reason}. Use chat_template: headers, or a template "
                "with {% generation %} around each assistant turn",
            ) from err
        if self.marking == "generation" and not any(mask):
            raise SettingError(
                "chat_template",
                setting,
                f"({source}) marks no token of a user/assistant conversation as the assistant's: its "
                "{% generation %} blocks render nothing",
            )
        self.end_of_turn_id = self._end_of_turn()
        """The special token the template ends an assistant turn with (``<|im_end|>``), or None."""

    def describe(self) -> str:
        """One line for the log: which template, how the assistant's tokens are found, how turns end."""
        how = (
            "its {% generation %} blocks mark the assistant's tokens"
            if self.marking == "generation"
            else "the assistant's tokens are found by rendering each conversation turn by turn"
        )
        if self.end_of_turn_id is None:
            ends = "no special token ends an assistant turn, so generation stops at the end-of-sequence token or the token limit"
        else:
            ends = f"assistant turns end with {self.tokenizer.convert_ids_to_tokens(self.end_of_turn_id)!r}"
        return f"{self.source}; {how}; {ends}"

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, as ``apply_chat_template(..., tokenize=False)`` renders it."""
        return self._apply(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """Token ids and text of ``messages`` followed by the generation prompt (what the model continues).

        The ids are ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``'s:
        transformers renders, then tokenizes the text with ``add_special_tokens=False``
        (``tokenization_utils_base.py:3191-3200``).
        """
        text = self.render(messages, add_generation_prompt=True)
        return self._ids(text), text

    def encode(
        self, messages: list[dict[str, str]], train_from: int = 0, marking: Marking | None = None
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and which of them are assistant tokens the loss covers.

        ``train_from``: assistant turns before this message index are not covered (a prompt's).
        ``marking`` forces one way of finding the assistant tokens (for tests); by default the
        template's.
        """
        if (marking or self.marking) == "generation":
            out = self._apply(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        else:
            text, spans = self._turn_spans(messages)
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, mask = list(encoding["input_ids"]), _overlapping(encoding["offset_mapping"], spans)
        if train_from:
            full = self.render(messages)
            head = self.render(messages[:train_from], add_generation_prompt=True)
            if not full.startswith(head):
                raise TemplateError(
                    "the template does not render the prompt's messages, with the generation prompt, as the "
                    "start of the conversation, so the completion cannot be told apart"
                )
            offsets = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            mask = [m and start >= len(head) for m, (start, _) in zip(mask, offsets["offset_mapping"])]
        return ids, mask

    def _turn_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant turn in it.

        A turn ends where rendering it followed by one more user message departs from rendering it
        last (a template may close a conversation with an end-of-sequence token, as Phi-3's does),
        moved back to the start of the token it falls in, without trailing whitespace.
        """
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:
                raise TemplateError(
                    "the conversation starts with an assistant message, which has no generation prompt before it"
                )
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not upto.startswith(before):
                raise TemplateError(
                    f"rendering assistant message {i} does not begin with the generation prompt rendered before "
                    "it (the template starts an assistant turn differently from what add_generation_prompt writes)"
                )
            turn = upto[: self._turn_end(upto, self.render([*messages[: i + 1], FOLLOW_UP]))]
            if message["content"].strip() not in turn[len(before) :]:
                raise TemplateError(
                    f"assistant message {i} renders differently once another message follows it (its content "
                    "is not where it was), so the first messages do not render as the start of the whole "
                    "conversation"
                )
            if not full.startswith(turn):
                raise TemplateError(
                    f"the first {i + 1} messages do not render as the start of the whole conversation (the "
                    "template writes earlier turns differently when later ones follow)"
                )
            spans.append((len(before), max(len(before), len(turn.rstrip()))))
        return full, spans

    def _turn_end(self, last: str, followed: str) -> int:
        """Where ``followed`` departs from ``last``, moved back to the start of the token it falls in."""
        at = next(
            (k for k, (a, b) in enumerate(zip(last, followed)) if a != b), min(len(last), len(followed))
        )
        if at == len(last):
            return at
        offsets = self.tokenizer(followed, add_special_tokens=False, return_offsets_mapping=True)
        return next((start for start, end in offsets["offset_mapping"] if start < at < end), at)

    def _end_of_turn(self) -> int | None:
        """The special token right after the last assistant content of :data:`PROBE`, if any."""
        text = self.render(PROBE)
        content = PROBE[-1]["content"]
        at = text.rfind(content)
        if at < 0:
            return None
        after = self._ids(text[at + len(content) :])
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.get_added_vocab().values())
        return after[0] if after and after[0] in special else None

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _apply(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        import jinja2

        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, **kwargs)
        except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            text = str(err).strip().splitlines()
            raise TemplateError(f"{type(err).__name__}: {text[0] if text else ''}") from err


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token, whether its characters overlap one of ``spans`` (transformers' rule)."""
    return [any(end > a and start < b for a, b in spans) for start, end in offsets]
