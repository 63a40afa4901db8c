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
