"""One training step's peak host memory at long sequences, 128k vocabulary: the chunked loss against
transformers' Trainer + PEFT (standard loss) and TRL's SFTTrainer (its default loss).

Four variants train the same saved Llama (random weights, 128,256-word vocabulary, a small hidden size
so it runs on a CPU) as NF4 QLoRA with LoRA on every projection, gradient checkpointing on, batch 1,
every token labelled, the same token ids:

- ``lightning_paged``: ``CausalLMModule`` (its default ``loss="chunked"``) under ``PagedQLoRAStrategy``;
- ``lightning_paged_standard``: the same with ``loss="standard"`` (transformers' loss, every logit);
- ``transformers_trainer``: ``from_pretrained`` with ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``,
  ``get_peft_model`` and ``Trainer`` (the model's own loss: every logit in float32, and its gradient);
- ``trl_sft``: the same PEFT model under TRL's ``SFTTrainer`` with its default ``loss_type`` (recorded).

Each run is a fresh process. Its memory is the peak of its anonymous resident memory (``RssAnon``,
sampled every millisecond) during the training steps, above the process's ``RssAnon`` once its imports
are done: model, optimizer state and the step's transient memory, what the user pays. A run whose
memory passes the budget (``--budget-gib``) is stopped there and recorded as "does not fit in N GiB";
an address-space limit a few GiB above the budget backs that up, so no run can take the machine's
memory. Sequence lengths go up from the shortest; a variant that did not fit one length is not tried
at the next. Step time at the shortest length is compared, chunked against standard, over interleaved
rounds in fresh processes.

    python bench/long_sequence.py                  # 1k-16k tokens, 6 GiB budget: about 75 minutes on 2 cores
    python bench/long_sequence.py --quick          # smoke test: a tiny model, 32k vocabulary, 2 lengths
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    PACKAGES,
    emit_result,
    fmt_bytes,
    interleaved,
    machine_info,
    markdown_table,
    median,
    paired_ratios,
    run_worker,
    set_threads,
    versions,
    write_results,
)

NAME = "long_sequence"
SCRIPT = Path(__file__).resolve()
OURS, OURS_STANDARD, TRAINER, TRL = (
    "lightning_paged",
    "lightning_paged_standard",
    "transformers_trainer",
    "trl_sft",
)
VARIANTS = (OURS, OURS_STANDARD, TRAINER, TRL)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1 << 30
ADDRESS_SLACK = 4 * GIB
"""The address-space limit of a run sits this far above its budget (allocators reserve more than they touch)."""
SKIP_TIMING_STEPS = 2


@dataclass
class Setup:
    """The model and the measurement plan."""

    vocab_size: int = 128_256
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    lora_r: int = 16
    chunk_size: int = 256
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    memory_steps: int = 2
    timing_steps: int = 6
    timing_rounds: int = 3
    budget_bytes: int = 6 * GIB
    seed: int = 0

    def llama_config(self, seq_len: int) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=seq_len,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )


FULL = Setup()
QUICK = Setup(
    vocab_size=32_768,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    num_kv_heads=1,
    lora_r=4,
    lengths=(128, 1024),
    memory_steps=2,
    timing_steps=3,
    timing_rounds=1,
    budget_bytes=GIB // 4,
)


# --- memory: RssAnon, sampled, with a budget ---------------------------------------------------------


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon: this benchmark needs Linux")


def address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


class Meter:
    """Peak ``RssAnon`` above ``baseline``, over the run and per step; stops the process past ``budget``."""

    def __init__(self, budget: int, report: dict[str, Any]) -> None:
        self.baseline = rss_anon()
        self.budget = budget
        self.report = report
        self.peak = self.baseline
        self.window_peak = self.baseline
        self.steps: list[dict[str, Any]] = []
        self._step: dict[str, Any] | None = None
        self._stop = threading.Event()
        limit = address_space() + budget + ADDRESS_SLACK
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = rss_anon()
            self.peak = max(self.peak, now)
            self.window_peak = max(self.window_peak, now)
            if now - self.baseline > self.budget:
                self.over_budget(now)
            time.sleep(0.001)

    def over_budget(self, now: int | None = None) -> None:
        """Report that the run does not fit and end the process at once (no cleanup that needs memory)."""
        self.report.update(
            fits=False,
            peak_above_baseline_bytes=max(self.peak, now or 0) - self.baseline,
            steps=self.steps,
            stopped_in_step=None if self._step is None else len(self.steps) + 1,
        )
        emit_result(self.report)
        os._exit(0)

    def step_start(self) -> None:
        self.window_peak = rss_anon()
        self._step = {"start_above_baseline_bytes": self.window_peak - self.baseline}
        self._step["wall"], self._step["cpu"] = time.perf_counter(), time.process_time()

    def step_end(self, loss: float | None) -> None:
        assert self._step is not None
        step, self._step = self._step, None
        step["wall_s"] = time.perf_counter() - step.pop("wall")
        step["cpu_s"] = time.process_time() - step.pop("cpu")
        step["peak_above_baseline_bytes"] = max(self.window_peak, rss_anon()) - self.baseline
        step["loss"] = loss
        self.steps.append(step)

    def result(self) -> dict[str, Any]:
        self._stop.set()
        self.report.update(
            fits=True,
            peak_above_baseline_bytes=self.peak - self.baseline,
            step_peak_above_baseline_bytes=max(s["peak_above_baseline_bytes"] for s in self.steps),
            steps=self.steps,
        )
        return self.report


# --- the variants, each in its own worker process ------------------------------------------------------


def token_ids(setup: Setup, seq_len: int, steps: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(setup.seed + seq_len)
    return torch.randint(3, setup.vocab_size, (steps, 1, seq_len), generator=generator)


def save_model(setup: Setup, directory: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(setup.seed)
    LlamaForCausalLM(setup.llama_config(max(setup.lengths))).save_pretrained(str(directory))


def preload(variant: str) -> None:
    """Import what a run needs before its baseline is read, so imports count in no variant's memory."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import Trainer  # noqa: F401

    if variant in (OURS, OURS_STANDARD):
        import lightning.pytorch  # noqa: F401

        import lightning_paged  # noqa: F401
    if variant == TRL:
        import trl  # noqa: F401


def run_ours(setup: Setup, model_dir: Path, ids: Any, meter: Meter, loss: str) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_paged import CausalLMModule, OptimizerConfig, PagedQLoRAStrategy

    class Steps(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            meter.step_start()

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            meter.step_end(float(trainer.callback_metrics["train/loss"]))

    module = CausalLMModule(
        model_name_or_path=str(model_dir),
        optimizer=OptimizerConfig(name="paged_adamw_8bit", lr=1e-4),
        loss=loss,  # type: ignore[arg-type]
        loss_chunk_size=setup.chunk_size,
    )
    strategy = PagedQLoRAStrategy(
        compute_dtype="float32", lora_r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=0.0
    )
    batches = [{"input_ids": x, "attention_mask": x.new_ones(x.shape), "labels": x.clone()} for x in ids]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Steps()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def peft_model(setup: Setup, model_dir: Path) -> Any:
    """The usual QLoRA recipe: transformers' 4-bit load, ``prepare_model_for_kbit_training``, PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    lora = LoraConfig(
        r=setup.lora_r,
        lora_alpha=2 * setup.lora_r,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def hf_arguments(steps: int, output_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        optim="paged_adamw_8bit",
        max_grad_norm=0.0,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )


def step_callback(meter: Meter, losses: list[float]) -> Any:
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            meter.step_start()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            meter.step_end(losses[-1] if losses else None)

    return Steps()


def run_trainer(setup: Setup, model_dir: Path, ids: Any, meter: Meter, output_dir: str) -> None:
    from transformers import Trainer, TrainingArguments, default_data_collator

    losses: list[float] = []

    class LossTrainer(Trainer):
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

    examples = [
        {"input_ids": x[0], "attention_mask": x[0].new_ones(x[0].shape), "labels": x[0].clone()} for x in ids
    ]
    LossTrainer(
        model=peft_model(setup, model_dir),
        args=TrainingArguments(**hf_arguments(len(examples), output_dir)),
        train_dataset=examples,
        data_collator=default_data_collator,
        callbacks=[step_callback(meter, losses)],
    ).train()


def trl_tokenizer() -> Any:
    """A transformers tokenizer that knows only its special tokens: the data is token ids already."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def run_trl(
    setup: Setup, model_dir: Path, ids: Any, meter: Meter, output_dir: str, report: dict[str, Any]
) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    losses: list[float] = []

    class LossTrainer(SFTTrainer):
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

    config = SFTConfig(
        **hf_arguments(len(ids), output_dir),
        max_length=None,
        packing=False,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    report["trl_loss_type"] = config.loss_type
    dataset = Dataset.from_list([{"input_ids": x[0].tolist()} for x in ids])
    LossTrainer(
        model=peft_model(setup, model_dir),
        args=config,
        train_dataset=dataset,
        processing_class=trl_tokenizer(),
        callbacks=[step_callback(meter, losses)],
    ).train()


def worker(variant: str, setup: Setup, seq_len: int, steps: int, model_dir: Path, threads: int) -> None:
    set_threads(threads)
    preload(variant)
    ids = token_ids(setup, seq_len, steps)
    report: dict[str, Any] = {"variant": variant, "seq_len": seq_len, "budget_bytes": setup.budget_bytes}
    meter = Meter(setup.budget_bytes, report)
    report["baseline_anon_bytes"] = meter.baseline
    try:
        with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as output_dir:
            if variant in (OURS, OURS_STANDARD):
                run_ours(setup, model_dir, ids, meter, "chunked" if variant == OURS else "standard")
            elif variant == TRAINER:
                run_trainer(setup, model_dir, ids, meter, output_dir)
            else:
                run_trl(setup, model_dir, ids, meter, output_dir, report)
    except (MemoryError, RuntimeError) as err:  # the address-space limit: an allocation refused
        if isinstance(err, RuntimeError) and "memory" not in str(err).lower():
            raise
        meter.over_budget()
    emit_result(meter.result())


# --- the parent: plan, run, report ---------------------------------------------------------------------


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(needed: int, patience_s: float = 600) -> bool:
    """Whether ``needed`` bytes are available, waiting up to ``patience_s`` for other work to free them."""
    deadline = time.monotonic() + patience_s
    while available_memory() < needed:
        if time.monotonic() > deadline:
            return False
        print(f"waiting: {fmt_bytes(available_memory())} available, {fmt_bytes(needed)} needed", flush=True)
        time.sleep(30)
    return True


def run_one(
    variant: str, setup: Setup, seq_len: int, steps: int, model_dir: Path, threads: int
) -> dict[str, Any]:
    if not wait_for_memory(setup.budget_bytes + GIB):
        return {"variant": variant, "seq_len": seq_len, "fits": None, "skipped": "not enough free memory"}
    args = [variant, "--setup", json.dumps(asdict(setup)), "--seq-len", str(seq_len)]
    args += ["--steps", str(steps), "--model-dir", str(model_dir)]
    return run_worker(SCRIPT, args, threads, timeout=3 * 3600)


def memory_runs(setup: Setup, model_dir: Path, threads: int) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    has_trl = importlib.util.find_spec("trl") is not None
    for seq_len in setup.lengths:
        for variant in VARIANTS:
            if variant == TRL and not has_trl:
                skipped = "trl is not installed (pip install -e '.[bench]')"
                runs[variant].append(
                    {"variant": variant, "seq_len": seq_len, "fits": None, "skipped": skipped}
                )
                continue
            previous = runs[variant][-1] if runs[variant] else None
            if previous is not None and previous.get("fits") is False:
                runs[variant].append({"variant": variant, "seq_len": seq_len, "fits": False, "not_run": True})
                continue
            t0 = time.perf_counter()
            result = run_one(variant, setup, seq_len, setup.memory_steps, model_dir, threads)
            runs[variant].append(result)
            peak = result.get("step_peak_above_baseline_bytes", result.get("peak_above_baseline_bytes"))
            print(
                f"{seq_len} tokens {variant}: fits={result.get('fits')} peak {fmt_bytes(peak)} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    return runs


def timing_runs(setup: Setup, model_dir: Path, threads: int) -> dict[str, list[dict[str, Any]]]:
    seq_len = setup.lengths[0]
    return interleaved(
        (OURS, OURS_STANDARD),
        setup.timing_rounds,
        lambda variant, _: run_one(variant, setup, seq_len, setup.timing_steps, model_dir, threads),
    )


def step_seconds(run: dict[str, Any], key: str = "cpu_s") -> float:
    steps = run["steps"][SKIP_TIMING_STEPS:] or run["steps"]
    return median(s[key] for s in steps)


def peak(run: dict[str, Any]) -> int | None:
    return run.get("step_peak_above_baseline_bytes") if run.get("fits") else None


def summarize(
    setup: Setup, runs: dict[str, list[dict[str, Any]]], timing: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    budget = setup.budget_bytes
    by_length: list[dict[str, Any]] = []
    for i, seq_len in enumerate(setup.lengths):
        row: dict[str, Any] = {"seq_len": seq_len}
        for variant in VARIANTS:
            row[variant] = peak(runs[variant][i])
        ours = row[OURS]
        for other, key in ((TRAINER, "vs_trainer"), (TRL, "vs_trl"), (OURS_STANDARD, "vs_standard")):
            theirs = row[other]
            if ours is None:
                row[key] = None
            elif theirs is None and runs[other][i].get("fits") is False:
                row[key] = {"at_most": ours / budget}  # theirs passed the budget
            else:
                row[key] = None if theirs is None else {"ratio": ours / theirs}
        by_length.append(row)

    def longest(variant: str) -> int | None:
        fitting = [r["seq_len"] for r in runs[variant] if r.get("fits")]
        return max(fitting) if fitting else None

    def bound(entry: dict[str, Any] | None) -> float | None:
        return None if entry is None else entry.get("ratio", entry.get("at_most"))

    long_rows = [r for r in by_length if r["seq_len"] >= 8192] or by_length[-1:]
    longest_fit = {v: longest(v) for v in VARIANTS}
    ours_longest, trainer_longest = longest_fit[OURS], longest_fit[TRAINER]
    tried_all = ours_longest == max(setup.lengths)
    ratios = paired_ratios(
        [step_seconds(r) for r in timing[OURS]], [step_seconds(r) for r in timing[OURS_STANDARD]]
    )
    wall = paired_ratios(
        [step_seconds(r, "wall_s") for r in timing[OURS]],
        [step_seconds(r, "wall_s") for r in timing[OURS_STANDARD]],
    )
    goals = {
        "peak_vs_trainer_at_8k_and_above_max": 0.5,
        "peak_vs_trl_at_8k_and_above_max": 1.0,
        "longest_fit_vs_trainer_min": 2.0,
        "step_time_vs_standard_at_shortest_max": 1.05,
    }
    vs_trainer = [bound(r["vs_trainer"]) for r in long_rows]
    vs_trl = [bound(r["vs_trl"]) for r in long_rows]
    longest_ratio = ours_longest / trainer_longest if ours_longest and trainer_longest else None
    first_losses = {
        str(seq_len): {
            v: runs[v][i]["steps"][0]["loss"]
            for v in VARIANTS
            if runs[v][i].get("fits") and runs[v][i]["steps"]
        }
        for i, seq_len in enumerate(setup.lengths)
    }
    spreads = [max(x.values()) - min(x.values()) for x in first_losses.values() if len(x) > 1]
    return {
        "by_length": by_length,
        "first_step_losses": first_losses,
        "first_step_loss_max_difference": max(spreads) if spreads else None,
        "longest_fit": longest_fit,
        "longest_fit_ratio_vs_trainer": longest_ratio,
        "longest_fit_ratio_is_lower_bound": tried_all,
        "step_time_ratio_vs_standard": {
            "cpu_median": median(ratios),
            "cpu_per_round": [round(x, 4) for x in ratios],
            "wall_median": median(wall),
        },
        "goals": goals,
        "met": {
            "peak_vs_trainer": all(
                x is not None and x <= goals["peak_vs_trainer_at_8k_and_above_max"] for x in vs_trainer
            ),
            "peak_vs_trl": all(
                x is not None and x <= goals["peak_vs_trl_at_8k_and_above_max"] for x in vs_trl
            ),
            "longest_fit": longest_ratio is not None and longest_ratio >= goals["longest_fit_vs_trainer_min"],
            "step_time": median(ratios) <= goals["step_time_vs_standard_at_shortest_max"],
        },
    }


def markdown(rep: dict[str, Any]) -> str:
    s, summary = rep["settings"], rep["summary"]
    budget = fmt_bytes(s["budget_bytes"])

    def cell(run: dict[str, Any]) -> str:
        if run.get("fits") is None:
            return "not run"
        if not run["fits"]:
            return f"does not fit in {budget}"
        return fmt_bytes(run["step_peak_above_baseline_bytes"])

    def ratio(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "n/a"
        return f"{entry['ratio']:.3f}" if "ratio" in entry else f"< {entry['at_most']:.3f}"

    rows = []
    for i, row in enumerate(summary["by_length"]):
        rows.append(
            [
                f"{row['seq_len']:,}",
                *(cell(rep["runs"][v][i]) for v in VARIANTS),
                ratio(row["vs_trainer"]),
                ratio(row["vs_trl"]),
            ]
        )
    timing = summary["step_time_ratio_vs_standard"]
    longest = summary["longest_fit"]
    lines = [
        f"## Long sequences ({rep['machine']['device']}, {rep['machine']['threads_per_run']} thread)",
        "",
        f"Llama, vocabulary {s['vocab_size']:,}, hidden {s['hidden_size']}, {s['num_layers']} blocks; NF4 QLoRA "
        f"r={s['lora_r']} on every projection, gradient checkpointing, batch 1, every token labelled; chunked loss "
        f"{s['chunk_size']} tokens per chunk. Peak RssAnon during the training steps above the process's RssAnon "
        f"after its imports; budget {budget} per run. TRL {rep['machine']['versions'].get('trl')}, "
        f"SFTTrainer loss_type={rep.get('trl_loss_type')!r}.",
        "",
        markdown_table(
            [
                "tokens",
                "lightning_paged (chunked)",
                "lightning_paged (standard)",
                "Trainer + PEFT",
                "TRL SFTTrainer",
                "chunked / Trainer",
                "chunked / TRL",
            ],
            rows,
        ),
        "",
        "Longest sequence whose step fits the budget: "
        + ", ".join(f"{v} {longest[v]:,}" if longest[v] else f"{v} none" for v in VARIANTS)
        + (" (the longest tried)" if summary["longest_fit_ratio_is_lower_bound"] else "")
        + f"; chunked / Trainer {summary['longest_fit_ratio_vs_trainer'] or 'n/a'}"
        + ("x or more." if summary["longest_fit_ratio_is_lower_bound"] else "x."),
        "",
        f"Step time at {s['lengths'][0]:,} tokens, chunked / standard (CPU time, median of {len(timing['cpu_per_round'])} "
        f"interleaved rounds): {timing['cpu_median']:.3f} (per round {timing['cpu_per_round']}; wall time "
        f"{timing['wall_median']:.3f}).",
        "",
        "First-step losses of the variants that fit (the adapters start at zero, so every variant computes the "
        f"base model's loss on the same tokens) differ by at most {summary['first_step_loss_max_difference']:.2e}.",
        "",
        "Goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in summary["met"].items()) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: a tiny model and two short lengths")
    parser.add_argument("--budget-gib", type=float, help="memory budget of each run (default 6, quick 0.25)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths, shortest first")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds at the shortest length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--report", type=Path, help="summarize the runs of an earlier result file again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        setup = Setup(**{**json.loads(args.setup), "lengths": tuple(json.loads(args.setup)["lengths"])})
        worker(args.worker, setup, args.seq_len, args.steps, args.model_dir, args.threads)
        return
    if args.report:
        report = json.loads(args.report.read_text())
        setup = Setup(**{**report["settings"], "lengths": tuple(report["settings"]["lengths"])})
        report["summary"] = summarize(setup, report["runs"], report["timing_runs"])
        write_results(NAME, report, markdown(report), args.quick, args.out_dir)
        return
    setup = QUICK if args.quick else FULL
    if args.budget_gib is not None:
        setup = replace(setup, budget_bytes=int(args.budget_gib * GIB))
    if args.lengths:
        setup = replace(setup, lengths=tuple(sorted(args.lengths)))
    if args.rounds:
        setup = replace(setup, timing_rounds=args.rounds)
    machine = machine_info(threads=args.threads)
    machine["versions"] = versions((*PACKAGES, "trl", "datasets"))
    with tempfile.TemporaryDirectory(prefix="lightning-paged-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        save_model(setup, model_dir)
        runs = memory_runs(setup, model_dir, args.threads)
        timing = timing_runs(setup, model_dir, args.threads)
    trl_runs = [r for r in runs[TRL] if r.get("trl_loss_type")]
    report = {
        "what": "peak RssAnon of one training step at long sequences: chunked loss vs Trainer + PEFT vs TRL SFTTrainer",
        "command": "python bench/long_sequence.py" + (" --quick" if args.quick else ""),
        "machine": machine,
        "settings": asdict(setup),
        "trl_loss_type": trl_runs[0]["trl_loss_type"] if trl_runs else None,
        "runs": runs,
        "timing_runs": timing,
        "summary": summarize(setup, runs, timing),
    }
    write_results(NAME, report, markdown(report), args.quick, args.out_dir)


if __name__ == "__main__":
    main()
