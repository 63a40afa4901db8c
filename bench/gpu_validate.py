"""One prepared validation on a CUDA GPU, run as two calls that each bring their results home.

    bash bench/gpu_validate.sh --parts a-e --deadline-s 260   # call 1: correctness and paging
    bash bench/gpu_validate.sh --parts f-z --deadline-s 350   # call 2: speed, memory, long sequences, the plan
    python bench/gpu_validate.py --plan --parts f-z            # the parts and budgets (any machine)
    bash bench/gpu_validate.sh --dry-run --parts a-e           # each part's CPU path, no GPU needed

The parts live in the modules of :data:`PART_MODULES` (see ``gpu_registry.py`` for how to add one).
Each runs as ``gpu_validate.py --part-worker KEY`` in a fresh process group, stopped at its budget
or at the call's ``--deadline-s``, whichever comes first: a part that fails, crashes
(bitsandbytes' CUDA error check calls ``exit(1)``) or runs out of time is recorded with the reason,
and the next one runs; a part that would start with too little time left is recorded as skipped.

Raw files go to ``--out-dir`` (default ``bench/results/gpu``; a temporary folder with
``--dry-run``): ``<key>.json``, ``<key>.log``, ``<key>.progress.jsonl`` and the part's own
``<key>_*`` files, with ``summary-<parts>.json`` and ``.md``. When the environment names a folder in
``OUT``, the call also writes there ``summary.json``, ``summary.md`` and ``gpu-validate-<parts>.tgz``
(those raw files, folders such as checkpoints left out), rewritten while parts run, so what a call
finished comes back even if it is stopped; unpack the archive into ``bench/results/gpu/``. Without
a CUDA GPU (and without ``--dry-run``) the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

from gpu_registry import PARTS, Context, Part, label, part_files, select  # noqa: E402

SCRIPT = Path(__file__).resolve()
OUT_DIR = BENCH / "results" / "gpu"
EXIT_NO_GPU = 2
PART_MODULES = ("gpu_checks", "gpu_eviction", "gpu_speed", "gpu_loading", "gpu_packing", "gpu_long")
"""The modules whose ``@part`` functions make up the validation, imported in this order."""
CALLS = {"a-e": 260.0, "f-z": 350.0}
"""The two calls of docs/gpu-validation.md (``--parts``) and their ``--deadline-s``; a test keeps each
call's part budgets inside its deadline, and the two calls inside the device time."""
INSTALL_S = 15.0
"""Seconds a call spends before its first part (installing the carried wheels, recording the machine)."""
TIMEOUT_MARGIN_S = 25.0
"""A call's time limit on the GPU machine is its ``--deadline-s`` plus this (the copy of the tree, the shell)."""
DEVICE_TIME_S, MACHINE_START_S = 900.0, 120.0
"""Device time lent for the validation, and the most its machine takes to start."""
TICK_S = 15.0
"""While a part runs, the summary and the archive are rewritten this often."""
CLOSING_S = 10.0
"""Seconds kept back from ``--deadline-s`` to write the last summary and archive."""
MIN_START_S = 15.0
"""A part is not started with fewer seconds than this left before the deadline."""
ARCHIVE_FILE_LIMIT = 8 * 2**20
"""Files larger than this stay out of the archive (and are listed in the summary)."""
T0_VARIABLE = "GPU_VALIDATE_T0"
"""``date +%s`` when the call began (gpu_validate.sh sets it before installing wheels); the deadline counts from it."""


def load_parts(modules: list[str]) -> dict[str, Part]:
    """Import the part modules (each registers its parts) and return the registry."""
    for name in [*PART_MODULES, *modules]:
        importlib.import_module(name)
    return PARTS


# --- one part in its own process -------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_part(p: Part, args: argparse.Namespace, budget: float, tick: Any = None) -> dict[str, Any]:
    """Run one part in a fresh process group within ``budget`` seconds; what happened, never raising.

    The part's files from an earlier run are removed first. ``tick()`` is called every
    :data:`TICK_S` seconds while it runs.
    """
    out: Path = args.out_dir
    for stale in part_files(out, p.key):
        stale.unlink()
    log, result_file = out / f"{p.key}.log", out / f"{p.key}.json"
    ends_at = time.time() + budget
    command = [sys.executable, str(SCRIPT), "--part-worker", p.key, "--out-dir", str(out)]
    command += ["--scratch-dir", str(args.scratch_dir), "--ends-at", f"{ends_at:.3f}"]
    command += [f"--part-module={m}" for m in args.part_module] + (["--dry-run"] if args.dry_run else [])
    started = time.monotonic()
    returncode: int | None = None
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while True:
                left = budget - (time.monotonic() - started)
                if left <= 0:
                    break
                try:
                    returncode = proc.wait(timeout=min(TICK_S, left))
                    break
                except subprocess.TimeoutExpired:
                    if tick is not None:
                        tick()
        finally:
            if returncode is None:
                _kill_group(proc)  # over its budget, or the runner is being stopped: its own workers too
    elapsed = round(time.monotonic() - started, 1)
    record: dict[str, Any] = {
        "part": p.key,
        "title": p.title,
        "budget_s": round(budget, 1),
        "elapsed_s": elapsed,
    }
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    if returncode is None:
        record.update(
            status="timed_out", error=f"stopped after its {budget:.0f} s budget", log_tail=_tail(log)
        )
    elif result is None:
        record.update(
            status="crashed", error=f"the part's process ended with status {returncode} and no result"
        )
        record["log_tail"] = _tail(log)
    else:
        record.update(status=result.get("status", "failed"), headline=result.get("headline", ""))
        if result.get("error"):
            record["error"] = result["error"]
    if not record.get("headline") and record.get("error"):
        record["headline"] = record["error"].strip().splitlines()[-1][:200]
    return record


def _watchdog(runner: int, ends_at: float | None) -> None:
    """End this part's process group once the runner is gone or the budget is long past.

    A part runs in its own session (so its budget can stop it and its workers together); were the
    runner killed from outside, nothing would be left holding the GPU into the next call.
    """
    while True:
        time.sleep(1.0)
        if os.getppid() != runner or (ends_at is not None and time.time() > ends_at + 30):
            os.killpg(os.getpgrp(), signal.SIGKILL)


def worker(args: argparse.Namespace) -> int:
    """Run one part in this process and write ``<key>.json``."""
    threading.Thread(target=_watchdog, args=(os.getppid(), args.ends_at), daemon=True).start()
    p = load_parts(args.part_module)[args.part_worker]
    ctx = Context(p.key, args.out_dir, args.dry_run, args.scratch_dir, args.ends_at)
    started = time.monotonic()
    try:
        result = p.run(ctx)
        result.setdefault("status", "passed")
    except Exception:
        result = {"status": "failed", "error": traceback.format_exc()}
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    result["dry_run"] = args.dry_run
    path = args.out_dir / f"{p.key}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    return 0 if result["status"] == "passed" else 1


# --- the summary and what comes home --------------------------------------------------------------------


class Report:
    """The summary of one call, written to ``--out-dir`` and, with ``OUT`` set, brought home through it."""

    def __init__(self, args: argparse.Namespace, parts: list[Part], name: str, env: dict[str, Any]) -> None:
        self.args, self.parts, self.name, self.env = args, parts, name, env
        self.records: dict[str, dict[str, Any]] = {
            p.key: {
                "part": p.key,
                "title": p.title,
                "status": "pending",
                "budget_s": p.budget_s,
                "elapsed_s": 0.0,
            }
            for p in parts
        }
        self.started = time.time()
        self.export = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        from common import git_commit

        self.commit = git_commit() or "unknown (no git checkout here)"

    def table(self) -> str:
        from common import markdown_table

        rows = [
            [
                r["part"],
                r["title"],
                r["status"],
                f"{r['elapsed_s']:.0f} / {r['budget_s']:.0f}",
                r.get("headline", ""),
            ]
            for r in self.records.values()
        ]
        return markdown_table(["part", "what", "status", "s / budget", "result"], rows)

    def markdown(self) -> str:
        from gpu_environment import device_line

        deadline = f" (deadline {self.args.deadline_s:.0f} s)" if self.args.deadline_s else ""
        lines = [
            f"# GPU validation, parts {self.name}" + (" (dry run on a CPU)" if self.args.dry_run else ""),
            "",
            device_line(self.env) + ".",
            "",
            f"Commit {self.commit}, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))}, "
            f"{time.time() - self.started:.0f} s{deadline}. Raw files: `{self.archive_name()}`, unpacked into "
            "`bench/results/gpu/`.",
            "",
            self.table(),
        ]
        return "\n".join(lines) + "\n"

    def archive_name(self) -> str:
        return f"gpu-validate-{self.name}.tgz"

    def write(self) -> None:
        out: Path = self.args.out_dir
        left_out = [
            str(p.name)
            for k in self.records
            for p in part_files(out, k)
            if p.stat().st_size > ARCHIVE_FILE_LIMIT
        ]
        summary = {
            "parts_selected": self.name,
            "dry_run": self.args.dry_run,
            "commit": self.commit,
            "command": " ".join(sys.argv),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "elapsed_s": round(time.time() - self.started, 1),
            "deadline_s": self.args.deadline_s,
            "environment": self.env,
            "archive": self.archive_name(),
            "archive_left_out": left_out,
            "parts": list(self.records.values()),
        }
        md = self.markdown()
        _write_atomic(out / f"summary-{self.name}.json", json.dumps(summary, indent=2, default=str) + "\n")
        _write_atomic(out / f"summary-{self.name}.md", md)
        if self.export is None:
            return
        self.export.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.export / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        _write_atomic(self.export / "summary.md", md)
        files = [out / f"summary-{self.name}.json", out / f"summary-{self.name}.md"]
        files += [
            p for k in self.records for p in part_files(out, k) if p.stat().st_size <= ARCHIVE_FILE_LIMIT
        ]
        tmp = self.export / f".{self.archive_name()}.tmp"
        with tarfile.open(tmp, "w:gz") as archive:
            for path in files:
                archive.add(path, arcname=path.name)
        tmp.replace(self.export / self.archive_name())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_parts(parts: list[Part], args: argparse.Namespace, report: Report) -> list[dict[str, Any]]:
    t0 = float(os.environ.get(T0_VARIABLE) or report.started)
    ends = t0 + args.deadline_s if args.deadline_s else None
    report.write()
    for p in parts:
        budget = (p.dry_budget_s if args.dry_run else p.budget_s) * args.budget_scale
        if ends is not None:
            left = ends - CLOSING_S - time.time()
            if left < MIN_START_S:
                report.records[p.key].update(
                    status="skipped",
                    headline=f"not started: {max(left, 0):.0f} s left of --deadline-s {args.deadline_s:.0f}; "
                    f"run it with --parts {p.key}",
                )
                print(f"[{p.key}] skipped: {report.records[p.key]['headline']}", flush=True)
                continue
            budget = min(budget, left)
        print(f"[{p.key}] {p.title} (budget {budget:.0f} s) ...", flush=True)
        report.records[p.key].update(status="running", budget_s=round(budget, 1))

        since = time.monotonic()

        def tick(key: str = p.key, since: float = since) -> None:
            report.records[key]["elapsed_s"] = round(time.monotonic() - since, 1)
            report.write()

        record = run_part(p, args, budget, tick)
        report.records[p.key] = record
        print(
            f"[{p.key}] {record['status']} in {record['elapsed_s']} s: {record.get('headline', '')}",
            flush=True,
        )
        report.write()
    return list(report.records.values())


# --- command line -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", help="parts to run: a-e (call 1), f-z (call 2), b,d ... (default: all)")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="raw results (default bench/results/gpu; a temporary folder with --dry-run)",
    )
    parser.add_argument(
        "--deadline-s", type=float, help="seconds the whole call may take; parts that do not fit are skipped"
    )
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    parser.add_argument("--plan", action="store_true", help="list the parts and their budgets, and exit")
    parser.add_argument("--dry-run", action="store_true", help="run each part's CPU path (no GPU needed)")
    parser.add_argument(
        "--part-module",
        action="append",
        default=[],
        help="also import this module's parts (a new part, before it is listed)",
    )
    parser.add_argument("--part-worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ends-at", type=float, help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse(argv)
    if args.part_worker:
        return worker(args)
    try:
        registry = load_parts(args.part_module)
        parts = select(args.parts, registry)
    except (ValueError, ImportError) as err:
        parser.error(
            f"--parts {args.parts or ''}: {err}" if isinstance(err, ValueError) else f"--part-module: {err}"
        )
    name = label(args.parts)
    if args.plan:
        for p in parts:
            budget = p.dry_budget_s if args.dry_run else p.budget_s
            print(f"{p.key}  {budget * args.budget_scale:5.0f} s  {p.title}")
        print(
            f"total {sum(p.dry_budget_s if args.dry_run else p.budget_s for p in parts) * args.budget_scale:.0f} s at most"
        )
        return 0
    if not args.dry_run:
        from gpu_environment import no_gpu_message

        problem = no_gpu_message()
        if problem:
            print(problem, file=sys.stderr)
            if os.environ.get("OUT"):  # say so where the results would have come back
                export = Path(os.environ["OUT"])
                export.mkdir(parents=True, exist_ok=True)
                (export / "summary.md").write_text(f"# GPU validation, parts {name}\n\n{problem}\n")
                (export / "summary.json").write_text(
                    json.dumps({"parts_selected": name, "error": problem}) + "\n"
                )
            return EXIT_NO_GPU
    from gpu_environment import environment

    own_out = args.out_dir is None and args.dry_run
    args.out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="gpu-validate-dry-")) if args.dry_run else OUT_DIR
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.scratch_dir = Path(tempfile.mkdtemp(prefix="gpu-validate-scratch-"))
    env = environment(args.dry_run)
    report = Report(args, parts, name, env)
    previous = signal.signal(
        signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)
    )  # stop the part, keep the report
    print(f"{report.markdown().splitlines()[2]}\n", flush=True)
    try:
        records = run_parts(parts, args, report)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(args.scratch_dir, ignore_errors=True)
        report.write()
    print("\n" + report.table())
    print(
        f"\nraw results: {args.out_dir}"
        + (f"; summary and archive: {report.export}" if report.export else "")
    )
    if own_out and report.export is not None:
        shutil.rmtree(args.out_dir, ignore_errors=True)  # a dry run's raw files live on in the archive
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
