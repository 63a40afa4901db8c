"""The prepared GPU validation on a CPU: the part runner, the two calls' dry runs and what they bring home.

The two dry runs are the commands docs/gpu-validation.md gives for the GPU machine, with
``--dry-run``: every part's CPU path, with omegaconf, jsonargparse and datasets blocked the way the
GPU image lacks them (in every process of the run), writing under ``OUT`` what the machine would
bring back.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_eviction  # noqa: E402
import gpu_registry  # noqa: E402
import gpu_validate  # noqa: E402
from gpu_environment import cupti_agreement  # noqa: E402

MIB = 2**20
ABSENT_ON_THE_GPU_IMAGE = ("omegaconf", "jsonargparse", "datasets")
BLOCKER = """\
# The GPU image has none of these: make every import of them fail as it would there (find_spec
# answers None, import raises ModuleNotFoundError) and hide their installed metadata.
import importlib.metadata as _metadata
import sys

_ABSENT = {absent!r}
for _name in _ABSENT:
    sys.modules[_name] = None
_from_name = _metadata.Distribution.from_name.__func__


def _hidden(cls, name):
    if name.lower().replace("_", "-") in _ABSENT:
        raise _metadata.PackageNotFoundError(name)
    return _from_name(cls, name)


_metadata.Distribution.from_name = classmethod(_hidden)
"""
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def blocked_env(folder: Path) -> dict[str, str]:
    """An environment whose Python processes cannot import what the GPU image lacks."""
    blocker = folder / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER.format(absent=ABSENT_ON_THE_GPU_IMAGE))
    env = dict(os.environ, PYTHONPATH=str(blocker), PYTHON=sys.executable, OMP_NUM_THREADS="2")
    env.pop("GPU_VALIDATE_T0", None)
    for name in ABSENT_ON_THE_GPU_IMAGE:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True)
        assert done.returncode != 0, f"the blocker let {name} import"
    return env


@pytest.fixture
def image_like_env(tmp_path):
    return blocked_env(tmp_path)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """Both calls' dry runs, started at once (their parts run one thread each; two cores serve both)."""
    root = tmp_path_factory.mktemp("dry_runs")
    env = blocked_env(root)
    runs = {}
    for spec in ("a-e", "f-z"):
        out = root / spec / "OUT"
        runs[spec] = (
            out,
            subprocess.Popen(
                ["bash", str(BENCH / "gpu_validate.sh"), "--dry-run", "--parts", spec],
                env=dict(env, OUT=str(out)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
    yield runs
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def check_brought_home(out: Path) -> list[Path]:
    """What the GPU machine brings back from OUT: at most 8 files of 16 MiB, 2 folders deep, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8
    for path in files:
        rel = path.relative_to(out)
        assert len(rel.parts) <= 3, f"{rel} is more than 2 folders deep"
        assert all(SAFE_NAME.match(part) for part in rel.parts), f"{rel} has a name that would not come back"
        assert path.stat().st_size <= 16 * MIB
    assert sum(p.stat().st_size for p in files) <= 64 * MIB
    return files


@pytest.mark.slow
@pytest.mark.parametrize(("spec", "keys"), [("a-e", "abcde"), ("f-z", "fghijkl")])
def test_each_call_runs_its_dry_run_and_brings_summary_and_archive_home(spec, keys, dry_runs):
    out, process = dry_runs[spec]
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-6000:]
    files = check_brought_home(out)
    archive = out / f"gpu-validate-{spec}.tgz"
    assert {p.name for p in files} == {"summary.json", "summary.md", archive.name}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["parts_selected"] == spec
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [(k, "passed") for k in keys]
    markdown = (out / "summary.md").read_text()
    assert "Device: cpu (dry run" in markdown and f"`{archive.name}`" in markdown
    with tarfile.open(archive) as tgz:
        members = {m.name: m for m in tgz.getmembers()}
        assert all(
            m.isfile() and "/" not in name for name, m in members.items()
        )  # flat: no checkpoints folder
        assert not [n for n in members if n.endswith(".ckpt")]
        assert {f"summary-{spec}.json", f"summary-{spec}.md"} | {f"{k}.json" for k in keys} <= set(members)
        results = {k: json.load(tgz.extractfile(f"{k}.json")) for k in keys}
        plan_table = tgz.extractfile("l_rows.md").read().decode() if "l_rows.md" in members else ""
    assert all(r["dry_run"] for r in results.values())
    if spec == "a-e":
        coverage = results["d"]["coverage"]
        # Lightning calls a callback's on_train_batch_start before the module's, which re-pages the
        # loaded state: looking there sees ordinary tensors; on_before_optimizer_step sees paged ones.
        assert coverage["resumed_at_callback_batch_start"]["all_is_paged"] is False
        assert coverage["resumed_before_first_step"]["all_is_paged"] is True
        assert "c_cupti.jsonl" in members and "c_pressure.jsonl" in members
    else:
        assert results["h"]["checks"]["identical_quantization"]
        assert all(results["i"]["checks"].values())
        assert results["k"]["checks"]["losses_agree"]  # the full logits and the chunks: the same loss
        rows = results["l"]["rows"]  # the plan's GPU comparison, its code run on the CPU
        assert [r["seq_len"] for r in rows] == [32, 64]
        assert all(
            r["planned_allocated"] < r["planned_reserved"] and r["counted_on_device"] > 0 for r in rows
        )
        assert "no GPU statistics" in plan_table


def test_the_parts_import_without_what_the_gpu_image_lacks(image_like_env):
    code = (
        "import sys; sys.path[:0] = ['bench', '.']\n"
        "import gpu_validate\n"
        "parts = gpu_validate.load_parts([])\n"
        "import gpu_tokens, workloads, monitor_overhead, packing, load_memory, long_sequence_gpu, plan_gpu\n"  # what the parts import
        "import lightning_paged, lightning_paged.lightning.mixin, lightning.pytorch, peft, bitsandbytes\n"
        "from transformers import Trainer, BitsAndBytesConfig\n"
        f"assert not [m for m in {ABSENT_ON_THE_GPU_IMAGE!r} if sys.modules.get(m) is not None]\n"
        "print(''.join(sorted(parts)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=image_like_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "abcdefghijkl"


DEMO_PARTS = """
import os, time
from gpu_registry import part


@part("ok", "a part that passes", budget_s=20, dry_budget_s=20)
def ok(ctx):
    ctx.path("big.bin").write_bytes(b"x" * 4096)
    return {"status": "passed", "headline": "2 + 2 = 4", "value": 2 + 2}


@part("fails", "a part whose code raises", budget_s=20, dry_budget_s=20)
def fails(ctx):
    raise RuntimeError("this part fails on purpose")


@part("crashes", "a part whose process exits like bitsandbytes' CUDA error check", budget_s=20, dry_budget_s=20)
def crashes(ctx):
    print("Error invalid configuration argument at line 456 in file ops.cu", flush=True)
    os._exit(1)


@part("slow", "a part over its budget", budget_s=5, dry_budget_s=5)
def slow(ctx):
    ctx.progress({"done": "first half"})
    time.sleep(60)
    return {"status": "passed"}


@part("stuck", "a part that outlives its runner unless it ends itself", budget_s=60, dry_budget_s=60)
def stuck(ctx):
    ctx.path("pid").write_text(str(os.getpid()))
    time.sleep(60)
    return {"status": "passed"}
"""


@pytest.fixture
def demo_module(tmp_path, monkeypatch):
    """A part module outside bench/, registered the way a new part is: by importing it."""
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "gpu_demo_parts.py").write_text(DEMO_PARTS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("GPU_VALIDATE_T0", raising=False)
    yield "gpu_demo_parts"
    for key in ("ok", "fails", "crashes", "slow", "stuck"):
        gpu_registry.PARTS.pop(key, None)
    sys.modules.pop("gpu_demo_parts", None)


def test_runner_records_each_outcome_and_brings_home_what_finished(
    demo_module, tmp_path, monkeypatch, capsys
):
    out, raw = tmp_path / "OUT", tmp_path / "raw"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(gpu_validate, "ARCHIVE_FILE_LIMIT", 1024)  # ok_big.bin (4 KiB) stays behind
    args = [
        "--dry-run",
        "--part-module",
        demo_module,
        "--parts",
        "ok,fails,crashes,slow",
        "--out-dir",
        str(raw),
    ]
    assert gpu_validate.main(args) == 1  # not every part passed
    summary = json.loads((out / "summary.json").read_text())
    by_part = {p["part"]: p for p in summary["parts"]}
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [
        ("crashes", "crashed"),
        ("fails", "failed"),
        ("ok", "passed"),
        ("slow", "timed_out"),
    ]
    assert json.loads((raw / "ok.json").read_text())["value"] == 4
    assert "this part fails on purpose" in by_part["fails"]["headline"]
    assert "Traceback" in json.loads((raw / "fails.json").read_text())["error"]
    assert "invalid configuration argument" in by_part["crashes"]["log_tail"]  # the process's last words
    assert by_part["slow"]["elapsed_s"] < 20  # stopped at its 5 s budget, not left to sleep for 60
    assert summary["archive_left_out"] == ["ok_big.bin"]
    check_brought_home(out)
    with tarfile.open(out / "gpu-validate-ok_fails_crashes_slow.tgz") as tgz:
        names = set(tgz.getnames())
        progress = tgz.extractfile("slow.progress.jsonl").read().decode()
    assert {"ok.json", "crashes.log", "slow.progress.jsonl"} <= names and "ok_big.bin" not in names
    assert progress.count("\n") == 1  # what the slow part finished came home
    assert "| slow | a part over its budget | timed_out |" in capsys.readouterr().out


def test_a_part_ends_itself_when_its_runner_is_killed(demo_module, tmp_path):
    raw = tmp_path / "raw"
    command = [sys.executable, str(BENCH / "gpu_validate.py"), "--dry-run", "--part-module", demo_module]
    runner = subprocess.Popen([*command, "--parts", "stuck", "--out-dir", str(raw)], cwd=ROOT)
    pid_file = raw / "stuck_pid"
    for _ in range(600):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.1)
    runner.kill()  # as a time limit kills a command: no chance to clean up
    runner.wait()
    part_pid = int(pid_file.read_text())
    for _ in range(100):
        try:
            os.kill(part_pid, 0)
        except ProcessLookupError:
            return  # gone: nothing is left running into the next call
        time.sleep(0.1)
    os.kill(part_pid, 9)
    pytest.fail("the part kept running after its runner was killed")


def test_a_part_that_does_not_fit_the_deadline_is_skipped_and_named(demo_module, tmp_path, monkeypatch):
    monkeypatch.setenv(gpu_validate.T0_VARIABLE, str(time.time() - 100))  # the call began 100 s ago
    raw = tmp_path / "raw"
    args = [
        "--dry-run",
        "--part-module",
        demo_module,
        "--parts",
        "ok",
        "--deadline-s",
        "110",
        "--out-dir",
        str(raw),
    ]
    assert gpu_validate.main(args) == 1
    (record,) = json.loads((raw / "summary-ok.json").read_text())["parts"]
    assert record["status"] == "skipped" and "run it with --parts ok" in record["headline"]
    assert not (raw / "ok.json").exists()


def test_a_new_part_joins_call_two_and_runs(tmp_path, monkeypatch):
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "gpu_part_example.py").write_text(
        "from gpu_registry import part\n\n\n"
        '@part("m", "an added part", budget_s=20)\n'
        "def part_m(ctx):\n"
        '    ctx.path("figures.json").write_text("{}")\n'
        '    return {"status": "passed", "headline": "on " + ctx.device}\n'
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    try:
        registry = gpu_validate.load_parts(["gpu_part_example"])
        assert [p.key for p in gpu_registry.select("f-z", registry)][-1] == "m"
        assert "m" not in [p.key for p in gpu_registry.select("a-e", registry)]
        raw = tmp_path / "raw"
        args = ["--dry-run", "--part-module", "gpu_part_example", "--parts", "m", "--out-dir", str(raw)]
        assert gpu_validate.main(args) == 0
        assert json.loads((raw / "m.json").read_text())["headline"] == "on cpu"
        assert (raw / "m_figures.json").is_file()
        with pytest.raises(ValueError, match="part key 'm' is taken"):
            gpu_registry.part("m", "another", budget_s=1)(lambda ctx: {})
    finally:
        gpu_registry.PARTS.pop("m", None)
        sys.modules.pop("gpu_part_example", None)


def test_parts_are_chosen_by_ranges_and_lists(capsys):
    registry = gpu_validate.load_parts([])
    keys = lambda spec: "".join(p.key for p in gpu_registry.select(spec, registry))  # noqa: E731
    assert (keys("a-e"), keys("f-z"), keys("b,d"), keys("a-c,e"), keys(None)) == (
        "abcde",
        "fghijkl",
        "bd",
        "abce",
        "abcdefghijkl",
    )
    for spec, message in (("b,z", "no part 'z'"), ("e-a", "not a range"), ("x-z", "selects no part")):
        with pytest.raises(ValueError, match=message):
            gpu_registry.select(spec, registry)
    with pytest.raises(SystemExit):
        gpu_validate.main(["--plan", "--parts", "b,z"])
    assert "--parts b,z: no part 'z'" in capsys.readouterr().err
    assert (gpu_registry.label("a-e"), gpu_registry.label("b, d"), gpu_registry.label(None)) == (
        "a-e",
        "b_d",
        "all",
    )


def test_each_call_fits_its_deadline_with_room_for_the_install():
    registry = gpu_validate.load_parts([])
    docs = (ROOT / "docs" / "gpu-validation.md").read_text()
    for spec, deadline in gpu_validate.CALLS.items():
        budgets = sum(p.budget_s for p in gpu_registry.select(spec, registry))
        assert budgets + gpu_validate.INSTALL_S + gpu_validate.CLOSING_S <= deadline, spec
        assert f"bash bench/gpu_validate.sh --parts {spec} --deadline-s {deadline:.0f}" in docs
    calls = sum(deadline + gpu_validate.TIMEOUT_MARGIN_S for deadline in gpu_validate.CALLS.values())
    rerun_room = gpu_validate.DEVICE_TIME_S - gpu_validate.MACHINE_START_S - calls
    assert rerun_room >= 120  # enough to run a failed part of call 1 again


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path / "OUT"))
    assert (
        gpu_validate.main(["--parts", "a-e", "--out-dir", str(tmp_path / "gpu")]) == gpu_validate.EXIT_NO_GPU
    )
    assert "needs a CUDA GPU and none is available here" in capsys.readouterr().err
    assert not (tmp_path / "gpu").exists()
    assert "needs a CUDA GPU" in (tmp_path / "OUT" / "summary.md").read_text()  # said where results come back


def test_cupti_python_must_match_the_cupti_runtime_torch_brought():
    from packaging.requirements import Requirement

    # torch 2.11 pins nvidia-cuda-cupti==13.0.85.* (cuda-toolkit[cupti]==13.0.2)
    newest = cupti_agreement("13.0.85", "nvidia-cuda-cupti~=13.4", "13.4.0")
    assert newest["agree"] is False and "cupti-python==13.0.*" in newest["advice"]
    assert cupti_agreement("13.0.85", "nvidia-cuda-cupti~=13.0", "13.0.1") == {"agree": True}
    assert cupti_agreement(None, None, None)["agree"] is None
    extra = re.search(r'^cupti = \["(?P<req>[^"]+)"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    pin = Requirement(extra.group("req")).specifier
    assert pin.contains("13.0.1") and not pin.contains("13.4.0")  # the extra cannot pull the 13.4 bindings


GIB = 2**30


def test_the_ballast_plan_leaves_the_long_step_half_the_state_short():
    needs = {512: 1 * GIB, 2048: 3 * GIB, 4096: 8 * GIB}
    plan, problem = gpu_eviction.plan_ballast(needs, state=220 * MIB, free=70 * GIB)
    assert problem == "" and plan.free == 8 * GIB - 110 * MIB and plan.margin == 55 * MIB
    assert [plan.expectation(n) for n in (512, 2048, 4096)] == ["stay", "stay", "evict"]
    near = gpu_eviction.BallastPlan(
        needs={1: plan.free + 10 * MIB}, state=plan.state, margin=plan.margin, free=plan.free
    )
    assert near.expectation(1) == "either"  # within the margin: recorded, not judged
    assert (
        "cannot separate" in gpu_eviction.plan_ballast({512: 3 * GIB, 4096: 3 * GIB}, 220 * MIB, 70 * GIB)[1]
    )
    assert "too small" in gpu_eviction.plan_ballast(needs, 20 * MIB, 70 * GIB)[1]
    assert "already exceeds" in gpu_eviction.plan_ballast(needs, 220 * MIB, 4 * GIB)[1]


def _step(length, cupti, pressure):
    return {"seq_len": length, "cupti": {"evicted_bytes": cupti}, "pressure": {"evicted_bytes": pressure}}


def test_judge_holds_each_step_to_what_the_physics_guarantees():
    plan, _ = gpu_eviction.plan_ballast({512: GIB, 4096: 8 * GIB}, 220 * MIB, 70 * GIB)
    ramp = [512, 4096, 512]
    good = [_step(512, 0, MIB), _step(4096, 100 * MIB, 110 * MIB), _step(512, 0, 0)]
    assert gpu_eviction.judge(plan, good, "cupti", ramp)["ok"]
    assert gpu_eviction.judge(plan, good, "pressure", ramp)[
        "ok"
    ]  # an estimate: 1 MiB is under half the margin
    noisy = [_step(512, 4096, 40 * MIB), *good[1:]]
    assert (
        "should stay" in gpu_eviction.judge(plan, noisy, "cupti", ramp)["problems"][0]
    )  # exact: none at all
    assert "should stay" in gpu_eviction.judge(plan, noisy, "pressure", ramp)["problems"][0]
    quiet_long = [good[0], _step(4096, 0, 0), good[2]]
    assert "should evict" in gpu_eviction.judge(plan, quiet_long, "cupti", ramp)["problems"][0]
    oom = [good[0], {"seq_len": 4096, "error": "out of memory: ..."}]
    problems = gpu_eviction.judge(plan, oom, "cupti", ramp)["problems"]
    assert "out of memory" in problems[0] and "stopped after 2 of 3" in problems[1]
