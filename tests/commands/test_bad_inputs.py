"""Every bad input a one-line answer: exit code 2, the setting or file named, no traceback, nothing touched.

One row per bad input, all through the command's own entry point (``main(argv)``, what the console
script calls) in this process; a few rows also run as real subprocesses. Every row runs against
one tiny finished run directory and asserts that no file in it changed. A new setting adds a row.

Placeholders in a row's arguments: ``{model}`` a tiny saved model, ``{bad}`` a directory of broken
inputs (files listed in ``broken_inputs``), ``{run}`` the finished run, ``{ckpt}`` its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_llama_config
from safetensors.torch import load_file

from lightning_paged.commands.errors import TRACEBACK_ENV
from lightning_paged.commands.main import main

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """\
vars:
  run_dir: {run}
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  strategy:
    class_path: lightning_paged.PagedQLoRAStrategy
    init_args: {{compute_dtype: float32, lora_r: 4, lora_alpha: 8, gradient_checkpointing: false}}
  max_steps: 2
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_model_summary: false
  log_every_n_steps: 1
  default_root_dir: ${{vars.run_dir}}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: "${{vars.run_dir}}", name: logs, version: latest}}
  callbacks:
    - class_path: lightning_paged.EvictionMonitor
      init_args: {{source: none}}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: "${{vars.run_dir}}/checkpoints", save_last: true}}
model:
  class_path: lightning_paged.CausalLMModule
  init_args:
    tokenizer: byte
    model_config:
      model_type: llama
      hidden_size: 32
      intermediate_size: 64
      num_hidden_layers: 1
      num_attention_heads: 2
      num_key_value_heads: 1
      max_position_embeddings: 128
    optimizer: {{name: adamw, lr: 1.0e-3, warmup_steps: 0}}
data:
  class_path: lightning_paged.InstructionDataModule
  init_args: {{data_path: {data}, tokenizer: byte, max_length: 96, batch_size: 4, val_split: 0}}
"""


@dataclass
class Row:
    id: str
    args: list[str]
    names: list[str]
    """What the error line must contain: the setting as typed, the file, the suggestion."""
    skip: str = ""
    """A reason to skip this row on this machine."""
    marks: list = field(default_factory=list)
    fresh: bool = False
    """Run into a fresh run directory, which must not exist afterwards (nothing written)."""


ROOT_USER = "root may write anywhere" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
HAS_CUDA = "a GPU is visible here" if torch.cuda.is_available() else ""

STRATEGY = "--trainer.strategy.init_args."
MODEL = "--model.init_args."
DATA = "--data.init_args."
FROM_DIR = [f"{MODEL}model_config", "null", f"{MODEL}model_name_or_path"]

ROWS = [
    # the project's own refusals, raised in __init__ and wrapped by jsonargparse
    Row(
        "target_modules",
        [f"{STRATEGY}target_modules", "all_linear"],
        ["trainer.strategy.init_args.target_modules", "all-linear"],
    ),
    Row("lora_r_zero", [f"{STRATEGY}lora_r", "0"], ["trainer.strategy.init_args.lora_r", "positive"]),
    Row("lora_r_negative", [f"{STRATEGY}lora_r", "-8"], ["trainer.strategy.init_args.lora_r", "-8"]),
    Row(
        "lora_dropout",
        [f"{STRATEGY}lora_dropout", "1.5"],
        ["trainer.strategy.init_args.lora_dropout", "[0, 1)"],
    ),
    Row(
        "ddp_spawn",
        ["--trainer.strategy", "lightning_paged.PagedQLoRADDPStrategy", f"{STRATEGY}start_method", "spawn"],
        ["trainer.strategy.init_args.start_method", "spawn"],
    ),
    Row(
        "model_dir_missing",
        [*FROM_DIR, "{bad}/no-such-model"],
        ["model.init_args.model_name_or_path", "no-such-model"],
    ),
    Row(
        "model_dir_is_file",
        [*FROM_DIR, "{bad}/data.jsonl"],
        ["model.init_args.model_name_or_path", "data.jsonl"],
    ),
    Row("model_dir_without_weights", [*FROM_DIR, "{bad}/no-weights"], ["model", "no-weights"]),
    Row("model_dir_truncated_weights", [*FROM_DIR, "{bad}/truncated-weights"], ["model"]),
    Row("model_dir_truncated_config", [*FROM_DIR, "{bad}/truncated-config"], ["model", "config.json"]),
    Row(
        "model_dir_legacy_bin",  # zip-format .bin files are streamed; the pre-1.6 format cannot be mapped
        [*FROM_DIR, "{bad}/legacy-bin"],
        ["model.init_args.model_name_or_path", "legacy format", "Convert the model once"],
    ),
    Row(
        "model_dir_and_config",
        [f"{MODEL}model_name_or_path", "{model}"],
        ["model.init_args.model_name_or_path", "exactly one"],
    ),
    Row(
        "neither_model_dir_nor_config",
        [f"{MODEL}model_config", "null"],
        ["model.init_args.model_name_or_path", "exactly one"],
    ),
    Row(
        "model_config_typo",
        [f"{MODEL}model_config.num_hiden_layers", "2"],
        ["model.init_args.model_config.num_hiden_layers", "num_hidden_layers"],
    ),
    Row(
        "model_type_typo",
        [f"{MODEL}model_config.model_type", "lama"],
        ["model.init_args.model_config.model_type", "llama"],
    ),
    Row(
        "vocab_below_tokenizer",
        [f"{MODEL}model_config.vocab_size", "100"],
        ["model.init_args.model_config.vocab_size", "259"],
    ),
    Row(
        "tokenizer_name",
        [f"{MODEL}tokenizer", "bytes", f"{DATA}tokenizer", "bytes"],
        ["model.init_args.tokenizer", "'byte'"],
    ),
    Row(
        "tokenizer_dir_empty",
        [f"{MODEL}tokenizer", "{bad}", f"{DATA}tokenizer", "{bad}"],
        ["model.init_args.tokenizer", "tokenizer.json"],
    ),
    Row(
        "data_path_missing",
        [f"{DATA}data_path", "{bad}/missing.jsonl"],
        ["data.init_args.data_path", "missing.jsonl"],
    ),
    Row("max_length_zero", [f"{DATA}max_length", "0"], ["data.init_args.max_length", "positive"]),
    Row("batch_size_zero", [f"{DATA}batch_size", "0"], ["data.init_args.batch_size", "positive"]),
    Row(
        "prompt_template_field",
        [f"{DATA}prompt_template", "{{instruction}} {{inputt}}"],
        ["data.init_args.prompt_template", "{input}"],
    ),
    # errors that were deep tracebacks
    Row(
        "ckpt_not_a_checkpoint",
        ["--ckpt_path", "{bad}/not-a-checkpoint.ckpt"],
        ["ckpt_path", "not-a-checkpoint.ckpt"],
    ),
    Row("ckpt_truncated", ["--ckpt_path", "{bad}/truncated.ckpt"], ["truncated.ckpt", "truncated"]),
    Row("ckpt_missing", ["--ckpt_path", "{bad}/no-such.ckpt"], ["ckpt_path", "does not exist"]),
    Row(
        "interpolation_missing_key",
        ["--config", "{bad}/interpolation.yaml"],
        ["${vars.max_len}", "max_length", "run_dir"],
    ),
    Row("run_dir_parent_is_file", ["--vars.run_dir", "{bad}/data.jsonl/run"], ["data.jsonl", "is a file"]),
    Row(
        "run_dir_not_writable",
        ["--vars.run_dir", "{bad}/read-only/run"],
        ["read-only", "not writable"],
        skip=ROOT_USER,
    ),
    Row("gpu_without_gpu", ["--trainer.accelerator", "gpu"], ["trainer.accelerator", "gpu"], skip=HAS_CUDA),
    Row(
        "tokenizers_differ",
        [f"{MODEL}tokenizer", "{bad}/tokenizer"],
        ["model.init_args.tokenizer", "data.init_args.tokenizer", "'byte'"],
    ),
    # silent before
    Row(
        "skip_modules_typo",
        [f"{STRATEGY}skip_modules", "[lm_haed]"],
        ["trainer.strategy.init_args.skip_modules", "lm_head", "q_proj"],
    ),
    Row(
        "loss_chunk_size_zero",
        [f"{MODEL}loss_chunk_size", "0"],
        ["model.init_args.loss_chunk_size", "positive"],
    ),
    # jsonargparse's own errors, one line each
    Row("loss_kind", [f"{MODEL}loss", "fused"], ["model.init_args.loss", "chunked", "standard"]),
    Row(
        "offload_activations_not_a_bool",
        [f"{STRATEGY}offload_activations", "maybe"],
        ["trainer.strategy.init_args.offload_activations", "maybe"],
    ),
    Row(
        "scheduler_typo",
        [f"{MODEL}optimizer.scheduler", "cosin"],
        ["model.init_args.optimizer.scheduler", "cosine"],
    ),
    Row(
        "quant_type", [f"{STRATEGY}quant_type", "nf5"], ["trainer.strategy.init_args.quant_type", "nf4, fp4"]
    ),
    Row(
        "compute_dtype",
        [f"{STRATEGY}compute_dtype", "bf16"],
        ["trainer.strategy.init_args.compute_dtype", "Did you mean 'bfloat16'"],
    ),
    Row(
        "lr_not_a_number",
        [f"{MODEL}optimizer.lr", "fast"],
        ["model.init_args.optimizer.lr", "a number", "fast"],
    ),
    Row(
        "max_steps_not_a_number",
        ["--trainer.max_steps", "four"],
        ["trainer.max_steps", "whole number", "four"],
    ),
    Row(
        "monitor_source",
        ["--config", "{bad}/monitor.yaml"],
        ["trainer.callbacks.init_args.source", "cupti", "nvml"],
    ),
    Row(
        "model_class_typo",
        ["--model.class_path", "lightning_paged.CausalLMModul"],
        ["model.class_path", "lightning_paged.CausalLMModule"],
    ),
    Row(
        "strategy_class_typo",
        ["--trainer.strategy.class_path", "lightning_paged.PagedQLoRAStrategyy"],
        ["trainer.strategy.class_path", "PagedQLoRAStrategy?"],
    ),
    Row("strategy_name_typo", ["--trainer.strategy", "paged_qlroa"], ["trainer.strategy", "paged_qlora"]),
    Row(
        "unknown_strategy_setting",
        [f"{STRATEGY}lora_rank", "8"],
        ["trainer.strategy.init_args.lora_rank", "Did you mean 'lora_r'"],
    ),
    Row(
        "unknown_trainer_option", ["--trainer.max_stpes", "3"], ["--trainer.max_stpes", "--trainer.max_steps"]
    ),
    Row(
        "unknown_config_key",
        ["--config", "{bad}/unknown-key.yaml"],
        ["trainer.max_stepz", "trainer.max_steps"],
    ),
    Row("automatic_optimizer", ["--optimizer", "Adam"], ["--optimizer", "model.init_args.optimizer"]),
    Row(
        "optimizer_name_typo",
        [f"{MODEL}optimizer.name", "paged_adamw_8bt"],
        ["model.init_args.optimizer.name", "paged_adamw_8bit"],
    ),
    Row(
        "optimizer_lr_negative", [f"{MODEL}optimizer.lr", "-1"], ["model.init_args.optimizer.lr", "positive"]
    ),
    Row(
        "warmup_past_max_steps",
        [f"{MODEL}optimizer.warmup_steps", "2"],
        ["model.init_args.optimizer.warmup_steps", "trainer.max_steps"],
    ),
    Row("seed_not_a_number", ["--seed_everything", "abc"], ["seed_everything", "whole number"]),
    Row("yaml_syntax", ["--config", "{bad}/syntax.yaml"], ["syntax.yaml:3:", "YAML"]),
    Row("config_missing", ["--config", "{bad}/no-such.yaml"], ["config", "no-such.yaml"]),
    Row("precision_conflict", ["--trainer.precision", "16-true"], ["trainer.precision", "compute_dtype"]),
    Row("data_not_json", [f"{DATA}data_path", "{bad}/not-json.jsonl"], ["data.init_args.data_path", "JSON"]),
    Row("data_empty", [f"{DATA}data_path", "{bad}/empty.jsonl"], ["data.init_args.data_path", "empty"]),
    # values YAML reads as a comment: named, with how to give them
    Row(
        "prompt_template_starting_with_hash",
        [f"{DATA}prompt_template", "### Question: {{instruction}}{{input}} ### Answer:"],
        [
            "--data.init_args.prompt_template",
            "starts with #",
            "comment",
            '--data.init_args \'{"prompt_template"',
        ],
        fresh=True,
    ),
    Row(
        "prompt_template_starting_with_hash_in_a_config",
        ["--config", "{bad}/hash-template.yaml"],
        ["data.init_args.prompt_template", "comment", 'quote it in the config (prompt_template: "### ...")'],
        fresh=True,
    ),
    Row(
        "sample_prompt_starting_with_hash",  # optional: it would have switched the sample off silently
        [f"{MODEL}sample_prompt", "#hashtags"],
        ["--model.init_args.sample_prompt", "starts with #"],
    ),
    # Lightning's own refusal, after the model loaded and logs were written: now before either
    Row(
        "val_check_interval_past_the_epoch",
        ["--trainer.val_check_interval", "5", "--trainer.limit_val_batches", "1"],
        ["trainer.val_check_interval", "4 training batches", "16 training samples in batches of 4", "null"],
        fresh=True,
    ),
    Row(
        "predict_is_left_out",
        ["predict", "--config", "{config}"],
        ["predict is not", "lightning-paged export"],
    ),
    # resume refusals: one line, before anything is written
    Row(
        "resume_other_settings",
        ["--ckpt_path", "{ckpt}", f"{STRATEGY}lora_r", "8"],
        ["lora_r"],
    ),
    Row(
        "resume_other_base",
        ["--ckpt_path", "{ckpt}", f"{MODEL}model_config.hidden_size", "64"],
        ["hidden_size"],
    ),
    # the other commands
    Row("export_missing_run", ["export", "{bad}/no-such-run", "--out", "{bad}/export"], ["no-such-run"]),
    Row("report_missing_log", ["report", "{bad}/no-such.jsonl"], ["no-such.jsonl"]),
]
SUBPROCESS_ROWS = ["lora_r_zero", "yaml_syntax"]


def write_data(path: Path) -> Path:
    words = ["tiger", "lion", "cat", "dog", "owl", "fox", "bee", "elk"] * 2
    path.write_text(
        "".join(json.dumps({"instruction": f"Uppercase: {w}", "output": w.upper()}) + "\n" for w in words)
    )
    return path


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The tiny model, a finished run, and one directory of broken inputs, made once."""
    from transformers import LlamaForCausalLM

    base = tmp_path_factory.mktemp("bad-inputs")
    data = write_data(base / "data.jsonl")
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=259, num_hidden_layers=1)  # the byte tokenizer's 259 ids
    model = base / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    run = base / "run"
    config_file = base / "config.yaml"
    config_file.write_text(CONFIG.format(run=run, data=data))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning-paged"])
        assert main(["fit", "--config", str(config_file)]) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {
        "base": base,
        "config": config_file,
        "model": model,
        "run": run,
        "ckpt": ckpt,
        "bad": broken_inputs(base, model, data),
    }


def broken_inputs(base: Path, model: Path, data: Path) -> Path:
    bad = base / "bad"
    bad.mkdir()
    shutil.copy(data, bad / "data.jsonl")
    (bad / "not-json.jsonl").write_text("this is not json\n")
    (bad / "empty.jsonl").write_text("")
    (bad / "no-weights").mkdir()
    shutil.copy(model / "config.json", bad / "no-weights" / "config.json")
    shutil.copytree(model, bad / "truncated-weights")
    weights = bad / "truncated-weights" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(model, bad / "truncated-config")
    (bad / "legacy-bin").mkdir()
    shutil.copy(model / "config.json", bad / "legacy-bin" / "config.json")
    legacy = bad / "legacy-bin" / "pytorch_model.bin"
    torch.save(load_file(model / "model.safetensors"), legacy, _use_new_zipfile_serialization=False)
    config = bad / "truncated-config" / "config.json"
    config.write_text(config.read_text()[:40])
    (bad / "tokenizer").mkdir()
    (bad / "tokenizer" / "tokenizer_config.json").write_text("{}")
    torch.save({"not": torch.nn.Linear(2, 2)}, bad / "not-a-checkpoint.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(256)}}, bad / "full.ckpt")
    (bad / "truncated.ckpt").write_bytes((bad / "full.ckpt").read_bytes()[:700])
    (bad / "interpolation.yaml").write_text("data:\n  init_args:\n    max_length: ${vars.max_len}\n")
    (bad / "monitor.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_paged.EvictionMonitor\n      init_args: {source: nvml}\n"
    )
    (bad / "unknown-key.yaml").write_text("trainer:\n  max_stepz: 3\n")
    (bad / "syntax.yaml").write_text("trainer:\n  max_steps: [3\n")
    (bad / "hash-template.yaml").write_text(
        "data:\n  init_args:\n    prompt_template: ### Q {instruction}{input}\n"
    )
    (bad / "read-only").mkdir()
    (bad / "read-only").chmod(0o555)
    return bad


def digest(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` and the hash of its content."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def argv_of(row: Row, inputs: dict[str, Path]) -> list[str]:
    values = {k: str(v) for k, v in inputs.items()}
    args = [a.format(**values) for a in row.args]
    if args[0] in ("export", "report", "predict"):
        return args
    run = fresh_run_dir(row, inputs) if row.fresh else values["run"]
    return ["fit", "--config", values["config"], "--vars.run_dir", str(run), *args]


def fresh_run_dir(row: Row, inputs: dict[str, Path]) -> Path:
    return inputs["base"] / f"fresh-{row.id}"


def error_line(stderr: str) -> str:
    lines = [
        line for line in stderr.splitlines() if ": error: " in line and line.startswith("lightning-paged")
    ]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def check_answer(row: Row, code: int, out: str, err: str) -> None:
    assert code == 2, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    line = error_line(err)
    assert "\n" not in line
    for name in row.names:
        assert name in line, f"{name!r} not in: {line}"


def params(rows: list[Row]) -> list:
    return [
        pytest.param(r, id=r.id, marks=[*r.marks, *([pytest.mark.skip(reason=r.skip)] if r.skip else [])])
        for r in rows
    ]


@pytest.mark.parametrize("row", params(ROWS))
def test_bad_input_is_one_line_and_changes_nothing(row, inputs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-paged"])  # LightningCLI warns when it also sees pytest's
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    before = digest(inputs["run"])
    code = main(argv_of(row, inputs))
    captured = capsys.readouterr()
    check_answer(row, code, captured.out, captured.err)
    assert digest(inputs["run"]) == before
    assert not fresh_run_dir(row, inputs).exists()  # a fresh run directory gets nothing at all


@pytest.mark.parametrize("row", params([r for r in ROWS if r.id in SUBPROCESS_ROWS]))
def test_bad_input_from_the_console(row, inputs):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(TRACEBACK_ENV, None)
    before = digest(inputs["run"])
    result = subprocess.run(
        [sys.executable, "-m", "lightning_paged", *argv_of(row, inputs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    check_answer(row, result.returncode, result.stdout, result.stderr)
    assert digest(inputs["run"]) == before


def test_traceback_flag_and_variable_show_the_full_trace(inputs, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lightning-paged"])
    row = next(r for r in ROWS if r.id == "lora_r_zero")
    with pytest.raises(Exception, match="lora_r must be a positive integer") as raised:
        main([*argv_of(row, inputs), "--traceback"])
    assert raised.value.__cause__ is not None  # the error as jsonargparse raised it is kept
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(Exception, match="lora_r must be a positive integer"):
        main(argv_of(row, inputs))


def test_a_bug_keeps_its_traceback(inputs, monkeypatch):
    """Only bad input is shortened: an error the project does not know as one propagates."""
    from lightning_paged.lightning.module import CausalLMModule

    def broken(self, *args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(sys, "argv", ["lightning-paged"])
    monkeypatch.setattr(CausalLMModule, "configure_optimizers", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["fit", "--config", str(inputs["config"]), "--vars.run_dir", str(inputs["base"] / "bug-run")])


def test_library_users_keep_the_exception_type_and_message():
    from lightning_paged import PagedQLoRAStrategy
    from lightning_paged.core.errors import SettingError

    with pytest.raises(
        SettingError, match=r"^trainer\.strategy\.init_args\.lora_r must be a positive integer"
    ):
        PagedQLoRAStrategy(lora_r=0)


def test_skip_modules_entry_must_match_a_layer_but_the_default_head_may_not(tiny_llama):
    from lightning_paged.core.errors import SettingError
    from lightning_paged.core.qlora import QLoRAConfig, select_layers

    with pytest.raises(SettingError, match=r"skip_modules match no linear layer.*q_proj"):
        select_layers(tiny_llama, QLoRAConfig(skip_modules=["lm_haed"]))
    headless = tiny_llama.model  # no lm_head: the default entry matches nothing and that is fine
    _, quantized, _ = select_layers(headless, QLoRAConfig())
    assert quantized and not any("lm_head" in n for n in quantized)


def test_causal_lm_module_warns_once_without_a_qlora_strategy(inputs):
    from lightning_paged.lightning.module import CausalLMModule

    module = CausalLMModule(model_name_or_path=str(inputs["model"]))
    module.trainer = quiet_trainer()
    with pytest.warns(UserWarning, match="not a QLoRA strategy.*paged_qlora"):
        module.setup("fit")


def test_help_says_how_to_see_the_trace(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-paged"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--traceback" in capsys.readouterr().out
