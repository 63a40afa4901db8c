"""A trained adapter, out: a PEFT adapter directory, or merged onto the original 16-bit base weights.

:func:`save_adapter` writes ``adapter_config.json`` and ``adapter_model.safetensors`` under PEFT's
names (``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(base, dir)``
loads it onto a 4-bit or a 16-bit base. :func:`merge_adapter` adds the adapter to the base model's
*original* 16-bit weights, read from its safetensors files one tensor at a time and written out in
shards as they fill, so host memory stays near one shard plus the adapter whatever the model size.
Merging into dequantized 4-bit weights instead would bake the quantization error into the model;
for a base that only exists in 4-bit (a pre-quantized directory) that is what it does, and its
report says so (:mod:`lightning_paged.core.export_4bit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_paged.core.errors import ExportError
from lightning_paged.core.export_4bit import SAFETENSORS_NAMES, dequantized_entries, is_prequantized
from lightning_paged.core.loading.files import WeightFiles, WeightLoadError
from lightning_paged.core.progress import progress_bar
from lightning_paged.core.tensor_entries import TensorEntry, tensor_entries

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_MAX_SHARD_SIZE",
    "Adapter",
    "ExportError",
    "MergeReport",
    "adapter_from_model",
    "adapter_from_state_dict",
    "merge_adapter",
    "progress_bar",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before module names in a saved adapter."""
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
"""Bytes per output shard of a merge (transformers' customary ``"5GB"``)."""


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
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` (created if needed).

    Both files get the mode the umask gives (``safetensors.torch.save_file`` would create the weights
    with mode 0600, unreadable to other users of a shared serving machine).
    """
    from peft import LoraConfig
    from safetensors.torch import save

    from lightning_paged.core.atomic import atomic_write

    init_fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    config = LoraConfig(**{k: v for k, v in adapter.config.items() if k in init_fields})
    config.base_model_name_or_path = base_model_name_or_path
    if task_type is not None:
        config.task_type = task_type
    config.inference_mode = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    data = save(adapter.weights, metadata={"format": "pt"})
    atomic_write(out / ADAPTER_WEIGHTS_NAME, lambda file: file.write(data))
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
    dequantized: str | None = None
    """The 4-bit type (``nf4``) of a pre-quantized base whose weights were dequantized to merge onto."""


def merge_adapter(
    adapter: Adapter,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> MergeReport:
    """Add the adapter to the 16-bit weights in ``base_dir`` and write a transformers model to ``out_dir``.

    ``W + scale * (B @ A)`` is computed in float32 and stored in ``W``'s dtype. Output shards are
    laid out from the input files' headers first, then written one tensor at a time: host memory
    holds one tensor (and a bounded float32 block of it) at a time, plus the adapter. Every other
    file of ``base_dir`` (config, generation config, tokenizer) is copied. A pre-quantized
    (bitsandbytes 4-bit) ``base_dir`` is merged onto its dequantized weights, written in the dtype
    they were quantized from, and its ``config.json`` loses its ``quantization_config``.
    """
    if adapter.config.get("use_dora"):
        raise ExportError(
            "merging a DoRA adapter (use_dora) is not supported; export the adapter and merge it with PEFT's "
            "merge_and_unload() on a 16-bit base"
        )
    if adapter.config.get("rank_pattern") or adapter.config.get("alpha_pattern"):
        raise ExportError("merging an adapter with per-layer rank_pattern/alpha_pattern is not supported")
    if adapter.config.get("target_parameters"):
        raise ExportError(
            "merging LoRA on fused expert weights (lora_on_experts, PEFT's target_parameters "
            f"{adapter.config['target_parameters']}) is not supported here: the checkpoint stores experts per "
            "expert. Export the adapter and merge it with PEFT's merge_and_unload() on the 16-bit model"
        )
    base = Path(base_dir)
    with contextlib.ExitStack() as stack:
        entries, dequantized = _base_entries(base, stack)
        if dequantized is not None and adapter.config.get("fan_in_fan_out"):
            raise ExportError(
                f"{base} is a pre-quantized 4-bit base and the adapter is on transformers' Conv1D layers "
                "(fan_in_fan_out, GPT-2 style), whose 4-bit weights are stored transposed: merging onto them is "
                "not supported. Merge onto the 16-bit model the 4-bit base was quantized from"
            )
        targets = {f"{module}.weight": pair for module, pair in adapter.pairs().items()}
        missing = sorted(set(targets) - {e.name for e in entries})
        if missing:
            raise ExportError(
                f"{len(missing)} adapted layers have no weight in the base files of {base} (first: "
                f"{missing[0]}): this is not the base model the adapter was trained on"
            )
        groups = _shard_groups(entries, max_shard_size)
        count = len(groups)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        total = sum(e.nbytes for e in entries)
        with progress_bar("merging", total, progress) as advance, _TensorReader() as reader:
            for group, name in zip(groups, names):
                _write_safetensors(
                    out / name,
                    group,
                    reader,
                    targets,
                    adapter.scale,
                    advance,
                    bool(adapter.config.get("fan_in_fan_out")),
                )
    if count > 1:
        weight_map = {e.name: name for group, name in zip(groups, names) for e in group}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for item in base.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin") and item.name != INDEX_NAME:
            shutil.copyfile(item, out / item.name)  # the umask's mode, not the source's
    if dequantized is not None:  # the merged weights are plain 16-bit ones
        config = json.loads((out / "config.json").read_text())
        config.pop("quantization_config", None)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return MergeReport(
        files=names, merged=len(targets), tensors=len(entries), total_bytes=total, dequantized=dequantized
    )


def _base_entries(base: Path, stack: contextlib.ExitStack) -> tuple[list[TensorEntry], str | None]:
    """The tensors to merge onto, and the 4-bit type of a pre-quantized base (dequantized), else None.

    safetensors files are read from their headers; PyTorch ``.bin`` files (zip format) are mapped
    with ``torch.load(mmap=True)`` and each tensor is read when it is written.
    """
    shards = sorted(base.glob("*.safetensors"))
    if shards:
        entries = [entry for shard in shards for entry in tensor_entries(shard)]
    else:
        try:
            files = stack.enter_context(WeightFiles(base))
        except WeightLoadError as err:
            raise ExportError(f"base directory {base}: {err}") from None
        entries = [
            TensorEntry(
                key,
                entry.file,
                SAFETENSORS_NAMES[entry.dtype],
                list(entry.shape),
                int(torch.Size(entry.shape).numel()) * entry.dtype.itemsize,
                read=functools.partial(files.read, key),
            )
            for key, entry in sorted(files.entries.items())
        ]
    if not is_prequantized(base):
        return entries, None
    return dequantized_entries(base, entries, stack)


def _shard_groups(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


class _TensorReader(contextlib.ExitStack):
    """Reads tensors from safetensors files, keeping only the current file open."""

    def __init__(self) -> None:
        super().__init__()
        self.path: Path | None = None
        self.file: Any = None

    def get(self, entry: TensorEntry) -> torch.Tensor:
        from safetensors import safe_open

        if entry.read is not None:
            return entry.read()
        if entry.shard != self.path:
            self.close()
            self.file = self.enter_context(safe_open(str(entry.shard), framework="pt"))
            self.path = entry.shard
        return self.file.get_tensor(entry.name)


def _write_safetensors(
    path: Path,
    entries: list[TensorEntry],
    reader: _TensorReader,
    targets: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    scale: float,
    advance: Callable[[int], None],
    fan_in_fan_out: bool = False,
) -> None:
    """A safetensors file written tensor by tensor: the header is known from the input headers."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype,
            "shape": entry.shape,
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for entry in entries:
            tensor = reader.get(entry)
            if entry.name in targets:
                tensor = _merged(tensor, *targets[entry.name], scale, fan_in_fan_out)
            data = tensor.contiguous().reshape(-1).view(torch.uint8)
            if data.numel() != entry.nbytes:
                raise ExportError(
                    f"{entry.shard.name}: {entry.name} holds {data.numel()} bytes, its header says {entry.nbytes}"
                )
            file.write(data.numpy().data)
            advance(entry.nbytes)


def _merged(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
) -> torch.Tensor:
    """``W + scale * (B @ A)`` in float32, stored in ``W``'s dtype; in row blocks to bound temporaries.

    With ``fan_in_fan_out`` (GPT-2's ``Conv1D``, whose weight is stored ``in x out``) the update is
    added transposed, as PEFT merges it.
    """
    if fan_in_fan_out and weight.ndim == 2:
        return _merged(weight.t(), lora_a, lora_b, scale).t().contiguous()
    if (lora_b.shape[0], lora_a.shape[1]) != tuple(weight.shape):
        shape = (lora_b.shape[0], lora_a.shape[1])
        raise ExportError(f"adapter shape {shape} does not fit base weight {tuple(weight.shape)}")
    merged = torch.empty_like(weight)
    lora_a = lora_a.to(torch.float32)
    rows = max(1, _MERGE_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], rows):
        block = weight[start : start + rows].to(torch.float32)
        block.addmm_(lora_b[start : start + rows].to(torch.float32), lora_a, alpha=scale)
        merged[start : start + rows] = block
    return merged


_MERGE_BLOCK_ELEMENTS = 16 * 2**20
"""float32 elements per row block of a merge (64 MiB of temporaries)."""
