"""``lightning-paged report LOG --out FILE``: plot an eviction event log and print its summary.

The plot and its formats are :mod:`lightning_paged.core.plot`'s. The output appears complete or
not at all: it is written to a temporary file in the same directory and renamed over the target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_paged.commands.errors import run_command
from lightning_paged.core.plot import PLOT_SUFFIXES, report

PROG = "lightning-paged report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Plot an EvictionMonitor event log (sequence length, evicted bytes, step time) "
        "and print its summary.",
    )
    parser.add_argument("log", help="JSONL event log written by the EvictionMonitor")
    parser.add_argument(
        "--out", help=f"write the plot here; the suffix picks the format ({', '.join(PLOT_SUFFIXES)})"
    )
    parser.add_argument(
        "--run",
        type=int,
        default=-1,
        help="which run of a log that several runs appended to: 0 the first, -1 the last (default)",
    )
    parser.add_argument("--top", type=int, default=5, help="slowest steps listed in the summary (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the report; returns the process exit code (0 on success, 2 on bad input, told in one line)."""
    return run_command(_report, list(sys.argv[1:] if argv is None else argv), prog=PROG)


def _report(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    report(Path(args.log), Path(args.out) if args.out else None, args.run, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
