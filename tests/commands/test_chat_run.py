"""One ``lightning-paged fit`` of every data format with a ChatML tokenizer and a Qwen2-shaped model directory,
then what a user does after: the loss masking of each format, the sample as the model received it, the exported
adapter with its tokenizer files giving the sample path's logits in PEFT, and ``lightning-paged generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from lightning_paged.core.packing import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "Uppercase: vivid"
CHAT = [{"role": "user", "content": "Uppercase: vivid"}, {"role": "assistant", "content": "VIVID"}]
CHAT2 = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "Uppercase: cedar"},
    {"role": "assistant", "content": "CEDAR"},
    {"role": "user", "content": "Now reverse it."},
    {"role": "assistant", "content": "RADEC"},
]
SHAREGPT = [{"from": "human", "value": "Uppercase: amber"}, {"from": "gpt", "value": "AMBER"}]
ROWS = [  # every format in one file; the completion sits under the file's own name 'answer'
    {"messages": CHAT},
    {"messages": CHAT2},
    {"conversations": SHAREGPT},
    {"instruction": "Reverse", "input": "lemon", "output": "nomel"},
    {"prompt": "Uppercase: orbit ->", "answer": " ORBIT"},
    {"text": "The tiger and the ocean."},
]


def config(run_dir: Path, base: Path, tokenizer: str, data: Path, val: Path) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "strategy": {
                "class_path": "lightning_paged.PagedQLoRAStrategy",
                "init_args": {
                    "compute_dtype": "float32",
                    "lora_r": 4,
                    "lora_alpha": 8,
                    "gradient_checkpointing": False,
                },
            },
            "max_steps": 4,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            "default_root_dir": str(run_dir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "logs", "version": "latest"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(run_dir / "checkpoints"),
                        "save_last": True,
                        "every_n_train_steps": 4,
                    },
                },
                {"class_path": "conftest.RecordBatches", "init_args": {"path": str(run_dir / "record.pt")}},
            ],
        },
        "model": {
            "class_path": "lightning_paged.CausalLMModule",
            "init_args": {
                "model_name_or_path": str(base),
                "tokenizer": tokenizer,
                "optimizer": {"name": "adamw", "lr": 1.0e-2, "scheduler": "cosine", "warmup_ratio": 0.25},
                "sample_prompt": SAMPLE,
                "sample_max_new_tokens": 6,
            },
        },
        "data": {
            "class_path": "lightning_paged.InstructionDataModule",
            "init_args": {
                "data_path": str(data),
                "val_path": str(val),
                "tokenizer": tokenizer,
                "max_length": 128,
                "batch_size": 6,
                "columns": {"completion": "answer"},
            },
        },
    }


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chatml_tokenizer):
    """The run directory, its base model directory and the command's output."""
    import datasets
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("chat_run")
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    torch.manual_seed(0)
    qwen2 = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(qwen2).save_pretrained(root / "base")
    data = root / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    datasets.Dataset.from_list([{"messages": CHAT2}, {"messages": CHAT}]).to_parquet(
        str(root / "val.parquet")
    )
    run_dir = root / "run"
    (root / "config.yaml").write_text(
        yaml.safe_dump(config(run_dir, root / "base", chatml_tokenizer, data, root / "val.parquet"))
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    result = subprocess.run(
        [sys.executable, "-m", "lightning_paged", "fit", "--config", str(root / "config.yaml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, root / "base", result.stdout + result.stderr


def test_every_format_trains_through_the_command_with_its_loss_masking(chat_run, chatml_tokenizer):
    run_dir, _, output = chat_run
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    eos = tokenizer.eos_token  # <|im_end|>: ChatML's end of turn is this tokenizer's end of sequence
    assert "Instruction data: 6 training and 2 validation samples" in output
    assert "(2 messages, 1 sharegpt, 1 alpaca, 1 prompt_completion, 1 text)" in output
    assert "Conversations rendered with the tokenizer's chat template" in output
    batch = torch.load(run_dir / "record.pt", weights_only=True)["batch"]
    rows = {}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        rows[tokenizer.decode(ids)] = (ids, tokenizer.decode([t for t in labels if t != IGNORE_INDEX]))
    assert len(rows) == 6

    def row(ids: list[int]) -> str:
        text = tokenizer.decode(ids)
        assert text in rows, text
        assert rows[text][0] == ids
        return rows[text][1]

    sharegpt = [
        {"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]} for m in SHAREGPT
    ]
    assert row(tokenizer.apply_chat_template(CHAT)["input_ids"]) == f"VIVID{eos}"
    assert row(tokenizer.apply_chat_template(CHAT2)["input_ids"]) == f"CEDAR{eos}RADEC{eos}"
    assert row(tokenizer.apply_chat_template(sharegpt)["input_ids"]) == f"AMBER{eos}"
    alpaca = tokenizer.encode(
        "### Instruction:\nReverse\n\n### Input:\nlemon\n\n### Response:\n"
    ) + tokenizer.encode("nomel")
    assert row([*alpaca, tokenizer.eos_token_id]) == f"nomel{eos}"
    completion = tokenizer.encode("Uppercase: orbit ->") + tokenizer.encode(" ORBIT")
    assert row([*completion, tokenizer.eos_token_id]) == f" ORBIT{eos}"
    text = [*tokenizer.encode("The tiger and the ocean."), tokenizer.eos_token_id]
    assert row(text) == tokenizer.decode(text)  # every token
    losses = [
        line for line in (run_dir / "logs" / "latest" / "metrics.csv").read_text().splitlines()[1:] if line
    ]
    assert len(losses) >= 4


def test_the_sample_is_prompted_through_the_template_and_logged_as_the_model_received_it(
    chat_run, chatml_tokenizer
):
    run_dir, _, output = chat_run
    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": SAMPLE}], tokenize=False, add_generation_prompt=True
    )
    record = torch.load(run_dir / "record.pt", weights_only=True)
    assert record["prompt_text"] == rendered and rendered.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(record["stop_ids"]) == ["<|im_end|>"]
    lines = [line for line in output.splitlines() if line.startswith("Sample at step 4: ")]
    assert len(lines) == 1 and lines[0].startswith(f"Sample at step 4: {rendered!r} -> ")


def test_the_exported_adapter_and_tokenizer_give_the_sample_paths_logits_in_peft(chat_run, tmp_path, capsys):
    from peft import PeftModel

    from lightning_paged.commands.export import main as export

    run_dir, base, _ = chat_run
    out = tmp_path / "adapter"
    assert export([str(run_dir), "--out", str(out)]) == 0
    assert "Tokenizer files of" in capsys.readouterr().out
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)  # what a user serving the adapter loads
    ids = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE}], add_generation_prompt=True)[
        "input_ids"
    ]
    record = torch.load(run_dir / "record.pt", weights_only=True)
    assert ids == record["prompt_ids"]
    model = PeftModel.from_pretrained(load_4bit(base), str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    torch.testing.assert_close(logits, record["logits"], rtol=0, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():  # the adapter is what makes them equal
        assert not torch.allclose(
            model(input_ids=torch.tensor([ids])).logits[0, -1].float(), record["logits"], atol=1e-3
        )


def test_generate_answers_a_prompts_file_as_the_runs_sample_did(chat_run, tmp_path, capsys):
    from lightning_paged.commands.generate import main as generate

    run_dir, _, output = chat_run
    sample = next(line for line in output.splitlines() if line.startswith("Sample at step 4: "))
    prompts = tmp_path / "prompts.jsonl"
    conversation = [*CHAT, {"role": "user", "content": "Now reverse it."}]
    prompts.write_text(json.dumps({"prompt": SAMPLE}) + "\n" + json.dumps({"messages": conversation}) + "\n")
    out = tmp_path / "completions.jsonl"
    assert (
        generate([str(run_dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "6"]) == 0
    )
    assert "Wrote 2 completions" in capsys.readouterr().out
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    record = torch.load(run_dir / "record.pt", weights_only=True)
    assert first["prompt"] == SAMPLE and first["rendered"] == record["prompt_text"]
    # the same model, prompt and greedy decoding as the run's last sample: the same answer
    assert sample.endswith(f" -> {first['completion']!r}") or sample.split(" -> ")[1].startswith(
        f"{first['completion']!r} ("
    )
    assert second["rendered"].endswith(
        "VIVID<|im_end|>\n<|im_start|>user\nNow reverse it.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        generate([str(run_dir), "--prompts", str(prompts), "--out", str(out)]) == 2
    )  # no overwrite by default
    assert "already exists" in capsys.readouterr().err


def load_4bit(base: Path):
    """The base model as PEFT users load it: 4-bit NF4 with double quantization, float32 compute."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization, dtype=torch.float32, device_map="cpu"
    )
    for layer in model.modules():  # CPU inference repacking stores absmax in bfloat16; compare like with like
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return model
