"""The benchmark scripts keep working: each CPU script's smallest setting runs and writes its result, and
the GPU script's search, ballast and summary logic is exercised on CPU. Nothing here asserts a timing."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_tokens  # noqa: E402
from common import compare_runs, fmt_bytes, markdown_table, step_times  # noqa: E402

CPU_SCRIPTS = (
    "strategy_overhead",
    "vs_transformers_trainer",
    "memory_truth",
    "packing",
    "load_memory",
    "memory_plan",
    "long_sequence",
)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Start every CPU script with --quick at once (they are mostly imports; together they finish sooner)."""
    out = tmp_path_factory.mktemp("bench")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out-dir", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in CPU_SCRIPTS
    }
    yield out, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def finished(quick_runs, name: str) -> tuple[dict, str]:
    out, procs = quick_runs
    output, _ = procs[name].communicate(timeout=600)
    assert procs[name].returncode == 0, output[-3000:]
    markdown = (out / f"{name}_quick.md").read_text()
    return json.loads((out / f"{name}_quick.json").read_text()), markdown


def check_machine(report: dict) -> None:
    machine = report["machine"]
    assert machine["device"].startswith("cpu")
    for package in ("torch", "lightning", "bitsandbytes", "peft", "transformers"):
        assert machine["versions"][package], package
    assert machine["threads_per_run"] == 1


def check_pair(report: dict, variant: str, baseline: str, steps: int) -> None:
    comparison = report["comparison"]
    assert set(comparison["step_time_s"]) == {variant, baseline}
    assert comparison["step_time_ratio"] > 0
    assert comparison["process_peak_rss_bytes"]["ratio"] > 0
    for name in (variant, baseline):
        (run,) = report["runs"][name]
        assert run["variant"] == name
        assert len(run["stamps"]) == steps + 1  # the start of training, then every step's end
        assert len(run["losses"]) == steps and all(math.isfinite(x) for x in run["losses"])
        assert run["memory"]["process_peak_rss_bytes"] >= run["memory"]["start_rss_bytes"] > 0
        assert run["threads"] == 1


def test_strategy_overhead_quick(quick_runs):
    report, markdown = finished(quick_runs, "strategy_overhead")
    check_machine(report)
    steps = report["settings"]["workload"]["steps"]
    check_pair(report, "lightning_paged", "hand_written", steps)
    assert report["goal"]["step_time_ratio_max"] == 1.02
    assert isinstance(report["goal"]["met"], bool)
    # Same weights, adapters, optimizer and batches: the two loops compute the same losses.
    assert report["comparison"]["loss_max_abs_difference"] < 1e-5
    fixed = report["fixed_cost"]
    assert set(fixed["micro_cpu_step_s"]) == {"lightning_paged", "hand_written"}
    assert fixed["projected_ratio"] > 0 and isinstance(report["goal"]["met_by_fixed_cost"], bool)
    assert "| step time (wall, median) |" in markdown and "| step time (CPU, median) |" in markdown


def test_vs_transformers_trainer_quick(quick_runs):
    report, markdown = finished(quick_runs, "vs_transformers_trainer")
    check_machine(report)
    steps = report["settings"]["workload"]["steps"]
    check_pair(report, "lightning_paged", "transformers_trainer", steps)
    curves = report["loss_curves"]
    assert [row["step"] for row in curves] == list(range(1, steps + 1))
    assert report["comparison"]["loss_max_abs_difference"] == max(abs(r["difference"]) for r in curves)
    assert report["comparison"]["loss_max_abs_difference"] < 1e-3
    ours, theirs = (
        report["runs"][v][0]["trainable_params"] for v in ("lightning_paged", "transformers_trainer")
    )
    assert ours == theirs
    if report["plot"]:
        assert (quick_runs[0] / report["plot"]).stat().st_size > 0
    assert "Loss curves" in markdown


def test_load_memory_quick_streams_a_sharded_model_and_a_mixtral_within_the_host_memory_bound(quick_runs):
    report, markdown = finished(quick_runs, "load_memory")
    check_machine(report)
    case, moe = report["cases"]
    assert case["shards"] > 5  # several shards: the loader walks the index
    ours = case["runs"]["streaming"]
    assert ours["quantized_layers"] == case["runs"]["load_then_convert"]["quantized_layers"] > 0
    # peak anonymous memory above the imports: the 4-bit model and one 16-bit tensor, generously
    bound = 1.5 * (ours["loaded_model_bytes"] + ours["largest_tensor_16bit_bytes"])
    assert 0 < ours["peak_above_baseline_bytes"] <= bound
    assert "streaming" in markdown and "peak RssAnon above imports" in markdown
    from_bin = case["runs"]["streaming_bin"]  # the same model as .bin shards, mapped by torch.load
    assert from_bin["quantized_layers"] == ours["quantized_layers"]
    assert from_bin["directory"].endswith("-bin") and 0 < from_bin["peak_above_baseline_bytes"] <= bound
    assert "bin_over_safetensors" in case["goals"]
    # a Mixtral: every expert quantized as it is read, where transformers keeps the experts in 16 bits
    ours, theirs = moe["runs"]["streaming"], moe["runs"]["transformers_4bit"]
    assert moe["role"] == "moe" and ours["expert_tensors_4bit"] > 0 == theirs["expert_tensors_4bit"]
    assert ours["quantized_layers"] == theirs["quantized_layers"] > 0
    assert ours["loaded_model_bytes"] < 0.5 * theirs["loaded_model_bytes"]
    assert (
        0
        < ours["peak_above_baseline_bytes"]
        <= 1.5 * (ours["loaded_model_bytes"] + ours["largest_tensor_16bit_bytes"])
    )
    assert ours["peak_above_baseline_bytes"] < theirs["peak_above_baseline_bytes"]


def test_memory_truth_quick(quick_runs):
    report, markdown = finished(quick_runs, "memory_truth")
    check_machine(report)
    double, single = report["weights"]["tiny"]
    assert double["theory_bits_per_param"] == pytest.approx(4.127, abs=5e-4)
    assert double["bits_per_param"] == pytest.approx(double["theory_bits_per_param"], abs=0.01)
    assert single["bits_per_param"] == pytest.approx(4.5)
    assert double["bytes"]["packed"] * 2 == double["quantized_parameters"]  # two 4-bit values per byte
    checkpoint = report["checkpoint"]
    ours, default = checkpoint["lightning_paged"], checkpoint["lightning_default_full"]
    assert ours["state_dict_tensors"] == 2 * double["quantized_layers"]  # LoRA A and B of each layer
    assert ours["state_dict_bytes"] == ours["trainable_bytes"]
    assert ours["file_bytes"] >= checkpoint["lora_plus_optimizer_state_bytes"]
    assert ours["file_bytes"] < default["file_bytes"]
    assert default["state_dict_tensors"] > ours["state_dict_tensors"]
    assert "bits/param" in markdown


def test_memory_plan_quick(quick_runs):
    report, markdown = finished(quick_runs, "memory_plan")
    check_machine(report)
    rows = report["accuracy"]
    assert {(r["optimizer"], r["seq_len"]) for r in rows} == {
        (o, n) for o in ("paged_adamw_8bit", "adamw_8bit") for n in (64, 128)
    }
    assert all(abs(r["error"]) <= 0.05 and r["measured_bytes"] > 0 for r in rows)
    assert "plan vs the same step measured" in markdown


def test_packing_quick(quick_runs):
    report, markdown = finished(quick_runs, "packing")
    check_machine(report)
    assert set(report["cases"]) == {"shipped/tiny", "long_tailed/tiny"}
    for name, summary in report["summary"].items():
        case = report["cases"][name]
        padding = summary["padding_fraction"]
        assert padding["packed"] <= padding["padded_grouped"] < padding["padded_random"]
        assert summary["ratio_to_padded_random"]["padded_random"] == 1
        assert case["first_step_loss"]["abs_difference"] < 1e-5  # packed and unpacked: the same loss
        assert 0.9 < case["packed_fill_rate"] <= 1
    assert "useful tokens/s" in markdown and "Goal on long_tailed/tiny" in markdown


def test_long_sequence_quick_stops_runs_at_the_budget_and_the_losses_agree(quick_runs):
    report, markdown = finished(quick_runs, "long_sequence")
    check_machine(report)
    short, long = report["settings"]["lengths"]
    runs, summary = report["runs"], report["summary"]
    ours = runs["lightning_paged"]
    assert [r["seq_len"] for r in ours] == [short, long] and all(r["fits"] for r in ours)
    trainer = runs["transformers_trainer"]
    assert trainer[0]["fits"] and trainer[1]["fits"] is False  # stopped at the budget, reported
    assert trainer[1]["peak_above_baseline_bytes"] > report["settings"]["budget_bytes"]
    assert (
        summary["longest_fit"]["lightning_paged"] == long
        and summary["longest_fit"]["transformers_trainer"] == short
    )
    # the adapters start at zero: every variant's first loss is the base model's on the same tokens
    assert summary["first_step_loss_max_difference"] < 1e-4
    assert len(summary["first_step_losses"][str(short)]) >= 3
    trl = runs["trl_sft"][0]
    if trl.get("skipped"):
        assert "trl is not installed" in trl["skipped"]
    else:
        assert trl["trl_loss_type"] == report["trl_loss_type"] and report["machine"]["versions"]["trl"]
    timing = summary["step_time_ratio_vs_standard"]
    assert timing["cpu_median"] > 0 and len(timing["cpu_per_round"]) == report["settings"]["timing_rounds"]
    assert "does not fit in 256.0 MiB" in markdown


def test_long_sequence_gpu_measurement_runs_on_cpu_and_the_variants_agree():
    """The GPU script's measurement, on a tiny model on CPU: no memory figures, the same first loss."""
    import long_sequence_gpu as gpu

    tiny = replace(gpu.QUICK, device="cpu", vocab_size=512, hidden_size=32, intermediate_size=64, steps=2)
    runs = {v: gpu.measure(tiny, v, 48) for v in gpu.VARIANTS}
    assert all(r["fits"] and r["tokens_per_second"] > 0 for r in runs.values())
    first = [r["losses"][0] for r in runs.values()]
    assert max(first) - min(first) < 1e-5
    assert runs["chunked+offload"]["offloaded_bytes"] == 0  # on the host nothing moves
    assert "max_memory_reserved" not in runs["chunked"]
    assert gpu.main(["--plan"]) == 0


# --- the GPU script's logic, on CPU ---------------------------------------------------------------------


@pytest.mark.parametrize("limit", [256, 300, 1000, 4096, 9999, 16384, 40000])
def test_longest_fitting_finds_the_largest_length_that_fits(limit):
    seen = []

    def fits(seq_len: int) -> bool:
        seen.append(seq_len)
        return seq_len <= limit

    longest, probes = gpu_tokens.longest_fitting(fits, 256, 16384, 256)
    assert longest == min(16384, limit // 256 * 256)
    assert [n for n, _ in probes] == seen
    assert all(ok == (n <= limit) for n, ok in probes)
    assert len(probes) <= math.ceil(math.log2(16384 // 256)) + 1


def test_longest_fitting_when_nothing_fits_and_bad_ranges():
    longest, probes = gpu_tokens.longest_fitting(lambda n: False, 512, 4096, 256)
    assert longest is None and probes == [(512, False)]
    assert gpu_tokens.longest_fitting(lambda n: True, 300, 1000, 256)[0] == 768  # multiples of 256 only
    with pytest.raises(ValueError, match="no multiple"):
        gpu_tokens.longest_fitting(lambda n: True, 300, 400, 256)


def test_ballast_leaves_the_budget_free():
    free, budget = 10 * 2**30 + 12345, 2 * 2**30
    size = gpu_tokens.ballast_bytes(free, budget)
    assert size % (2 * 2**20) == 0
    assert budget <= free - size < budget + 2 * 2**20
    with pytest.raises(ValueError, match="budget-gib 12.00 is not below"):
        gpu_tokens.ballast_bytes(free, 12 * 2**30)
    with pytest.raises(ValueError, match="must be positive"):
        gpu_tokens.ballast_bytes(free, 0)


def fake_run(step_s: float, steps: int = 6, allocated: int = 2**30) -> dict:
    stamps = [0.0]
    for i in range(steps):
        stamps.append(stamps[-1] + (3 * step_s if i == 0 else step_s))  # a slow warm-up step
    return {"stamps": stamps, "gpu_memory": {"peak_device_bytes": allocated}}


def test_tokens_per_second_and_throughput_summary():
    assert gpu_tokens.tokens_per_second(fake_run(0.5), 1024) == pytest.approx(2048)
    assert gpu_tokens.paging_cost(90.0, 100.0) == pytest.approx(0.1)
    results = {
        "lightning_paged": {512: [fake_run(0.5, allocated=3 * 2**30)], 1024: [{"error": "out of memory: x"}]},
        "transformers_trainer": {512: [fake_run(0.4, allocated=4 * 2**30)], 1024: [fake_run(0.8)]},
    }
    rows = gpu_tokens.throughput_summary(results, batch=1)
    assert [r["seq_len"] for r in rows] == [512, 1024]
    assert rows[0]["tokens_per_s_ratio"] == pytest.approx(0.8)
    assert rows[0]["memory_ratio"] == pytest.approx(0.75)
    assert rows[1]["lightning_paged"]["tokens_per_s"] is None
    assert rows[1]["lightning_paged"]["errors"] == ["out of memory: x"]
    assert rows[1]["tokens_per_s_ratio"] is None


def test_budget_search_through_the_worker_seam(monkeypatch):
    """run_budget's search, common length and paging cost, with the GPU worker replaced by a fake device."""
    limits = {"paged_adamw_8bit": 3500, "adamw_8bit": 1000}
    calls = []

    def fake_worker(script, args, threads):
        workload = json.loads(args[args.index("--workload") + 1])
        calls.append((workload["optimizer"], workload["seq_len"]))
        if workload["seq_len"] > limits[workload["optimizer"]]:
            return {"fits": False, "error": "CUDA out of memory"}
        slower = 1.1 if workload["optimizer"] == "paged_adamw_8bit" else 1.0
        run = fake_run(0.01 * workload["seq_len"] / 256 * slower, steps=4)
        return {**run, "fits": True, "evicted_bytes": 0}

    monkeypatch.setattr(gpu_tokens, "run_worker", fake_worker)
    args = argparse.Namespace(budget_gib=2.0, seq_step=256, max_seq=4096, budget_steps=4, threads=1)
    model = gpu_tokens.QUICK_MODEL
    out = gpu_tokens.run_budget(args, model)
    assert out["optimizers"]["paged_adamw_8bit"]["longest_seq_len"] == 3328
    assert out["optimizers"]["adamw_8bit"]["longest_seq_len"] == 768
    assert out["common_seq_len"] == 768 and out["extra_tokens"] == 2560
    # The paged search never tried 768 tokens: it is probed afterwards, so both speeds compare there.
    searched = [n for n, _ in out["optimizers"]["paged_adamw_8bit"]["probes"]]
    assert 768 not in searched and ("paged_adamw_8bit", 768) in calls
    assert out["paging_cost"] == pytest.approx(1 - 1 / 1.1)
    rep = {
        "machine": {"device": "fake"},
        "plan": {"parameters": 1, "model": {"lora_r": 16, "batch_size": 1}},
        "budget": out,
    }
    assert "Paging costs 9.091% of tokens/s and buys 2560 tokens" in gpu_tokens.markdown(rep)


def test_gpu_script_plans_and_refuses_without_a_gpu(capsys):
    assert gpu_tokens.main(["--plan", "--part", "budget", "--budget-gib", "1.5"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parts"] == ["budget"]
    assert plan["budget"]["budget_bytes"] == int(1.5 * 2**30)
    assert plan["parameters"] > 1_000_000_000  # the ~1B model
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path does not apply")
    assert gpu_tokens.main(["--quick"]) == gpu_tokens.EXIT_NO_GPU
    assert "needs a CUDA GPU and none is available here" in capsys.readouterr().err


# --- shared helpers ---------------------------------------------------------------------------------------


def test_step_times_markdown_and_bytes():
    assert step_times([0.0, 1.0, 3.0, 6.0], skip=1) == [2.0, 3.0]
    assert markdown_table(["a", "b"], [[1, 0.5]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |"]
    assert fmt_bytes(512) == "512 B" and fmt_bytes(3 * 2**20) == "3.0 MiB" and fmt_bytes(None) == "n/a"


def test_compare_runs_pairs_rounds_and_finds_the_loss_difference():
    def run(step_s, losses, peak):
        stamps = [i * step_s for i in range(len(losses) + 1)]
        memory = {"process_peak_rss_bytes": peak, "peak_above_start_bytes": peak // 2}
        return {"stamps": stamps, "losses": losses, "memory": memory, "setup_s": 1.0}

    results = {
        "a": [run(1.1, [3.0, 2.0, 1.0], 200), run(2.2, [3.0, 2.0, 1.0], 200)],
        "b": [run(1.0, [3.0, 2.5, 1.0], 100), run(2.0, [3.0, 2.0, 1.0], 100)],
    }
    c = compare_runs(results, "a", "b", skip=0)
    assert c["step_time_ratio_per_round"] == [1.1, 1.1]
    assert c["step_time_ratio"] == pytest.approx(1.1)
    assert c["process_peak_rss_bytes"]["ratio"] == 2.0
    assert c["loss_max_abs_difference"] == pytest.approx(0.5)
