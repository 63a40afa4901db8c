"""Shared test fixtures: tiny models built from a config, no downloads."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_paged.testing import tiny_llama_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_seed_left_behind():
    """``seed_everything`` (the command's ``seed_everything:`` too) leaves its seed in ``os.environ``, and the
    QLoRA strategies, like Lightning's parallel ones, re-seed from it before adding adapters: a later
    test (or a benchmark it starts) must not inherit another test's seed."""
    yield
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        os.environ.pop(name, None)


def quiet_trainer(**overrides):
    """A CPU Trainer without logger, checkpoints, progress bar or sanity validation; ``overrides`` win."""
    import lightning.pytorch as pl

    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(overrides)
    return pl.Trainer(**settings)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture
def launcher_environ(monkeypatch):
    """A copy of ``os.environ`` for the test: Lightning's process launcher writes ``LOCAL_RANK``,
    ``WORLD_SIZE`` and ``MASTER_PORT`` into it, and a later multi-process test that inherited them
    would take itself for an already launched rank."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"

_LAUNCH_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "GROUP_RANK")


def child_env(**extra: str) -> dict[str, str]:
    """This checkout's environment for a child process, without what earlier tests of the session left:
    a ``PL_GLOBAL_SEED`` (``seed_everything``) makes Lightning re-seed in some places and not others,
    and launch variables make a child take itself for an already launched rank."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PL_") and k not in _LAUNCH_VARS}
    return {**inherited, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(name: str, out_dir: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<name>`` on this checkout with ``out_dir`` as its argument and working directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / name), str(out_dir)],
        env=env,
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def assert_ranks_agree(out_dir: Path) -> dict[str, torch.Tensor]:
    """The two ranks' ``rank<N>.pt`` of a DDP script: same 4-bit base, same trained adapters; rank 0's LoRA."""
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    # every rank quantized rank zero's weights, so the 4-bit data and its constants agree
    torch.testing.assert_close(ranks[0]["packed"], ranks[1]["packed"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["absmax"], ranks[1]["absmax"], rtol=0, atol=0)
    lora0, lora1 = ranks[0]["lora"], ranks[1]["lora"]
    assert set(lora0) == set(lora1) and lora0
    for name in lora0:
        torch.testing.assert_close(lora0[name], lora1[name], rtol=0, atol=0, msg=name)
    assert any(t.abs().sum() > 0 for n, t in lora0.items() if "lora_B" in n)  # it trained
    return lora0


def failing_torch_save(real_save):
    """torch.save that writes half of the checkpoint, then fails like a full disk."""

    def save(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    return save


@pytest.fixture
def private_hash_cache(tmp_path, monkeypatch):
    """A fresh base-model hash cache for the test, instead of the user's."""
    monkeypatch.setenv("LIGHTNING_PAGED_CACHE_DIR", str(tmp_path / "cache"))


def tiny_checkpoint_config(**overrides):
    """The smallest Llama of the checkpoint tests: one layer, 32 wide, a 64-token vocabulary."""
    settings = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    settings.update(overrides)
    return tiny_llama_config(num_key_value_heads=1, **settings)


class SimulatedCrash(RuntimeError):
    """What the crash callbacks raise: a failure in the middle of a fit."""


def crash_at(step: int):
    """A callback that raises when step ``step + 1`` starts, after the checkpoint of step ``step``."""
    import lightning.pytorch as pl

    class CrashAt(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == step:
                raise SimulatedCrash(f"crash at step {step + 1}")

    return CrashAt()


def trainable_weights(module) -> dict[str, torch.Tensor]:
    """Copies of a module's trainable (adapter) weights."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# Chat templates shaped like those of real instruct models, for tokenizers the tests build.
CHATML = (  # Qwen2-Instruct's: ChatML with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_GENERATION = (  # the same, with {% generation %} around each assistant turn's content and end-of-turn token
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3 = (  # Phi-3-mini-instruct's: turns end with <|end|>, the conversation with the tokenizer's eos
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
CHAT_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]


def build_chat_tokenizer(directory: Path, template: str | None = CHATML, eos: str = "<|im_end|>") -> str:
    """A small byte-level BPE (trained on the shipped example data) saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = [
        line
        for name in ("chat.jsonl", "instructions.jsonl")
        for line in (ROOT / "examples" / "data" / name).open()
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=CHAT_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=eos,
        pad_token="<|endoftext|>",
        additional_special_tokens=CHAT_SPECIAL_TOKENS[1:],
        chat_template=template,
    )
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory) -> str:
    """A directory holding a ChatML tokenizer shaped like Qwen2-Instruct's (eos ``<|im_end|>``)."""
    return build_chat_tokenizer(tmp_path_factory.mktemp("chatml_tokenizer"))


@pytest.fixture(scope="session")
def phi3_tokenizer(tmp_path_factory) -> str:
    """A directory holding a tokenizer shaped like Phi-3's: turns end with ``<|end|>``, eos is ``<|endoftext|>``."""
    return build_chat_tokenizer(tmp_path_factory.mktemp("phi3_tokenizer"), PHI3, eos="<|endoftext|>")


class RecordBatches(pl.Callback):
    """A callback for command runs: saves the first training batch, then, when training ends, the sample
    path's prompt, stop tokens and next-token logits, to ``path`` (``torch.save``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batch: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = {k: v.detach().cpu() for k, v in batch.items() if torch.is_tensor(v)}

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module):
        prompt, stop_ids = pl_module.prompt_for(pl_module.sample_prompt)
        pl_module.model.eval()
        logits = pl_module.model(input_ids=torch.tensor([prompt.ids], device=pl_module.device)).logits
        record = {
            "batch": self.batch,
            "prompt_ids": prompt.ids,
            "prompt_text": prompt.text,
            "stop_ids": stop_ids,
        }
        torch.save({**record, "logits": logits[0, -1].float().cpu()}, self.path)
