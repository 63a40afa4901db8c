"""The project's bad-input errors: one base class, :class:`BadInput`, that every one of them subclasses.

A :class:`BadInput` means "what you gave cannot be used": a setting, a file, a checkpoint. Its
message names the setting or file as the user wrote it and says what to do. The
``lightning-paged`` command prints any of them as one line with exit code 2
(:mod:`lightning_paged.commands.errors` catches the base class, once); any other exception is a
bug and keeps its traceback. Each subclass also derives from the built-in error a caller would
expect (``ValueError`` for a value, ``FileNotFoundError`` for a missing file).
"""

from __future__ import annotations


class BadInput(Exception):
    """Something the user gave cannot be used; the message says what and what to do."""


class SettingError(BadInput, ValueError):
    """A setting has a value the project cannot use.

    ``setting`` is the name as the user wrote it; adapters (the strategy, the CLI) prefix it with
    where it lives (``trainer.strategy.init_args.``) so the message matches the user's config.
    """

    def __init__(self, setting: str, value: object, problem: str, where: str = "") -> None:
        self.setting = setting
        self.value = value
        self.problem = problem
        self.where = where
        super().__init__(f"{where}{setting} {problem}; got {value!r}")

    def located(self, where: str) -> SettingError:
        """The same error with the setting's location in the user's config in front of its name."""
        return SettingError(self.setting, self.value, self.problem, where=where)


class UsageError(BadInput):
    """A bad input told as the user should read it: a one-line ``message`` and an optional short ``hint``.

    The commands print it as ``lightning-paged: error: <message>`` and exit with code 2.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class MissingFileError(BadInput, FileNotFoundError):
    """A file or directory the user named does not exist (or holds nothing of what it should)."""


class ExportError(BadInput, ValueError):
    """An export or merge cannot be done; the message says why and what to do."""
