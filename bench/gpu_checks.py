"""Call 1 of the GPU validation, the checks that must pass: parts a, b, d and e (c is ``gpu_eviction.py``).

a. the ``requires_cuda`` tests;
b. paged and non-paged optimizers give identical weights after 3 steps (4 name pairs, 4 shapes,
   pooled and unpooled paging), the paged side's state ``is_paged``;
d. ``is_paged`` and paging coverage after a resume, read where the loaded state has been re-paged;
e. the monitor's overhead (``bench/monitor_overhead.py``).

Each part's CPU path (``--dry-run``) runs the same code on the CPU: the tests are collected rather
than run, and paged memory is ``lightning_paged.testing.HostMemory`` (host tensors marked paged,
the seam the CPU tests use) instead of ``cudaMallocManaged``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpu_registry import Context, part

REPO = Path(__file__).resolve().parents[1]


@part("a", "requires_cuda tests", budget_s=60)
def part_tests(ctx: Context) -> dict[str, Any]:
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "requires_cuda" in p.read_text()
    )
    command = [sys.executable, "-m", "pytest", "-m", "requires_cuda", "-q", "-p", "no:cacheprovider", "-rA"]
    if ctx.dry_run:  # without a GPU they would all be skipped: check that they are found and import
        command.append("--collect-only")
    command += [f"--junitxml={ctx.path('tests.xml')}", *files]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    ctx.path("tests.log").write_text(done.stdout + done.stderr)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else done.stderr.strip()[-300:]
    return {"status": "passed" if done.returncode == 0 else "failed", "headline": last, "files": files}


OPTIMIZER_PAIRS = [
    ("paged_adamw_8bit", "adamw_8bit"),
    ("paged_adamw_32bit", "adamw"),
    ("paged_lion_8bit", "lion_8bit"),
    ("paged_ademamix_8bit", "ademamix_8bit"),
]
SHAPES = [(16, 4096), (4096, 16), (512, 512), (4096,)]


@part("b", "paged = non-paged weights after 3 steps", budget_s=30)
def part_parity(ctx: Context) -> dict[str, Any]:
    import torch
    from torch import nn

    from lightning_paged.core.optimizers import build_optimizer
    from lightning_paged.core.paging import STATE_BUFFERS, ManagedMemory, PagingPolicy
    from lightning_paged.testing import HostMemory

    rows = []
    for paged_name, plain_name in OPTIMIZER_PAIRS:
        for shape in SHAPES:
            for pooled in (True, False):
                gen = torch.Generator().manual_seed(len(rows))
                init = torch.randn(shape, generator=gen)
                grads = [torch.randn(shape, generator=gen) for _ in range(3)]
                paged, plain = (nn.Parameter(init.clone().to(ctx.device)) for _ in range(2))
                memory = HostMemory() if ctx.dry_run else ManagedMemory()
                policy = PagingPolicy(page_small=True, pooled=pooled, memory=memory)
                opt_paged = build_optimizer(paged_name, [paged], paging=policy, lr=1e-3)
                opt_plain = build_optimizer(plain_name, [plain], lr=1e-3)
                for grad in grads:
                    for p, opt in ((paged, opt_paged), (plain, opt_plain)):
                        p.grad = grad.to(ctx.device)
                        opt.step()
                if not ctx.dry_run:
                    torch.cuda.synchronize()
                state = opt_paged.state[paged]
                rows.append(
                    {
                        "pair": f"{paged_name}/{plain_name}",
                        "shape": list(shape),
                        "pooled": pooled,
                        "identical": bool(torch.equal(paged, plain)),
                        "max_abs_difference": float((paged - plain).abs().max()),
                        "state_paged": all(
                            getattr(state.get(k), "is_paged", False) for k in STATE_BUFFERS if k in state
                        ),
                    }
                )
                ctx.progress(rows[-1])
    bad = [r for r in rows if not (r["identical"] and r["state_paged"])]
    return {
        "status": "passed" if not bad else "failed",
        "headline": f"{len(rows) - len(bad)} of {len(rows)} identical with paged state",
        "rows": rows,
    }


def _state_view(trainer: Any) -> dict[str, Any]:
    from lightning_paged.core.paging import STATE_BUFFERS, paging_coverage

    optimizer = trainer.optimizers[0]
    coverage = paging_coverage(optimizer)
    buffers = [s[k] for s in optimizer.state.values() for k in STATE_BUFFERS if k in s]
    return {
        "paged_fraction": coverage.paged_fraction,
        "paged_bytes": coverage.paged_bytes,
        "unpaged_bytes": coverage.unpaged_bytes,
        "all_is_paged": bool(buffers) and all(getattr(t, "is_paged", False) for t in buffers),
        "state_tensors": len(buffers),
    }


def resume_probe(seen: dict[str, Any], when: str) -> Any:
    """A callback that reads the optimizer state at the points where re-paging has happened.

    Lightning runs a batch's hooks callbacks first, then the module (``loops/training_epoch_loop.py``
    calls ``_call_callback_hooks(trainer, "on_train_batch_start", ...)`` before
    ``_call_lightning_module_hook(trainer, "on_train_batch_start", ...)``), and the module hook is
    where ``PagedOptimizerMixin`` re-pages the loaded state: a callback's ``on_train_batch_start``
    still sees the ordinary tensors the checkpoint load made. ``on_before_optimizer_step`` runs
    after it, inside the first resumed optimizer step and before the update (the precision plugin's
    ``_after_closure``, called from ``optimizer.step(closure)``, which ``loops/optimization/
    automatic.py`` reaches through the module's ``optimizer_step`` hook). Both are recorded: the
    first shows why the old check could not pass, the second is the check.
    """
    import lightning.pytorch as pl

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if when == "resumed" and "resumed_at_callback_batch_start" not in seen:
                seen["resumed_at_callback_batch_start"] = _state_view(trainer)

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if when == "resumed" and "resumed_before_first_step" not in seen:
                seen["resumed_before_first_step"] = _state_view(trainer)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            seen[f"{when}_after_step"] = _state_view(trainer)

    return Probe()


@part("d", "is_paged and coverage after a resume", budget_s=45)
def part_resume(ctx: Context) -> dict[str, Any]:
    from gpu_tokens import QUICK_MODEL
    from lightning.pytorch.callbacks import ModelCheckpoint
    from workloads import make_batches, run_lightning_paged

    from lightning_paged.core.paging import NOT_REPAGED
    from lightning_paged.testing import HostMemory

    workload = replace(QUICK_MODEL, optimizer="paged_adamw_8bit", steps=4, seq_len=128, lora_r=16)
    if ctx.dry_run:
        workload = replace(workload, device="cpu", compute_dtype="float32", seq_len=32)
    memory = HostMemory() if ctx.dry_run else None  # None: bitsandbytes' cudaMallocManaged
    seen: dict[str, Any] = {}
    batches = make_batches(workload)
    directory = ctx.scratch / "d_checkpoints"  # checkpoints stay out of the results
    checkpoint = ModelCheckpoint(dirpath=str(directory), save_last=True, every_n_train_steps=1)
    run_lightning_paged(
        workload,
        callbacks=[checkpoint, resume_probe(seen, "fresh")],
        batches=batches[:2],
        managed_memory=memory,
    )
    ctx.progress({"fresh_after_step": seen.get("fresh_after_step")})
    run_lightning_paged(
        workload,
        callbacks=[resume_probe(seen, "resumed")],
        batches=batches,
        ckpt_path=str(directory / "last.ckpt"),
        managed_memory=memory,
    )
    fresh, before, after = (
        seen.get(k, {}) for k in ("fresh_after_step", "resumed_before_first_step", "resumed_after_step")
    )
    ok = all(s.get("all_is_paged") for s in (fresh, before, after)) and not any(
        NOT_REPAGED in s.get("unpaged_bytes", {}) for s in (before, after)
    )
    ok = ok and abs(before.get("paged_fraction", -1) - fresh.get("paged_fraction", -2)) < 1e-9
    early = seen.get("resumed_at_callback_batch_start", {})
    return {
        "status": "passed" if ok else "failed",
        "headline": f"paged fraction fresh {fresh.get('paged_fraction', 0):.3f}, resumed before its first step "
        f"{before.get('paged_fraction', 0):.3f}, after {after.get('paged_fraction', 0):.3f} (at a callback's "
        f"on_train_batch_start, before re-paging: {early.get('paged_fraction', 0):.3f})",
        "coverage": seen,
    }


@part("e", "monitor overhead", budget_s=40)
def part_overhead(ctx: Context) -> dict[str, Any]:
    import monitor_overhead

    path = ctx.path("monitor_overhead.json")
    monitor_overhead.main(["--out", str(path), *(["--quick"] if ctx.dry_run else [])])
    report = json.loads(path.read_text())
    variants = report["variants"]
    cells = ", ".join(f"{k} {v['recorder_cost_pct_of_step']}%" for k, v in variants.items())
    expected = {"pressure-fake-probe"} if ctx.dry_run else {"pressure"}
    return {
        "status": "passed" if expected <= variants.keys() else "failed",
        "headline": f"recorder cost per step: {cells} of a {report['baseline_median_step_ms']} ms step",
        "report": report,
    }
