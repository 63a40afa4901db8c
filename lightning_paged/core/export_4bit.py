"""Exporting a run trained on a pre-quantized (bitsandbytes 4-bit) base directory.

Such a base (``save_pretrained`` of a model loaded in 4-bit, often named ``...-bnb-4bit``) has no
16-bit weights. Two ways to merge an adapter trained on it:

- onto its **dequantized** weights (:func:`dequantized_entries`): each packed 4-bit weight is
  turned back into the dtype it was quantized from, which is exactly the weight the trained model
  computed with; the quantization error stays in every merged weight;
- onto the **original 16-bit model**, given as ``--base``, once :func:`check_quantizes_to` has
  checked that quantizing it with the base's own settings reproduces the base's 4-bit bytes (packed
  weights and quantization constants, layer by layer) and that its other tensors are the base's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lightning_paged.core.errors import ExportError
from lightning_paged.core.loading.files import SAFETENSORS_DTYPES, WeightFiles
from lightning_paged.core.loading.prequantized import (
    Prequantized,
    read_prequantized,
    read_quantization_config,
)
from lightning_paged.core.progress import progress_bar
from lightning_paged.core.tensor_entries import TensorEntry

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
"""The safetensors name of each dtype (``torch.bfloat16``: ``BF16``)."""


def is_prequantized(directory: str | Path) -> bool:
    """Whether ``directory``'s ``config.json`` says its weights are stored quantized."""
    return read_quantization_config(Path(directory)) is not None


def _open(directory: Path, stack: contextlib.ExitStack) -> tuple[WeightFiles, Prequantized]:
    quant = read_quantization_config(directory)
    if quant is None or quant.get("quant_method") != "bitsandbytes" or not quant.get("load_in_4bit"):
        raise ExportError(
            f"{directory} holds quantized weights that are not bitsandbytes 4-bit ({quant}); "
            "give --base with the original 16-bit model"
        )
    files = stack.enter_context(WeightFiles(directory))
    return files, read_prequantized(quant, directory / "config.json", files)


def _stats(pre: Prequantized, files: WeightFiles, layer: str) -> dict[str, torch.Tensor]:
    """A stored 4-bit layer's quantization constants, by their names in a ``QuantState`` dict."""
    return {
        key.removeprefix(f"{layer}.weight."): files.read(key)
        for key in pre.state_keys(layer)
        if key in files.entries
    }


def _quant_state(pre: Prequantized, files: WeightFiles, layer: str) -> Any:
    from bitsandbytes.functional import QuantState

    return QuantState.from_dict(_stats(pre, files, layer), device=torch.device("cpu"))


def _dequantized(pre: Prequantized, files: WeightFiles, layer: str) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    packed = files.read(f"{layer}.weight")
    return dequantize_4bit(packed, _quant_state(pre, files, layer))


def dequantized_entries(
    directory: Path, entries: list[TensorEntry], stack: contextlib.ExitStack
) -> tuple[list[TensorEntry], str]:
    """The tensors of a pre-quantized ``directory`` as a 16-bit model holds them; and its 4-bit type.

    ``entries`` are the tensors in its files' headers. Each packed 4-bit weight becomes a tensor of
    its unpacked shape in the dtype it was quantized from, read by dequantizing it; its
    quantization constants are dropped. The files stay open until ``stack`` closes.
    """
    files, pre = _open(directory, stack)
    constants = {key for layer in pre.layers for key in pre.state_keys(layer)}
    result = []
    for entry in entries:
        if entry.name in constants:
            continue
        layer = entry.name.removesuffix(".weight")
        if entry.name.endswith(".weight") and layer in pre.layers:
            state = _quant_state(pre, files, layer)
            shape = [int(s) for s in state.shape]
            read: Callable[[], torch.Tensor] = partial(_dequantized, pre, files, layer)
            nbytes = int(torch.Size(shape).numel()) * state.dtype.itemsize
            entry = TensorEntry(entry.name, entry.shard, SAFETENSORS_NAMES[state.dtype], shape, nbytes, read)
        result.append(entry)
    return result, pre.quant_type


def check_quantizes_to(candidate: Path, prequantized: Path, progress: bool = True) -> int:
    """Check that the 16-bit ``candidate`` quantizes to the bytes of the pre-quantized ``prequantized``.

    Every 4-bit layer of ``prequantized`` is quantized again from ``candidate``'s weight with the
    settings it was stored with (type, double quantization, storage, and the dtype it was quantized
    from) through :func:`~lightning_paged.core.layers4bit.quantize_weight`, the function training
    quantizes with, and its packed weight and every quantization constant must be equal, byte for
    byte; every other tensor must be equal too (in the dtype ``prequantized`` stores it in). Returns
    the number of 4-bit layers checked; raises :class:`ExportError` naming the first that differs.
    """
    from lightning_paged.core.layers4bit import quantize_weight
    from lightning_paged.core.qlora_config import QLoRAConfig

    if is_prequantized(candidate):
        raise ExportError(f"--base {candidate} is itself quantized; give the original 16-bit model")
    with contextlib.ExitStack() as stack:
        theirs, pre = _open(prequantized, stack)
        ours = stack.enter_context(WeightFiles(candidate))
        constants = {key for layer in pre.layers for key in pre.state_keys(layer)}
        keys = [key for key in theirs.entries if key not in constants]
        keys.sort(key=lambda key: key.removesuffix(".weight") not in pre.layers)  # the 4-bit layers first
        missing = [key for key in keys if key not in ours.entries]
        if missing:
            raise ExportError(
                f"--base {candidate} lacks {len(missing)} tensors of {prequantized} (first: {missing[0]}): "
                "it is not the model that was quantized"
            )
        total = sum(int(torch.Size(ours.entries[key].shape).numel()) for key in keys)
        with progress_bar(f"checking --base against {prequantized.name}", total, progress) as advance:
            for key in keys:
                layer = key.removesuffix(".weight")
                weight = ours.read(key)
                if key.endswith(".weight") and layer in pre.layers:
                    stored = _stats(pre, theirs, layer)
                    state = _quant_state(pre, theirs, layer)
                    settings = QLoRAConfig(
                        quant_type=pre.quant_type,  # type: ignore[arg-type]
                        double_quant=pre.double_quant,
                        quant_storage=pre.quant_storage,  # type: ignore[arg-type]
                        compute_dtype=str(state.dtype).removeprefix("torch."),  # type: ignore[arg-type]
                    )
                    param = quantize_weight(weight, settings, torch.device("cpu"))
                    same = _equal(param.data, theirs.read(key)) and _same_constants(
                        param.quant_state.as_dict(packed=True), stored
                    )
                else:
                    stored_tensor = theirs.read(key)
                    same = _equal(weight.to(stored_tensor.dtype), stored_tensor)
                if not same:
                    raise ExportError(
                        f"--base {candidate} is not the model {prequantized} was quantized from: its {key}"
                        + (
                            f", quantized as {prequantized.name} was ({pre.quant_type}, double_quant="
                            f"{pre.double_quant}, from {state.dtype}), gives other 4-bit bytes"
                            if layer in pre.layers and key.endswith(".weight")
                            else " differs"
                        )
                        + "; give the 16-bit model that was quantized, or merge without --base onto the "
                        "dequantized 4-bit weights"
                    )
                advance(int(weight.numel()))
    return len(pre.layers)


def _same_constants(ours: dict[str, Any], stored: dict[str, torch.Tensor]) -> bool:
    return set(ours) == set(stored) and all(_equal(ours[k], stored[k]) for k in stored)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
