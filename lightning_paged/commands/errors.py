"""How a bad input reaches the user of ``lightning-paged``: one line, exit code 2.

Every subcommand runs through :func:`run_command`. An error the project knows as bad input is
printed as ``lightning-paged: error: <one line>`` (and at most a short hint on the next line), and
the command exits with :data:`USAGE_EXIT_CODE`:

- :class:`~lightning_paged.core.errors.SettingError`, with the setting spelled as on the command line
  (``model.init_args.max_length``, ``trainer.strategy.init_args.lora_r``) whichever layer raised it;
- a checkpoint that cannot be read or does not fit, an export or report refusal;
- jsonargparse's parse and instantiation errors, YAML syntax errors and interpolations to a missing
  key, which :mod:`lightning_paged.lightning.cli_errors` turns into one line where the
  LightningCLI raises them.

Anything else is a bug and keeps its traceback. ``--traceback`` anywhere on the command line, or
``LIGHTNING_PAGED_TRACEBACK=1`` in the environment, shows the full trace of a bad input too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from lightning_paged.core.errors import SettingError, UsageError
from lightning_paged.lightning.cli_errors import (
    explain_interpolation_error,
    explain_parse_error,
    is_parse_error,
    locate_setting_error,
    one_line,
)

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


def as_usage_error(err: BaseException) -> UsageError | None:
    """The one-line account of a bad input; None for anything else (a bug, whose trace must show)."""
    if isinstance(err, UsageError):
        return err
    if isinstance(err, SettingError):
        return UsageError(one_line(str(locate_setting_error(err))))
    if isinstance(err, _bad_input_types()):
        return UsageError(one_line(str(err)))
    if is_parse_error(err):
        return explain_parse_error(err)
    if type(err).__module__.startswith("omegaconf"):
        return explain_interpolation_error(err)
    return None


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_paged.core.atomic import CheckpointReadError
    from lightning_paged.core.export import ExportError
    from lightning_paged.core.fingerprint import CheckpointMismatchError
    from lightning_paged.core.loading import WeightLoadError
    from lightning_paged.core.plot import ReportError

    return (
        CheckpointReadError,
        CheckpointMismatchError,
        ExportError,
        ReportError,
        WeightLoadError,
        MisconfigurationException,
    )
