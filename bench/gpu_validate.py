"""One prepared validation on a CUDA GPU: parts (a) to (g), each in its own process and time budget.

    bash bench/gpu_validate.sh                 # on the GPU machine: carried wheels, then every part
    python bench/gpu_validate.py --plan        # the parts and their budgets (any machine)
    python bench/gpu_validate.py --parts b,c   # some parts only
    python bench/gpu_validate.py --dry-run --out-dir /tmp/v   # the part runner on a CPU, demo parts

Parts (see ``docs/gpu-validation.md``):

a. the ``requires_cuda`` tests;
b. paged and non-paged optimizers give identical weights after 3 steps (4 name pairs, 4 shapes,
   pooled and unpooled paging);
c. the eviction scenario: after a first step, a ballast leaves little free memory, then a ramp of
   sequence lengths, with the CUPTI and pressure sources recording side by side;
d. ``is_paged`` and paging coverage after a resume from a checkpoint;
e. the monitor's overhead (``bench/monitor_overhead.py``);
f. tokens/s and peak device memory against transformers' Trainer, 512 to 4096 tokens
   (``bench/gpu_tokens.py``'s throughput part, one round);
g. the longest trainable sequence under a ballast, paged against non-paged
   (``bench/gpu_tokens.py``'s budget part, coarse steps).

Each part runs as ``gpu_validate.py --part-worker KEY`` in a fresh process group, killed when it
passes its budget: a part that fails, crashes (bitsandbytes' CUDA error check calls ``exit(1)``)
or runs out of time is recorded with the reason and the next one runs. Raw results go to
``bench/results/gpu/`` (``<key>.json``, ``<key>.log``, files a part writes), the summary to
``summary.json`` and ``summary.md`` there, rewritten after every part. Without a CUDA GPU the script
says so and exits with status 2, unless ``--dry-run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))

SCRIPT = Path(__file__).resolve()
OUT_DIR = BENCH / "results" / "gpu"
EXIT_NO_GPU = 2
GIB = 2**30


@dataclass(frozen=True)
class Part:
    key: str
    title: str
    budget_s: float
    run: Callable[[Path], dict[str, Any]]
    """Returns the part's result; ``status`` is ``passed`` or ``failed`` (its checks), raising means failed."""


PARTS: dict[str, Part] = {}
DRY_PARTS: dict[str, Part] = {}


def part(key: str, title: str, budget_s: float, registry: dict[str, Part] = PARTS) -> Callable:
    def register(fn: Callable[[Path], dict[str, Any]]) -> Callable[[Path], dict[str, Any]]:
        registry[key] = Part(key, title, budget_s, fn)
        return fn

    return register


# --- the runner (no GPU needed) -----------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_part(p: Part, out_dir: Path, registry: str, budget_scale: float = 1.0) -> dict[str, Any]:
    """Run one part in a fresh process group within its budget; what happened, never raising."""
    log, result_file = out_dir / f"{p.key}.log", out_dir / f"{p.key}.json"
    result_file.unlink(missing_ok=True)
    budget = p.budget_s * budget_scale
    command = [
        sys.executable,
        str(SCRIPT),
        "--part-worker",
        p.key,
        "--registry",
        registry,
        "--out-dir",
        str(out_dir),
    ]
    started = time.monotonic()
    with log.open("w") as sink:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _kill_group(proc)  # its own workers too
            returncode = None
    elapsed = round(time.monotonic() - started, 1)
    record: dict[str, Any] = {"part": p.key, "title": p.title, "budget_s": budget, "elapsed_s": elapsed}
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


def run_parts(
    parts: list[Part], out_dir: Path, registry: str, budget_scale: float = 1.0
) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for p in parts:
        print(f"[{p.key}] {p.title} (budget {p.budget_s * budget_scale:.0f} s) ...", flush=True)
        record = run_part(p, out_dir, registry, budget_scale)
        records.append(record)
        print(
            f"[{p.key}] {record['status']} in {record['elapsed_s']} s: {record.get('headline', '')}",
            flush=True,
        )
        write_summary(records, out_dir)
    return records


def write_summary(records: list[dict[str, Any]], out_dir: Path) -> str:
    from common import markdown_table  # imports lightning_paged: only the runner pays for it, not each part

    rows = [
        [
            r["part"],
            r["title"],
            r["status"],
            f"{r['elapsed_s']:.0f} / {r['budget_s']:.0f}",
            r.get("headline", ""),
        ]
        for r in records
    ]
    text = markdown_table(["part", "what", "status", "s / budget", "result"], rows)
    (out_dir / "summary.json").write_text(json.dumps({"parts": records}, indent=2) + "\n")
    (out_dir / "summary.md").write_text(text + "\n")
    return text


def worker(key: str, registry: str, out_dir: Path) -> int:
    """Run one part in this process and write ``<key>.json``."""
    p = (DRY_PARTS if registry == "dry" else PARTS)[key]
    started = time.monotonic()
    try:
        result = p.run(out_dir)
        result.setdefault("status", "passed")
    except Exception:
        result = {"status": "failed", "error": traceback.format_exc()}
    result["elapsed_s"] = round(time.monotonic() - started, 2)
    path = out_dir / f"{key}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    return 0 if result["status"] == "passed" else 1


def progress(out_dir: Path, key: str, entry: dict[str, Any]) -> None:
    """Append one line to ``<key>.progress.jsonl``: what a part finished survives its budget running out."""
    with (out_dir / f"{key}.progress.jsonl").open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")


# --- demo parts for --dry-run (CPU) -------------------------------------------------------------------


@part("ok", "a part that passes", 20, DRY_PARTS)
def _dry_ok(out: Path) -> dict[str, Any]:
    return {"status": "passed", "headline": "2 + 2 = 4", "value": 2 + 2}


@part("fails", "a part whose code raises", 20, DRY_PARTS)
def _dry_fails(out: Path) -> dict[str, Any]:
    raise RuntimeError("this part fails on purpose")


@part("crashes", "a part whose process exits like bitsandbytes' CUDA error check", 20, DRY_PARTS)
def _dry_crashes(out: Path) -> dict[str, Any]:
    print("Error invalid configuration argument at line 456 in file ops.cu", flush=True)
    os._exit(1)


@part("slow", "a part over its budget", 5, DRY_PARTS)
def _dry_slow(out: Path) -> dict[str, Any]:
    progress(out, "slow", {"done": "first half"})
    time.sleep(60)
    return {"status": "passed"}


# --- the environment ----------------------------------------------------------------------------------


def _requirement_of(package: str, dependency: str) -> str | None:
    from importlib import metadata

    try:
        requires = metadata.requires(package) or []
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        name = line.split(";")[0].strip()
        if name.lower().replace("_", "-").startswith(dependency) and "extra ==" not in line:
            return name
    return None


def packaging_check() -> dict[str, Any]:
    """Versions that must agree: torch's CUDA, the CUPTI runtime it brought, and cupti-python's requirement.

    torch 2.11 pins ``nvidia-cuda-cupti==13.0.85.*`` (through ``cuda-toolkit[cupti]==13.0.2``);
    cupti-python 13.4.0 requires ``nvidia-cuda-cupti~=13.4``, 13.0.1 requires ``~=13.0``. Two
    libcupti versions in one process collide, so the cupti-python to carry is the one whose
    requirement the installed runtime meets.
    """
    from common import versions

    found = versions(
        ("torch", "bitsandbytes", "cupti-python", "nvidia-cuda-cupti", "cuda-bindings", "nvidia-ml-py")
    )
    requirement = _requirement_of("cupti-python", "nvidia-cuda-cupti")
    out: dict[str, Any] = {"versions": found, "cupti_python_requires": requirement}
    out.update(cupti_agreement(found.get("nvidia-cuda-cupti"), requirement, found.get("cupti-python")))
    return out


def cupti_agreement(runtime: str | None, requirement: str | None, cupti_python: str | None) -> dict[str, Any]:
    """Whether the installed CUPTI runtime meets cupti-python's requirement, and what to carry if not."""
    if not runtime or not requirement:
        return {"agree": None, "note": "cupti-python or nvidia-cuda-cupti is not installed"}
    from packaging.requirements import Requirement

    if Requirement(requirement).specifier.contains(runtime, prereleases=True):
        return {"agree": True}
    major, minor = runtime.split(".")[:2]
    return {
        "agree": False,
        "advice": f"cupti-python {cupti_python} needs {requirement}, but this torch brought nvidia-cuda-cupti "
        f"{runtime}: carry the cupti-python {major}.{minor} release instead (cupti-python=={major}.{minor}.*)",
    }


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"packaging": packaging_check(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name}, {props.total_memory / GIB:.0f} GiB, sm_{props.major}{props.minor}"
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        env["nvidia_smi"] = f"not available: {err}"
    return env


def no_gpu_message() -> str | None:
    from gpu_tokens import no_gpu_message as needs_gpu

    return needs_gpu(
        "gpu_validate.py",
        "nothing was run. `--plan` lists the parts; `--dry-run` runs the part runner with demo parts.",
    )


# --- the GPU parts ------------------------------------------------------------------------------------


@part("a", "requires_cuda tests", 60)
def part_tests(out: Path) -> dict[str, Any]:
    files = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "tests").rglob("test_*.py")
        if "requires_cuda" in p.read_text()
    )
    command = [sys.executable, "-m", "pytest", "-m", "requires_cuda", "-q", "-p", "no:cacheprovider", "-rA"]
    command += [f"--junitxml={out / 'a_tests.xml'}", *files]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    (out / "a_tests.log").write_text(done.stdout + done.stderr)
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


@part("b", "paged = non-paged weights after 3 steps", 40)
def part_parity(out: Path) -> dict[str, Any]:
    import torch
    from torch import nn

    from lightning_paged.core.optimizers import build_optimizer
    from lightning_paged.core.paging import STATE_BUFFERS, PagingPolicy

    rows = []
    for paged_name, plain_name in OPTIMIZER_PAIRS:
        for shape in SHAPES:
            for pooled in (True, False):
                gen = torch.Generator().manual_seed(len(rows))
                init = torch.randn(shape, generator=gen)
                grads = [torch.randn(shape, generator=gen) for _ in range(3)]
                paged, plain = (nn.Parameter(init.clone().cuda()) for _ in range(2))
                policy = PagingPolicy(page_small=True, pooled=pooled)
                opt_paged = build_optimizer(paged_name, [paged], paging=policy, lr=1e-3)
                opt_plain = build_optimizer(plain_name, [plain], lr=1e-3)
                for grad in grads:
                    for p, opt in ((paged, opt_paged), (plain, opt_plain)):
                        p.grad = grad.cuda()
                        opt.step()
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
                progress(out, "b", rows[-1])
    bad = [r for r in rows if not (r["identical"] and r["state_paged"])]
    return {
        "status": "passed" if not bad else "failed",
        "headline": f"{len(rows) - len(bad)} of {len(rows)} identical with paged state",
        "rows": rows,
    }


def _calibrated_ballast(free: int, need_long: int, need_short: int, state: int) -> tuple[int | None, str]:
    """Free memory to leave: long steps need half the paged state more than that, short ones fit."""
    from common import fmt_bytes

    target = need_long - state // 2
    if need_short + state // 4 >= target:
        return None, (
            f"cannot separate short from long steps: short steps need {fmt_bytes(need_short)}, long "
            f"{fmt_bytes(need_long)}, paged state {fmt_bytes(state)}"
        )
    if target >= free:
        return None, f"the long step's {fmt_bytes(need_long)} already exceeds the {fmt_bytes(free)} free"
    return target, ""


@part("c", "eviction scenario: CUPTI and pressure side by side", 75)
def part_eviction(out: Path) -> dict[str, Any]:
    from lightning_paged.core.eviction.sources.cupti_setup import configure_counters, cupti_unavailable_reason

    early = configure_counters(0)  # before the first CUDA call of this process, as NVIDIA's sample does
    import torch
    from common import fmt_bytes
    from gpu_tokens import MODEL, ballast_bytes
    from workloads import build_model

    from lightning_paged.core.eviction.paged import PagedBytes
    from lightning_paged.core.eviction.recorder import EvictionRecorder
    from lightning_paged.core.eviction.sources import CuptiSource, PressureSource, SourceUnavailable
    from lightning_paged.core.optimizers import build_optimizer, param_groups
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

    device = torch.device("cuda", 0)
    workload = replace(MODEL, num_layers=12, gradient_checkpointing=False)
    model = build_model(workload)
    config = QLoRAConfig(
        compute_dtype="bfloat16", lora_r=64, lora_alpha=128, lora_dropout=0.0, gradient_checkpointing=False
    )
    convert_to_qlora(model, config, device=device)
    model.to(device).train()
    optimizer = build_optimizer("paged_adamw_32bit", param_groups(model.named_parameters(), 0.0), lr=1e-4)
    vocab = workload.vocab_size

    def train_step(length: int) -> None:
        ids = torch.randint(0, vocab, (1, length), device=device)
        model(input_ids=ids, labels=ids).loss.backward()

    def measure(length: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(length)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    short, long = 512, 4096
    measure(256)  # the first step creates the (paged) optimizer state
    need_short, need_long = measure(short), measure(long)
    state = PagedBytes(0)()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    target, problem = _calibrated_ballast(free, need_long, need_short, state)
    result: dict[str, Any] = {
        "configured_before_cuda": early,
        "need_short_bytes": need_short,
        "need_long_bytes": need_long,
        "paged_state_bytes": state,
        "free_before_ballast": free,
    }
    if target is None:
        return {**result, "status": "failed", "headline": problem}
    ballast = torch.empty(ballast_bytes(free, target), dtype=torch.uint8, device=device)
    result.update(ballast_bytes=ballast.numel(), free_after_ballast=torch.cuda.mem_get_info()[0])

    recorders: dict[str, EvictionRecorder] = {}
    try:
        cupti = CuptiSource(device_index=0)
        cupti.start()
        recorders["cupti"] = EvictionRecorder(cupti, out / "c_cupti.jsonl", paged_bytes=PagedBytes(0))
    except SourceUnavailable as err:
        result["cupti_unavailable"] = str(err) or cupti_unavailable_reason()
    pressure = PressureSource(device_index=0)
    pressure.start()
    recorders["pressure"] = EvictionRecorder(pressure, out / "c_pressure.jsonl", paged_bytes=PagedBytes(0))

    ramp = [short, short, 1024, 2048, long, long, 2048, short, short, long, short, short]
    steps = []
    for length in ramp:
        for r in recorders.values():
            r.begin_step(seq_len=length)
        try:
            train_step(length)
            for r in recorders.values():
                r.begin_optimizer_step()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        except torch.cuda.OutOfMemoryError as err:
            steps.append({"seq_len": length, "error": "out of memory: " + str(err).splitlines()[0]})
            optimizer.zero_grad(set_to_none=True)
            break
        row: dict[str, Any] = {"seq_len": length}
        for name, r in recorders.items():
            rec = r.end_step()
            row[name] = {
                "evicted_bytes": rec.evicted_bytes,
                "paged_in_bytes": rec.paged_in_bytes,
                "gpu_page_faults": rec.gpu_page_faults,
                "optimizer_step_s": rec.optimizer_step_s,
                "step_s": rec.step_s,
                "device_free_bytes": rec.device_free_bytes,
            }
        steps.append(row)
        progress(out, "c", row)
    for r in recorders.values():
        r.close()
    del ballast
    exact = "cupti" if "cupti" in recorders else "pressure"
    done = [s for s in steps if exact in s]
    long_evict = [bool(s[exact]["evicted_bytes"]) for s in done if s["seq_len"] == long]
    short_quiet = [not s[exact]["evicted_bytes"] for s in done if s["seq_len"] == short]
    ok = len(done) == len(ramp) and all(long_evict) and all(short_quiet)
    evicted = sum(s[exact]["evicted_bytes"] or 0 for s in done)
    return {
        **result,
        "status": "passed" if ok else "failed",
        "headline": f"{exact}: long steps evict {sum(long_evict)}/{len(long_evict)}, short quiet "
        f"{sum(short_quiet)}/{len(short_quiet)}, {fmt_bytes(evicted)} evicted in all",
        "steps": steps,
    }


@part("d", "is_paged and coverage after a resume", 45)
def part_resume(out: Path) -> dict[str, Any]:
    import lightning.pytorch as pl
    from gpu_tokens import QUICK_MODEL
    from lightning.pytorch.callbacks import ModelCheckpoint
    from workloads import make_batches, run_lightning_paged

    from lightning_paged.core.paging import NOT_REPAGED, STATE_BUFFERS, paging_coverage

    workload = replace(QUICK_MODEL, optimizer="paged_adamw_8bit", steps=4, seq_len=128, lora_r=16)
    seen: dict[str, Any] = {}

    class Probe(pl.Callback):
        def __init__(self, when: str) -> None:
            self.when = when

        def _look(self, trainer: Any, label: str) -> None:
            optimizer = trainer.optimizers[0]
            coverage = paging_coverage(optimizer)
            buffers = [s[k] for s in optimizer.state.values() for k in STATE_BUFFERS if k in s]
            seen[label] = {
                "paged_fraction": coverage.paged_fraction,
                "paged_bytes": coverage.paged_bytes,
                "unpaged_bytes": coverage.unpaged_bytes,
                "all_is_paged": bool(buffers) and all(getattr(t, "is_paged", False) for t in buffers),
            }

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.when == "resumed" and "resumed_before_step" not in seen:
                self._look(trainer, "resumed_before_step")  # after the mixin re-paged the loaded state

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            self._look(trainer, f"{self.when}_after_step")

    batches = make_batches(workload)
    directory = out / "d_checkpoints"
    checkpoint = ModelCheckpoint(dirpath=str(directory), save_last=True, every_n_train_steps=1)
    run_lightning_paged(workload, callbacks=[checkpoint, Probe("fresh")], batches=batches[:2])
    run_lightning_paged(
        workload, callbacks=[Probe("resumed")], batches=batches, ckpt_path=str(directory / "last.ckpt")
    )
    fresh, before, after = (
        seen.get(k, {}) for k in ("fresh_after_step", "resumed_before_step", "resumed_after_step")
    )
    ok = all(s.get("all_is_paged") for s in (fresh, before, after)) and not any(
        NOT_REPAGED in s.get("unpaged_bytes", {}) for s in (before, after)
    )
    ok = ok and abs(before.get("paged_fraction", -1) - fresh.get("paged_fraction", -2)) < 1e-9
    return {
        "status": "passed" if ok else "failed",
        "headline": f"paged fraction fresh {fresh.get('paged_fraction', 0):.3f}, after resume "
        f"{before.get('paged_fraction', 0):.3f}",
        "coverage": seen,
    }


@part("e", "monitor overhead", 40)
def part_overhead(out: Path) -> dict[str, Any]:
    import monitor_overhead

    path = out / "e_monitor_overhead.json"
    monitor_overhead.main(["--out", str(path)])
    report = json.loads(path.read_text())
    variants = report["variants"]
    cells = ", ".join(f"{k} {v['recorder_cost_pct_of_step']}%" for k, v in variants.items())
    return {
        "status": "passed" if {"pressure"} <= variants.keys() else "failed",
        "headline": f"recorder cost per step: {cells} of a {report['baseline_median_step_ms']} ms step",
        "report": report,
    }


def _logging_worker(out: Path, key: str) -> Callable:
    import common
    import gpu_tokens

    def run(script: Path, args: list[str], threads: int, timeout: float = 600) -> dict[str, Any]:
        result = common.run_worker(script, args, threads, timeout)
        workload = json.loads(args[args.index("--workload") + 1]) if "--workload" in args else {}
        progress(out, key, {"worker": args[0], "seq_len": workload.get("seq_len"), "result": result})
        return result

    gpu_tokens.run_worker = run  # type: ignore[assignment]  # every finished run is kept if time runs out
    return run


@part("f", "tokens/s and peak device memory vs Trainer", 150)
def part_throughput(out: Path) -> dict[str, Any]:
    import tempfile

    import gpu_tokens

    _logging_worker(out, "f")
    model = replace(gpu_tokens.MODEL, steps=6)
    args = argparse.Namespace(threads=4, rounds=1)
    with tempfile.TemporaryDirectory(prefix="gpu-validate-") as tmp:
        source = Path(tmp) / "model"
        gpu_tokens.save_source(model, source)
        rows, raw = gpu_tokens.run_throughput(args, model, [512, 1024, 2048, 4096], source)
    ok = all(r["tokens_per_s_ratio"] and r["memory_ratio"] for r in rows)
    cells = ", ".join(
        f"{r['seq_len']}: {r['tokens_per_s_ratio'] or 0:.2f}x tok/s, {r['memory_ratio'] or 0:.2f}x mem"
        for r in rows
    )
    return {"status": "passed" if ok else "failed", "headline": cells, "rows": rows, "runs": raw}


@part("g", "longest sequence under a ballast, paged vs not", 110)
def part_budget(out: Path) -> dict[str, Any]:
    import gpu_tokens

    _logging_worker(out, "g")
    model = replace(gpu_tokens.MODEL, num_layers=8, lora_r=64)
    args = argparse.Namespace(threads=4, budget_gib=2.0, seq_step=2048, max_seq=16384, budget_steps=3)
    report = gpu_tokens.run_budget(args, model)
    longest = {k: v["longest_seq_len"] for k, v in report["optimizers"].items()}
    cost = "n/a" if report["paging_cost"] is None else f"{100 * report['paging_cost']:.1f}%"
    return {
        "status": "passed" if all(longest.values()) else "failed",
        "headline": f"longest: {longest}, paging buys {report['extra_tokens']} tokens, costs {cost} tok/s",
        "report": report,
    }


# --- command line -------------------------------------------------------------------------------------


def select(registry: dict[str, Part], spec: str | None) -> list[Part]:
    if not spec:
        return list(registry.values())
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in registry]
    if unknown:
        raise SystemExit(f"--parts: no part {', '.join(unknown)}; parts are {', '.join(registry)}")
    return [registry[k] for k in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", help="comma-separated part keys (default: all, a to g)")
    parser.add_argument(
        "--out-dir", type=Path, default=OUT_DIR, help="raw results (default bench/results/gpu)"
    )
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    parser.add_argument("--plan", action="store_true", help="list the parts and their budgets, and exit")
    parser.add_argument("--dry-run", action="store_true", help="run the part runner with demo parts (no GPU)")
    parser.add_argument("--part-worker", help=argparse.SUPPRESS)
    parser.add_argument("--registry", default="gpu", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part_worker:
        return worker(args.part_worker, args.registry, args.out_dir)
    registry = DRY_PARTS if args.dry_run else PARTS
    parts = select(registry, args.parts)
    if args.plan:
        for p in parts:
            print(f"{p.key}  {p.budget_s * args.budget_scale:5.0f} s  {p.title}")
        print(f"total {sum(p.budget_s for p in parts) * args.budget_scale:.0f} s at most")
        return 0
    if not args.dry_run:
        problem = no_gpu_message()
        if problem:
            print(problem, file=sys.stderr)
            return EXIT_NO_GPU
        args.out_dir.mkdir(parents=True, exist_ok=True)
        env = environment()
        (args.out_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
        print(json.dumps(env, indent=2))
    records = run_parts(parts, args.out_dir, "dry" if args.dry_run else "gpu", args.budget_scale)
    print("\n" + write_summary(records, args.out_dir))
    print(f"\nraw results: {args.out_dir}")
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
