"""How a bad input reaches the user of ``lightning-paged``: one line, exit code 2.

Every subcommand runs through :func:`run_command`. An error the project knows as bad input is
printed as ``lightning-paged: error: <one line>`` (and at most a short hint on the next line), and
the command exits with :data:`USAGE_EXIT_CODE`:

- any :class:`~lightning_paged.core.errors.BadInput`, the base class of every bad-input error of the
  project (a checkpoint that cannot be read or does not fit, weights that cannot be loaded, an
  export or report refusal); a :class:`~lightning_paged.core.errors.SettingError` with the setting
  spelled as on the command line (``model.init_args.max_length``,
  ``trainer.strategy.init_args.lora_r``) whichever layer raised it;
- jsonargparse's parse and instantiation errors, YAML syntax errors, interpolations to a missing
  key and Lightning's ``MisconfigurationException``, which the LightningCLI
  (:mod:`lightning_paged.commands.cli`, with :mod:`lightning_paged.commands.cli_errors`) turns
  into a :class:`~lightning_paged.core.errors.UsageError` where it raises them.

Anything else is a bug and keeps its traceback. ``--traceback`` anywhere on the command line, or
``LIGHTNING_PAGED_TRACEBACK=1`` in the environment, shows the full trace of a bad input too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lightning_paged.commands.cli_errors import locate_setting_error, one_line
from lightning_paged.core.errors import BadInput, SettingError, UsageError

PROG = "lightning-paged"
USAGE_EXIT_CODE = 2
"""The exit code of a command refused for bad input (argparse's own)."""
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "LIGHTNING_PAGED_TRACEBACK"


def traceback_requested(argv: Sequence[str]) -> bool:
    """Whether the full trace of a bad input was asked for (``--traceback`` or the environment variable)."""
    return TRACEBACK_FLAG in argv or os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def run_command(command: Callable[[list[str]], int], argv: Sequence[str], prog: str = PROG) -> int:
    """``command(argv)`` (without ``--traceback``), with a bad input told in one line and exit code 2."""
    show_trace = traceback_requested(argv)
    args = [arg for arg in argv if arg != TRACEBACK_FLAG]
    try:
        return command(args)
    except Exception as err:
        usage = None if show_trace else as_usage_error(err)
        if usage is None:
            raise
        print(f"{prog}: error: {usage.message}", file=sys.stderr)
        if usage.hint:
            print(f"  {usage.hint}", file=sys.stderr)
        return USAGE_EXIT_CODE


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """``parser.parse_args(argv)``; ``--help`` and argparse's own errors become the exit code they carry."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def as_usage_error(err: BaseException) -> UsageError | None:
    """The one-line account of a bad input (a :class:`~lightning_paged.core.errors.BadInput`); None for a bug."""
    if isinstance(err, SettingError):
        return UsageError(one_line(str(locate_setting_error(err))))
    if isinstance(err, UsageError):
        return err
    if isinstance(err, BadInput):
        return UsageError(one_line(str(err)))
    return None
