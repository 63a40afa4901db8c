"""Sample formats: which one a record is, its fields under the file's own column names, its turns.

Framework-free. Five formats, told apart by their fields (the first that matches, in this order)
unless the ``format`` setting fixes one:

- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, roles ``system``, ``user``,
  ``assistant``, ``tool``; the loss covers the assistant turns;
- ``sharegpt``: ``{"conversations": [{"from": ..., "value": ...}, ...]}``, ``from`` being ``human``,
  ``gpt`` or ``system`` (read as user, assistant, system); the loss covers the ``gpt`` turns;
- ``alpaca``: ``{"instruction": ..., "input": ... (optional), "output": ...}``; the loss covers ``output``;
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}`` as TRL writes it, two strings, or two
  lists of messages (its conversational form); the loss covers the completion;
- ``text``: ``{"text": ...}``; the loss covers every token (continued pre-training).

``columns`` maps these field names to the ones a file uses (``{"output": "answer"}``). A sample
that fits no format, or lacks a field, is a one-line error that names the ``columns`` setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_paged.core.errors import SettingError
from lightning_paged.core.settings import close_matches

SampleFormat = Literal["messages", "sharegpt", "alpaca", "prompt_completion", "text"]
FormatSetting = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text"]
FORMATS: tuple[str, ...] = get_args(SampleFormat)

REQUIRED: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
"""The fields each format needs, in the order formats are tried."""
COLUMNS = ("messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text")
"""Field names the ``columns`` setting may map."""
CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles of a ``messages`` sample."""
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
"""ShareGPT's ``from`` values and the roles they are read as."""
CHAT_FORMATS = ("messages", "sharegpt")


@dataclass(frozen=True)
class Sample:
    """One sample, read: a conversation (``messages``) or a prompt and a response."""

    format: SampleFormat
    messages: list[dict[str, str]] | None = None
    """``{"role", "content"}`` turns of a chat sample (or of a conversational prompt and completion)."""
    train_from: int = 0
    """Index of the first message whose assistant turns the loss covers (the completion's first)."""
    prompt: str = ""
    """Instruction (alpaca) or prompt (prompt_completion); empty for text."""
    input: str = ""
    """The alpaca ``input``."""
    response: str = ""
    """Output, completion or text: what the loss covers."""

    @property
    def is_chat(self) -> bool:
        """Whether the sample is a conversation (rendered with the chat template or role headers)."""
        return self.messages is not None


class SampleReader:
    """Reads records into :class:`Sample`; errors name ``setting`` (the file's setting) and the sample.

    Args:
        source: The file the records come from, as the user wrote it.
        format: ``"auto"`` (each sample by its fields) or one format for every sample.
        columns: Field names of the file, keyed by the names above (``{"output": "answer"}``).
        setting: The setting that names the file (``data_path``, ``val_path``).
        need_response: Refuse a chat sample with nothing for the loss (off with ``train_on_inputs``).
    """

    def __init__(
        self,
        source: str,
        format: str = "auto",
        columns: Mapping[str, str] | None = None,
        setting: str = "data_path",
        need_response: bool = True,
    ) -> None:
        self.source = source
        self.format = format
        self.columns = dict(columns or {})
        self.setting = setting
        self.need_response = need_response
        check_format_settings(format, columns)

    def read(self, record: Any, where: str) -> Sample:
        """The sample ``record`` holds (``where``: its place in the file, e.g. ``line 3``)."""
        if not isinstance(record, dict):
            raise self._bad(where, f"is a {type(record).__name__}, not an object")
        kind = self.format if self.format != "auto" else self._detect(record, where)
        values = {name: self._field(record, name, kind, where) for name in REQUIRED[kind]}
        if kind == "messages":
            return self._chat("messages", values["messages"], "role", "content", where)
        if kind == "sharegpt":
            return self._chat("sharegpt", values["conversations"], "from", "value", where)
        if kind == "prompt_completion" and isinstance(values["prompt"], list):
            return self._conversational(values["prompt"], values["completion"], where)
        texts = {name: self._string(value, name, where) for name, value in values.items()}
        if kind == "alpaca":
            extra = record.get(self.columns.get("input", "input"))
            return Sample(
                "alpaca",
                prompt=texts["instruction"],
                input=self._string(extra, "input", where) if extra is not None else "",
                response=texts["output"],
            )
        if kind == "prompt_completion":
            return Sample("prompt_completion", prompt=texts["prompt"], response=texts["completion"])
        return Sample("text", response=texts["text"])

    def _detect(self, record: dict, where: str) -> str:
        for kind, names in REQUIRED.items():
            if all(record.get(self.columns.get(name, name)) is not None for name in names):
                return kind
        keys = ", ".join(map(repr, record)) or "none"
        mapped = f" (with columns {self.columns})" if self.columns else ""
        raise self._bad(
            where,
            f"fits no format{mapped}: its keys are {keys}; each sample needs 'messages', 'conversations' "
            "(ShareGPT), 'instruction' and 'output' (alpaca), 'prompt' and 'completion', or 'text'. Map other "
            "field names with the columns setting, e.g. columns: {prompt: question, completion: answer}",
        )

    def _field(self, record: dict, name: str, kind: str, where: str) -> Any:
        column = self.columns.get(name, name)
        value = record.get(column)
        if value is None:
            keys = ", ".join(map(repr, record)) or "none"
            how = (
                f"columns maps {name!r} to {column!r}"
                if column != name
                else f"map the field that holds it with the columns setting, e.g. columns: {{{name}: <field>}}"
            )
            raise self._bad(
                where, f"has no {column!r}, which the {kind} format needs ({how}; its keys: {keys})"
            )
        return value

    def _string(self, value: Any, name: str, where: str) -> str:
        if not isinstance(value, str):
            raise self._bad(where, f"has a {type(value).__name__} as {name!r}, not a string")
        return value

    def _chat(self, kind: SampleFormat, turns: Any, role_key: str, content_key: str, where: str) -> Sample:
        messages = self._messages(turns, role_key, content_key, where, kind)
        if self.need_response and not any(m["role"] == "assistant" for m in messages):
            speaker = "'gpt'" if kind == "sharegpt" else "'assistant'"
            raise self._bad(where, f"has no {speaker} message to learn from")
        return Sample(kind, messages=messages)

    def _conversational(self, prompt: Any, completion: Any, where: str) -> Sample:
        if not isinstance(completion, list):
            raise self._bad(where, "has a list of messages as 'prompt' but not as 'completion'")
        head = self._messages(prompt, "role", "content", where, "prompt_completion")
        tail = self._messages(completion, "role", "content", where, "prompt_completion")
        if self.need_response and not any(m["role"] == "assistant" for m in tail):
            raise self._bad(where, "has no 'assistant' message in its completion to learn from")
        return Sample("prompt_completion", messages=head + tail, train_from=len(head))

    def _messages(
        self, turns: Any, role_key: str, content_key: str, where: str, kind: str
    ) -> list[dict[str, str]]:
        if not isinstance(turns, list) or not turns:
            raise self._bad(where, f"has no non-empty list of {{{role_key}, {content_key}}} objects")
        roles = SHAREGPT_ROLES if kind == "sharegpt" else {role: role for role in CHAT_ROLES}
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str):
                raise self._bad(where, f"has message {i} without a {role_key!r} string")
            if not isinstance(turn.get(content_key), str):
                raise self._bad(where, f"has message {i} without a {content_key!r} string")
            role = turn[role_key]
            if role not in roles:
                raise self._bad(
                    where,
                    f"has message {i} with {role_key} {role!r}; the accepted {role_key} values of {kind} "
                    f"samples are {', '.join(roles)}",
                )
            messages.append({"role": roles[role], "content": turn[content_key]})
        return messages

    def _bad(self, where: str, problem: str) -> SettingError:
        return SettingError(self.setting, self.source, f"has a sample at {where} that {problem}")


def check_format_settings(format: str, columns: Mapping[str, str] | None) -> None:
    """Raise :class:`SettingError` for a ``format`` or ``columns`` value that cannot work."""
    if format != "auto" and format not in FORMATS:
        raise SettingError("format", format, f"must be one of auto, {', '.join(FORMATS)}")
    if columns is None:
        return
    if not isinstance(columns, Mapping):
        raise SettingError("columns", columns, "must map field names to your file's, e.g. {output: answer}")
    for name, column in columns.items():
        if name not in COLUMNS:
            close = close_matches(str(name), COLUMNS)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SettingError(
                f"columns.{name}", column, f"maps no known field; {hint}the fields are {', '.join(COLUMNS)}"
            )
        if not isinstance(column, str) or not column:
            raise SettingError(f"columns.{name}", column, "must be the name of a field of your file")
