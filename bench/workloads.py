"""The model, data and training runs the benchmarks put side by side.

One :class:`Workload` describes a Llama built from a config, its QLoRA settings and its data. Each
``run_*`` function trains it one way, in the calling (worker) process, and returns the same record:
end-of-step timestamps (wall and CPU time), per-step losses, peak host memory (and GPU memory on a GPU), set-up time.

- :func:`run_lightning_paged`: ``Trainer.fit`` with ``PagedQLoRAStrategy`` and ``PagedOptimizerMixin``;
- :func:`run_hand_written`: bitsandbytes ``Linear4bit`` swapped in by hand, PEFT ``get_peft_model``, a
  bitsandbytes paged 8-bit AdamW and a plain ``for`` loop (what the strategy automates);
- :func:`run_transformers_trainer`: the usual QLoRA recipe, ``from_pretrained`` with a
  ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``, ``get_peft_model`` and ``Trainer`` with
  ``optim="paged_adamw_8bit"``.

All three quantize the same weights the same way (NF4, double quantization, blocks of 64), put LoRA on
the same seven projections of every block with the same initial values (the generator is seeded right
before the adapters are made), and see the same batches in the same order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from common import MemoryWindow

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Every linear layer of a Llama block; ``lm_head`` stays unquantized and without adapters."""
PHRASE = 16
"""Each sequence repeats a random phrase of this many tokens, so the loss has something to learn."""
ACTIVE_VOCAB = 32
"""Phrases draw from one token id in this many (the lowest ids), a second thing to learn quickly."""


@dataclass
class Workload:
    """A Llama built from a config, its QLoRA settings and its synthetic data."""

    hidden_size: int = 512
    intermediate_size: int = 1408
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 8192
    batch_size: int = 4
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence."""
    steps: int = 30
    """Optimizer steps per run."""
    lr: float = 3e-3
    lora_r: int = 16
    lora_alpha: int = 32
    optimizer: str = "paged_adamw_8bit"
    """Optimizer name as transformers' ``TrainingArguments.optim`` spells it."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the 4-bit matmuls; float32 is the fast one on most CPUs."""
    gradient_checkpointing: bool = False
    device: str = "cpu"
    seed: int = 0
    attn_implementation: str | None = None
    """Attention kernel (``sdpa``, ``eager``, ``flash_attention_2``); None: transformers' default."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))

    def llama_config(self) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=max(self.seq_len, 128),
            tie_word_embeddings=False,
            attention_dropout=0.0,
            **({"attn_implementation": self.attn_implementation} if self.attn_implementation else {}),
        )

    def parameter_count(self) -> int:
        """Parameters of the model before conversion (embeddings, blocks, norms, head)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = h * self.num_kv_heads // self.num_heads
        block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return 2 * v * h + self.num_layers * block + h

    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


TINY = Workload(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=256,
    batch_size=2,
    seq_len=32,
    steps=8,
)
"""The smallest workload: every script's --quick setting (smoke tests), resized with ``dataclasses.replace``."""


def preload(variant: str) -> None:
    """Import what a run needs before its memory window opens, so imports count in no run's set-up."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    if variant == "lightning_paged":
        import lightning.pytorch  # noqa: F401

        import lightning_paged.lightning.mixin
        import lightning_paged.lightning.strategies  # noqa: F401
    elif variant == "transformers_trainer":
        from transformers import Trainer  # noqa: F401


def make_batches(workload: Workload) -> list[dict[str, Any]]:
    """``steps`` batches of ``batch_size`` sequences, each a random phrase repeated to ``seq_len`` tokens.

    The phrases use the lowest ``vocab_size / ACTIVE_VOCAB`` token ids only, so the loss falls within a
    few dozen steps from about ``ln(vocab_size)`` even on a randomly initialised model.
    """
    import torch

    generator = torch.Generator().manual_seed(workload.seed + 1000)
    phrase = min(PHRASE, max(2, workload.seq_len // 2))
    repeats = math.ceil(workload.seq_len / phrase)
    active = max(2, workload.vocab_size // ACTIVE_VOCAB)
    out = []
    for _ in range(workload.steps):
        phrases = torch.randint(0, active, (workload.batch_size, phrase), generator=generator)
        ids = phrases.repeat(1, repeats)[:, : workload.seq_len].contiguous()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def build_model(workload: Workload, source: Path | None = None) -> Any:
    """The model: built from the config with the workload's seed (float32), or loaded from ``source``.

    Loaded in the compute dtype, as the transformers recipe loads it (``dtype=compute``), so both
    quantize the same values; a model built from the config is cast to it by the conversion.
    """
    import torch
    from transformers import LlamaForCausalLM

    if source is not None:
        return LlamaForCausalLM.from_pretrained(str(source), dtype=_dtype(workload.compute_dtype))
    torch.manual_seed(workload.seed)
    return LlamaForCausalLM(workload.llama_config())


def save_model(workload: Workload, directory: Path) -> None:
    """Save the seeded model with ``save_pretrained`` (what transformers' 4-bit loading reads)."""
    build_model(workload).save_pretrained(str(directory))


def _seed_adapters(workload: Workload) -> None:
    import torch

    torch.manual_seed(workload.seed + 1)


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def gpu_memory(device: str) -> dict[str, Any] | None:
    """Device memory of a run, counted the same way for every variant, managed memory included.

    ``torch.cuda.max_memory_allocated`` never sees managed (paged) memory: bitsandbytes allocates it
    with ``cudaMallocManaged``, outside the caching allocator. ``peak_device_bytes`` is the
    allocator's peak reservation (what it took from the driver) plus the optimizer state in paged
    memory (bitsandbytes' list of paged buffers, sizes only; resident on the GPU unless evicted), so a
    variant that pages more of its state is not flattered. ``used_at_end_bytes`` is what
    ``cudaMemGetInfo`` counts as used when the run ends (context and other processes included).
    """
    import torch

    from lightning_paged.core.eviction.paged import PagedBytes

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    paged = PagedBytes(torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.max_memory_reserved()
    return {
        "peak_device_bytes": reserved + paged(),
        "max_allocated_bytes": torch.cuda.max_memory_allocated(),
        "max_reserved_bytes": reserved,
        "paged_state_bytes": paged(),
        "paged_capacity_bytes": paged.capacity(),
        "used_at_end_bytes": total - free,
        "device_name": torch.cuda.get_device_name(),
    }


class Clock:
    """End-of-step stamps: wall time, and this process's CPU time (which other processes on a shared
    machine barely disturb, where they stretch wall time)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def stamp(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


def _record(
    variant: str,
    clock: Clock,
    losses: list[float],
    window: MemoryWindow,
    started: float,
    trainable: int,
    workload: Workload,
) -> dict[str, Any]:
    import torch

    return {
        "variant": variant,
        "stamps": clock.wall,
        "cpu_stamps": clock.cpu,
        "losses": losses,
        "memory": window.result(),
        "gpu_memory": gpu_memory(workload.device),
        "setup_s": clock.wall[0] - started if clock.wall else None,
        "trainable_params": trainable,
        "threads": torch.get_num_threads(),
    }


# --- the hand-written loop ----------------------------------------------------------------------------


def quantize_by_hand(model: Any, workload: Workload) -> int:
    """Swap every ``nn.Linear`` but ``lm_head`` for an NF4 double-quantized bitsandbytes ``Linear4bit``."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    compute = _dtype(workload.compute_dtype)
    count = 0
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear) or name.endswith("lm_head"):
            continue
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=torch.uint8,
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer
        )
        layer.weight = weight.to(workload.device)  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        count += 1
    model.is_loaded_in_4bit = True  # PEFT then picks its 4-bit LoRA layer
    return count


def run_hand_written(workload: Workload, source: Path | None = None) -> dict[str, Any]:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader

    if workload.compute_dtype != "float32":
        raise ValueError(
            "the hand-written loop keeps non-quantized weights in float32: use compute_dtype float32"
        )
    if workload.optimizer != "paged_adamw_8bit":
        raise ValueError("the hand-written loop uses bitsandbytes' paged 8-bit AdamW: use paged_adamw_8bit")
    window = MemoryWindow()
    started = time.perf_counter()
    model = build_model(workload, source).to(workload.device)
    quantize_by_hand(model, workload)
    for param in model.parameters():
        param.requires_grad_(False)
    _seed_adapters(workload)
    lora = LoraConfig(
        r=workload.lora_r, lora_alpha=workload.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS
    )
    model = get_peft_model(model, lora)
    if workload.gradient_checkpointing:
        inner = model.base_model.model
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        inner.enable_input_require_grads()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW(trainable, lr=workload.lr, weight_decay=0.0, optim_bits=8, is_paged=True)
    loader = DataLoader(make_batches(workload), batch_size=None, shuffle=False)
    model.train()
    losses: list[float] = []
    clock = Clock()
    clock.stamp()
    for batch in loader:
        batch = {k: v.to(workload.device) for k, v in batch.items()}
        loss = model(**batch).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.stamp()
    return _record(
        "hand_written", clock, losses, window, started, sum(p.numel() for p in trainable), workload
    )


# --- lightning_paged ----------------------------------------------------------------------------------


def lightning_module(model: Any, workload: Workload) -> Any:
    """A LightningModule holding ``model``: loss per step, optimizer by name from ``PagedOptimizerMixin``."""
    import lightning.pytorch as pl
    import torch

    from lightning_paged.core.optimizers import OptimizerConfig
    from lightning_paged.lightning.mixin import PagedOptimizerMixin

    class BenchModule(PagedOptimizerMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.optimizer_config = OptimizerConfig(name=workload.optimizer, lr=workload.lr)
            self.losses: list[float] = []

        def setup(self, stage: str) -> None:
            super().setup(stage)
            _seed_adapters(workload)  # the strategy makes the adapters right after this

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

    return BenchModule()


def step_clock() -> Any:
    """A callback that stamps the start of training and the end of every training batch."""
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.clock = Clock()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.clock.stamp()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if pl_module.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            self.clock.stamp()

    return StepClock()


def run_lightning_paged(
    workload: Workload,
    source: Path | None = None,
    callbacks: list[Any] | None = None,
    batches: list[dict[str, Any]] | None = None,
    ckpt_path: str | None = None,
    managed_memory: Any = None,
    root_dir: str | None = None,
) -> dict[str, Any]:
    """``batches`` replaces the workload's own (one optimizer step each); ``ckpt_path`` resumes from a
    checkpoint that a ``ModelCheckpoint`` among ``callbacks`` of an earlier run wrote; ``managed_memory``
    replaces bitsandbytes' unified-memory primitives (``lightning_paged.testing.HostMemory`` on a CPU);
    ``root_dir`` is where callbacks write (the Trainer's ``default_root_dir``; default the working directory)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from lightning_paged.lightning.strategies import PagedQLoRAStrategy

    window = MemoryWindow()
    started = time.perf_counter()
    module = lightning_module(build_model(workload, source), workload)
    if managed_memory is not None:
        module.managed_memory = managed_memory
    strategy = PagedQLoRAStrategy(
        compute_dtype=workload.compute_dtype,
        lora_r=workload.lora_r,
        lora_alpha=workload.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        gradient_checkpointing=workload.gradient_checkpointing,
        device=workload.device,
    )
    clock = step_clock()
    batches = batches if batches is not None else make_batches(workload)
    trainer = pl.Trainer(
        accelerator="gpu" if workload.device.startswith("cuda") else "cpu",
        devices=1,
        strategy=strategy,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks or []),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock, *(callbacks or [])],
        default_root_dir=root_dir,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return _record("lightning_paged", clock.clock, module.losses, window, started, trainable, workload)


# --- transformers Trainer -----------------------------------------------------------------------------


def run_transformers_trainer(
    workload: Workload, source: Path, output_dir: Path, callbacks: list[Any] | None = None
) -> dict[str, Any]:
    """The usual QLoRA recipe on the model saved in ``source``."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    window = MemoryWindow()
    started = time.perf_counter()
    compute = _dtype(workload.compute_dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(source), quantization_config=quantization, dtype=compute, device_map=workload.device
    )
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=workload.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    _seed_adapters(workload)
    lora = LoraConfig(
        r=workload.lora_r,
        lora_alpha=workload.lora_alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    clock = Clock()
    losses: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.stamp()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if workload.device.startswith("cuda"):
                torch.cuda.synchronize()
            clock.stamp()

    class LossRecordingTrainer(Trainer):
        """Records every step's loss exactly, as the other runs do (the log rounds to 4 digits)."""

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            losses.append(loss.item())
            return loss

    on_gpu = workload.device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=workload.batch_size,
        max_steps=workload.steps,
        learning_rate=workload.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim=workload.optimizer,
        max_grad_norm=0.0,  # the other runs do not clip
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_gpu,
        bf16=on_gpu and workload.compute_dtype == "bfloat16",
        seed=workload.seed,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
    )
    examples = [
        {key: value[i] for key, value in batch.items()}
        for batch in make_batches(workload)
        for i in range(workload.batch_size)
    ]
    trainer = LossRecordingTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=default_data_collator,
        callbacks=[StepClock(), *(callbacks or [])],
    )
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _record("transformers_trainer", clock, losses, window, started, trainable, workload)
