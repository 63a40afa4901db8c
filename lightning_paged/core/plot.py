"""The eviction report: one run of an event log, drawn as three panels over the steps, with its summary.

The panels: sequence length (long-sequence steps marked; for packed batches the row length and
the longest example in it), bytes evicted to host and paged back in, and step time (with the
optimizer's share). The output is ``.png``, ``.svg``, ``.pdf`` or ``.html`` (one self-contained page:
the plot inlined as base64 PNG and the summary), written atomically. matplotlib is an optional
extra, imported only to draw.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_paged.core.atomic import atomic_write
from lightning_paged.core.errors import BadInput
from lightning_paged.core.eviction.log import read_jsonl
from lightning_paged.core.eviction.prediction import comparison_for
from lightning_paged.core.eviction.records import StepRecord
from lightning_paged.core.eviction.summary import summarize

PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".html")
MIB = 1024 * 1024


class ReportError(BadInput):
    """A problem with the user's input, reported as one line and a non-zero exit."""


def plot_available() -> bool:
    """Whether matplotlib (the ``plot`` extra) is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def report(
    log: Path, out: Path | None = None, run: int = -1, top: int = 5, emit: Callable[[str], object] = print
) -> None:
    """Summarize run ``run`` of the event log ``log`` through ``emit`` and, with ``out``, draw it there."""
    records, run_note = load_run(log, run)
    summary = summarize(records, top_k=max(0, top))
    emit(run_note)
    emit(summary.render())
    comparison = comparison_for(log, records)
    if comparison is not None:
        emit(comparison)
    if out is not None:
        write_plot(records, out, title=f"{log.name}: {run_note}", summary_text=summary.render())
        emit(f"wrote {out}")


def load_run(path: Path, run: int = -1) -> tuple[list[StepRecord], str]:
    """The records of one run in ``path`` and a line describing it. Skipped lines are reported on stderr."""
    try:
        content = read_jsonl(path)
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ReportError(f"{path} is a directory; give the .jsonl file") from None
    except ValueError as err:
        raise ReportError(f"{err}; expected a JSONL event log") from None
    records: list[StepRecord] = []
    bad = list(content.bad_lines)
    for number, data in enumerate(content.records, start=1):
        try:
            records.append(StepRecord.from_dict(data))
        except (ValueError, TypeError) as err:
            bad.append((number, str(err)))
    if not records:
        detail = f" (first problem: line {bad[0][0]}: {bad[0][1]})" if bad else " (the file is empty)"
        raise ReportError(f"{path} holds no eviction records{detail}; expected an EvictionMonitor JSONL log")
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        print(f"warning: skipped {len(bad)} line(s) of {path}: {shown}{more}", file=sys.stderr)
    runs: dict[str, list[StepRecord]] = {}
    for record in records:
        runs.setdefault(record.run, []).append(record)
    ids = list(runs)
    if not -len(ids) <= run < len(ids):
        raise ReportError(f"--run {run} is out of range: the log holds {len(ids)} run(s)")
    chosen = ids[run]
    # A resumed run keeps its id and numbers its steps on from its checkpoint; the steps the
    # interrupted run took after that checkpoint are recorded again: the later record of a step wins.
    latest = {record.step: record for record in runs[chosen]}
    steps = [latest[step] for step in sorted(latest)]
    note = f"run {chosen} ({ids.index(chosen) + 1} of {len(ids)}), {len(steps)} steps"
    return steps, note


def write_plot(records: list[StepRecord], out: Path, title: str = "", summary_text: str = "") -> None:
    """Write the three-panel plot (or the HTML page) to ``out``, atomically."""
    suffix = out.suffix.lower()
    if suffix not in PLOT_SUFFIXES:
        raise ReportError(f"--out must end with one of {', '.join(PLOT_SUFFIXES)}; got {out.name!r}")
    if not out.parent.exists():
        raise ReportError(f"the directory of --out does not exist: {out.parent}")
    figure = _figure(records, title)
    if suffix == ".html":
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110)
        payload = _html_page(title, base64.b64encode(png.getvalue()).decode("ascii"), summary_text)
        atomic_write(out, lambda f: f.write(payload.encode("utf-8")))
    else:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=suffix[1:], dpi=110)
        atomic_write(out, lambda f: f.write(buffer.getvalue()))


def _figure(records: list[StepRecord], title: str) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("plotting needs matplotlib: pip install lightning-paged[plot]") from None

    steps = [r.step for r in records]
    figure = Figure(figsize=(10, 8), layout="constrained")
    FigureCanvasAgg(figure)  # Agg, without touching pyplot's global backend
    ax_len, ax_mem, ax_time = figure.subplots(3, 1, sharex=True)

    ax_len.plot(steps, [r.seq_len or 0 for r in records], color="tab:blue", lw=1, label="sequence length")
    if any(r.longest_example is not None and r.longest_example != r.seq_len for r in records):
        # packed (or otherwise padded) batches: the row length above, the longest single example here
        ax_len.plot(
            steps,
            [r.longest_example or 0 for r in records],
            color="tab:green",
            lw=1,
            label="longest example",
        )
    long_steps = [r for r in records if r.long_sequence]
    if long_steps:
        ax_len.scatter(
            [r.step for r in long_steps],
            [r.seq_len or 0 for r in long_steps],
            color="tab:red",
            s=14,
            zorder=3,
            label="long-sequence step",
        )
    ax_len.set_ylabel("sequence length")
    ax_len.legend(loc="upper left", fontsize=8)

    estimated = any(r.estimated for r in records)
    measured = [r for r in records if r.evicted_bytes is not None or r.paged_in_bytes is not None]
    if measured:
        width = 0.4
        ax_mem.bar(
            [r.step - width / 2 for r in measured],
            [(r.evicted_bytes or 0) / MIB for r in measured],
            width=width,
            color="tab:red",
            label="evicted to host",
        )
        ax_mem.bar(
            [r.step + width / 2 for r in measured],
            [(r.paged_in_bytes or 0) / MIB for r in measured],
            width=width,
            color="tab:green",
            label="paged in to GPU",
        )
        ax_mem.legend(loc="upper left", fontsize=8)
    else:
        ax_mem.text(
            0.5,
            0.5,
            f"no eviction figures (source: {records[0].source})",
            ha="center",
            va="center",
            transform=ax_mem.transAxes,
            color="gray",
        )
    ax_mem.set_ylabel("MiB (estimated)" if estimated else "MiB")

    ax_time.plot(steps, [r.step_s for r in records], color="black", lw=1, label="step")
    opt = [r for r in records if r.optimizer_step_s is not None]
    if opt:
        ax_time.plot(
            [r.step for r in opt],
            [r.optimizer_step_s for r in opt],
            color="tab:orange",
            lw=1,
            label="optimizer step",
        )
    ax_time.set_ylabel("seconds")
    ax_time.set_xlabel("step")
    ax_time.legend(loc="upper left", fontsize=8)

    for ax in (ax_len, ax_mem, ax_time):
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def _html_page(title: str, png_base64: str, summary_text: str) -> str:
    t = html.escape(title or "Eviction report")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{t}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
        f"<h1>Eviction report</h1><p>{t}</p>"
        f"<img alt='sequence length, evicted bytes and step time per step' "
        f"src='data:image/png;base64,{png_base64}' style='max-width:100%'>"
        f"<h2>Summary</h2><pre>{html.escape(summary_text)}</pre>"
        "</body></html>\n"
    )
