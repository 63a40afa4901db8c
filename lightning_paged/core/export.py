"""A trained adapter, out: a PEFT adapter directory, or merged onto the original 16-bit base weights.

:func:`save_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors`` under PEFT's
names (``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(base, dir)``
loads it onto a 4-bit or a 16-bit base. :func:`merge_adapter` adds the adapter to the base model's
*original* 16-bit weights, read from its safetensors files one tensor at a time and written out in
shards as they fill, so host memory stays near one shard plus the adapter whatever the model size.
Merging into dequantized 4-bit weights instead would bake the quantization error into the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before module names in a saved adapter."""
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
"""Bytes per output shard of a merge (transformers' customary ``"5GB"``)."""


class ExportError(ValueError):
    """An export or merge cannot be done; the message says why and what to do."""


@dataclass
class Adapter:
    """A trained LoRA adapter as PEFT saves it."""

    weights: dict[str, torch.Tensor]
    """Tensors under PEFT's names: ``base_model.model.<module>.lora_A.weight`` and ``...lora_B.weight``."""
    config: dict[str, Any]
    """The adapter's ``peft.LoraConfig`` as a dict (what ``adapter_config.json`` holds)."""

    @property
    def scale(self) -> float:
        """The factor PEFT multiplies ``B @ A`` by: ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA."""
        r, alpha = self.config["r"], self.config["lora_alpha"]
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module name: (A, B)}`` for every adapted module."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.weights.items():
            for part in ("lora_A", "lora_B"):
                suffix = f".{part}.weight"
                if key.endswith(suffix):
                    module = key.removeprefix(PEFT_PREFIX)[: -len(suffix)]
                    found.setdefault(module, {})[part] = tensor
        incomplete = sorted(m for m, p in found.items() if len(p) != 2)
        if incomplete:
            raise ExportError(f"the adapter lacks lora_A or lora_B for {', '.join(incomplete)}")
        return {m: (p["lora_A"], p["lora_B"]) for m, p in found.items()}


def adapter_from_state_dict(
    state: Mapping[str, torch.Tensor],
    peft_config: Mapping[str, Any],
    prefix: str = "",
    adapter_name: str = "default",
) -> Adapter:
    """The adapter in a state dict of a model converted by ``convert_to_qlora`` (or a checkpoint's).

    ``prefix`` is where the converted model sits in the state dict (``"model."`` for a
    LightningModule holding it as ``self.model``).
    """
    weights = {}
    for key, value in state.items():
        if not key.startswith(prefix) or ".lora_" not in key:
            continue
        name = key[len(prefix) :].replace(f".{adapter_name}.", ".")
        if name.endswith(".lora_magnitude_vector.weight"):  # DoRA, saved by PEFT without ".weight"
            name = name.removesuffix(".weight")
        weights[PEFT_PREFIX + name] = value.detach().to("cpu").contiguous()
    if not weights:
        raise ExportError(f"no LoRA adapter weights (keys with '.lora_') under {prefix or 'the top level'!r}")
    return Adapter(weights=weights, config=dict(peft_config))


def adapter_from_model(model: nn.Module, adapter_name: str = "default") -> Adapter:
    """The adapter of a model converted by ``convert_to_qlora`` (it carries ``model.peft_config``)."""
    peft_config = getattr(model, "peft_config", {}).get(adapter_name)
    if peft_config is None:
        raise ExportError(f"{type(model).__name__} has no LoRA adapter named {adapter_name!r}")
    config = json.loads(json.dumps(peft_config.to_dict(), default=list))
    return adapter_from_state_dict(model.state_dict(), config, adapter_name=adapter_name)


def save_adapter(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` (created if needed)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    init_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    config = LoraConfig(**{k: v for k, v in adapter.config.items() if k in init_fields})
    config.base_model_name_or_path = base_model_name_or_path
    if task_type is not None:
        config.task_type = task_type
    config.inference_mode = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(adapter.weights, str(out / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


@dataclass
class MergeReport:
    """What :func:`merge_adapter` wrote."""

    files: list[str]
    """Weight files written, in order."""
    merged: int
    """Base weights the adapter was added to."""
    tensors: int
    """Tensors written in all."""
    total_bytes: int


def merge_adapter(
    adapter: Adapter,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> MergeReport:
    """Add the adapter to the 16-bit weights in ``base_dir`` and write a transformers model to ``out_dir``.

    ``W + scale * (B @ A)`` is computed in float32 and stored in ``W``'s dtype. Every other file of
    ``base_dir`` (config, generation config, tokenizer) is copied.
    """
    from safetensors import safe_open

    if adapter.config.get("use_dora"):
        raise ExportError(
            "merging a DoRA adapter (use_dora) is not supported; export the adapter and merge it with PEFT's "
            "merge_and_unload() on a 16-bit base"
        )
    if adapter.config.get("rank_pattern") or adapter.config.get("alpha_pattern"):
        raise ExportError("merging an adapter with per-layer rank_pattern/alpha_pattern is not supported")
    base = Path(base_dir)
    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        other = (
            "only PyTorch .bin files; re-save it with save_pretrained(safe_serialization=True)"
            if any(base.glob("*.bin"))
            else "no model weights"
        )
        raise ExportError(
            f"base directory {base} holds {other}: merging reads the 16-bit safetensors weights"
        )
    targets = {f"{module}.weight": pair for module, pair in adapter.pairs().items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, max_shard_size)
    merged: set[str] = set()
    with progress_bar("merging", sum(p.stat().st_size for p in shards), progress) as advance:
        for shard in shards:
            with safe_open(str(shard), framework="pt") as reader:
                for name in reader.keys():  # noqa: SIM118  (safe_open has no __iter__)
                    tensor = reader.get_tensor(name)
                    if name in targets:
                        tensor = _merged(tensor, *targets[name], adapter.scale)
                        merged.add(name)
                    writer.add(name, tensor)
            advance(shard.stat().st_size)
    missing = sorted(set(targets) - merged)
    if missing:
        writer.abort()
        raise ExportError(
            f"{len(missing)} adapted layers have no weight in the base files of {base} (first: {missing[0]}): "
            "this is not the base model the adapter was trained on"
        )
    report = writer.close()
    report.merged = len(merged)
    for item in base.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin") and item.name != INDEX_NAME:
            shutil.copy2(item, out / item.name)
    return report


def _merged(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    if delta.shape != weight.shape:
        raise ExportError(
            f"adapter shape {tuple(delta.shape)} does not fit base weight {tuple(weight.shape)}"
        )
    return (weight.to(torch.float32) + scale * delta).to(weight.dtype)


class _ShardWriter:
    """Collects tensors and writes a safetensors shard each time ``max_bytes`` would be exceeded."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def close(self) -> MergeReport:
        if self.buffer or not self.parts:
            self.flush()
        count = len(self.parts)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map = {}
        for (path, tensors), name in zip(self.parts, names):
            os.replace(path, self.out / name)
            weight_map.update(dict.fromkeys(tensors, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return MergeReport(files=names, merged=0, tensors=len(weight_map), total_bytes=self.total)

    def abort(self) -> None:
        for path, _ in self.parts:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass
class LogitComparison:
    """How far two models' logits are apart on the same probe tokens."""

    max_abs: float
    mean_abs: float
    top1_agreement: float
    """Share of positions where both models rank the same token first."""
    tokens: int

    def summary(self) -> str:
        return (
            f"largest logit difference {self.max_abs:.4g} (mean {self.mean_abs:.3g}; same top-1 token at "
            f"{100 * self.top1_agreement:.1f}% of {self.tokens} probe positions)"
        )


@torch.no_grad()
def compare_logits(
    model: nn.Module, reference: nn.Module, vocab_size: int, batch: int = 2, length: int = 32, seed: int = 0
) -> LogitComparison:
    """Logits of ``model`` against ``reference`` on ``batch x length`` random probe tokens (seeded)."""
    ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        ours = model(input_ids=ids.to(_device(model))).logits.float().cpu()
        theirs = reference(input_ids=ids.to(_device(reference))).logits.float().cpu()
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    difference = (ours - theirs).abs()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return LogitComparison(difference.max().item(), difference.mean().item(), agree, ids.numel())


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def progress_bar(description: str, total_bytes: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes; yields ``advance(n)``. Disabled: a no-op."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=total_bytes)
        yield lambda n: bar.advance(task, n)
