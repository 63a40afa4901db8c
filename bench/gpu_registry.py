"""The parts of the GPU validation: how a part is declared, what it is handed, and how parts are chosen.

A part is one function that takes a :class:`Context` and returns its result as a dict (``status``
``passed`` or ``failed``, a one-line ``headline``, and whatever figures it measured). It is declared
where it lives with the :func:`part` decorator::

    @part("m", "what it checks, in a few words", budget_s=40)
    def part_m(ctx: Context) -> dict[str, Any]:
        ...                                   # on a CUDA GPU, or its CPU path when ctx.dry_run
        ctx.progress({"step": 1, ...})        # kept even if the part runs out of time
        return {"status": "passed", "headline": "..."}

and its module is named in ``gpu_validate.PART_MODULES`` (or given with ``--part-module`` to try it
first). Keys are lower-case letters run in order: call 1 is ``a-e`` (correctness and paging), call
2 ``f-z`` (speed, memory, the newer CUDA paths), so a part keyed after the last one joins call 2.
Heavy imports (torch, transformers) go inside the part function: the runner imports every part
module and stays light. A part writes its files flat in ``ctx.out``, each named by
:meth:`Context.path` (``<key>_<what>``); folders it makes there (checkpoints) are not brought back.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEY = re.compile(r"^[a-z][a-z0-9_]*$")
DRY_BUDGET_S = 300.0
"""Budget of a part's CPU path (``--dry-run``): generous, it runs on shared CI cores."""


@dataclass
class Context:
    """What a part is handed: where to write, whether this is the CPU dry run, a shared scratch folder."""

    key: str
    out: Path
    """The run's raw-results folder; write files named by :meth:`path`."""
    dry_run: bool
    """True: run the CPU path (tiny sizes, CUDA-only calls left out, seams in their place)."""
    scratch: Path
    """A folder shared by the parts of one run (saved model directories), deleted when the run ends."""
    ends_at: float | None = None
    """Wall-clock time (``time.time()``) when the runner stops this part; None: no limit."""

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def threads(self) -> int:
        """CPU threads for the measured runs a part starts: one in a dry run (shared CI cores), else four."""
        return 1 if self.dry_run else 4

    def path(self, what: str) -> Path:
        """``<out>/<key>_<what>``: the name that brings a part's file home in the archive."""
        return self.out / f"{self.key}_{what}"

    def progress(self, entry: dict[str, Any]) -> None:
        """Append one line to ``<key>.progress.jsonl``: what a part finished survives its budget running out."""
        with (self.out / f"{self.key}.progress.jsonl").open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")

    def seconds_left(self) -> float:
        return float("inf") if self.ends_at is None else self.ends_at - time.time()


@dataclass(frozen=True)
class Part:
    key: str
    title: str
    budget_s: float
    """Seconds the part may take on the GPU machine before it is stopped."""
    run: Callable[[Context], dict[str, Any]] = field(compare=False)
    dry_budget_s: float = DRY_BUDGET_S
    """Seconds its CPU path may take (``--dry-run``)."""


PARTS: dict[str, Part] = {}
"""Every registered part by key; filled as the part modules are imported."""


def part(key: str, title: str, budget_s: float, dry_budget_s: float = DRY_BUDGET_S) -> Callable:
    """Register the decorated function as the part ``key`` (see the module docstring)."""
    if not KEY.match(key):
        raise ValueError(f"part key {key!r}: use lower-case letters (a part's files are named after it)")

    def register(fn: Callable[[Context], dict[str, Any]]) -> Callable[[Context], dict[str, Any]]:
        known = PARTS.get(key)
        if known is not None and known.run.__qualname__ != fn.__qualname__:
            raise ValueError(f"part key {key!r} is taken by {known.title!r}; choose the next free letter")
        PARTS[key] = Part(key, title, budget_s, fn, dry_budget_s)
        return fn

    return register


def select(spec: str | None, registry: dict[str, Part]) -> list[Part]:
    """The parts ``spec`` names, in key order: ``a-e``, ``f-z``, ``b,d``, ``a-c,e``; all when empty.

    A range takes every registered one-letter key from its first to its last letter (``f-z`` is
    every part from f on, whatever has been added). Raises ``ValueError`` naming what matched nothing.
    """
    ordered = sorted(registry)
    if not spec or not spec.strip():
        return [registry[k] for k in ordered]
    chosen: set[str] = set()
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        start, dash, end = token.partition("-")
        if dash:
            if not (start and end) or start > end:
                raise ValueError(f"{token!r} is not a range like a-e")
            keys = [k for k in ordered if len(k) == 1 and start <= k <= end]
            if not keys:
                raise ValueError(f"{token!r} selects no part; parts are {', '.join(ordered)}")
            chosen.update(keys)
        elif token in registry:
            chosen.add(token)
        else:
            raise ValueError(f"no part {token!r}; parts are {', '.join(ordered)}")
    return [registry[k] for k in ordered if k in chosen]


def label(spec: str | None) -> str:
    """A file-name-safe name for a selection, as it was written: ``a-e``, ``f-z``, ``b_d``; ``all`` when empty."""
    name = "_".join(t.strip() for t in (spec or "").split(",") if t.strip())
    return re.sub(r"[^a-z0-9_-]", "", name.lower()) or "all"


def part_files(out: Path, key: str) -> list[Path]:
    """The files a part left in ``out``: ``<key>.*`` (result, log, progress) and ``<key>_*`` (its own)."""
    if not out.is_dir():
        return []
    return sorted(
        p
        for p in out.iterdir()
        if p.is_file() and (p.name.startswith(f"{key}.") or p.name.startswith(f"{key}_"))
    )


def shared_model(ctx: Context, name: str, config: Any, seed: int = 0) -> Path:
    """A Llama built from ``config`` (seeded, on the part's device) and saved in bfloat16 under ``ctx.scratch``.

    Built once per run and reused by every part asking for the same ``name``; the directory appears
    whole or not at all (written beside it, then renamed). Nothing is downloaded.
    """
    directory = ctx.scratch / name
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(ctx.device):  # random initialisation on the GPU takes milliseconds, not seconds
        model = LlamaForCausalLM(config)
    staging = ctx.scratch / f".{name}.partial"
    model.to(torch.bfloat16).save_pretrained(str(staging))
    del model
    staging.rename(directory)
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return directory
