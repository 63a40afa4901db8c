"""The one error type for bad settings: it names the setting the user wrote and what to do."""

from __future__ import annotations


class SettingError(ValueError):
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


class UsageError(Exception):
    """A bad input told as the user should read it: a one-line ``message`` and an optional short ``hint``.

    The commands print it as ``lightning-paged: error: <message>`` and exit with code 2.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
