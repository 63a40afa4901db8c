"""The ``lightning-paged`` command: LightningCLI for fit/validate/test, plus report, export, generate and plan.

``lightning-paged fit ...`` (and validate, test) run :mod:`lightning_paged.commands.cli`;
``report``, ``export``, ``generate`` and ``plan`` are the commands of :mod:`lightning_paged.commands.report`,
:mod:`lightning_paged.commands.export`, :mod:`lightning_paged.commands.generate` and
:mod:`lightning_paged.commands.plan`. ``python -m lightning_paged`` is the same command.
"""

from __future__ import annotations

import sys

from lightning_paged.commands.errors import TRACEBACK_FLAG, run_command

EXTRA_COMMANDS = {
    "plan": "predict a config's peak GPU memory and longest sequence before the run (lightning-paged plan --config FILE)",
    "report": "plot an eviction event log and print its summary (lightning-paged report LOG --out FILE.png)",
    "export": "write a PEFT adapter directory or a merged model from a run (lightning-paged export RUN --out DIR)",
    "generate": "answer a file of prompts with a run's model and adapter, as JSON Lines "
    "(lightning-paged generate RUN --prompts FILE --out FILE.jsonl)",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lightning-paged`` and ``python -m lightning_paged``.

    A bad input is one line on stderr and exit code 2 (see :mod:`lightning_paged.commands.errors`);
    ``--traceback`` shows its full trace.
    """
    from_console = argv is None
    return run_command(
        lambda args: _dispatch(args, from_console), list(sys.argv[1:] if argv is None else argv)
    )


def _dispatch(argv: list[str], from_console: bool) -> int:
    if argv and argv[0] == "report":
        from lightning_paged.commands import report

        return report.main(argv[1:])
    if argv and argv[0] == "plan":
        from lightning_paged.commands import plan

        return plan.main(argv[1:])
    if argv and argv[0] == "export":
        from lightning_paged.commands import export

        return export.main(argv[1:])
    if argv and argv[0] == "generate":
        from lightning_paged.commands import generate

        return generate.main(argv[1:])
    from lightning_paged.commands.cli import DESCRIPTION, PREDICT_LEFT_OUT, cli_main
    from lightning_paged.core.errors import UsageError

    if argv and argv[0] == "predict":
        raise UsageError(PREDICT_LEFT_OUT)

    description = (
        DESCRIPTION
        + " Other commands: "
        + "; ".join(f"{k}: {v}" for k, v in EXTRA_COMMANDS.items())
        + f". A bad input is one line and exit code 2; add {TRACEBACK_FLAG} for the full trace."
    )
    if from_console:  # LightningCLI reads sys.argv itself (and warns when handed it as args)
        sys.argv = [sys.argv[0], *argv]
    cli_main(None if from_console else argv, description=description)
    return 0


if __name__ == "__main__":
    sys.exit(main())
