"""Quantize while loading: fill an empty model from its safetensors files, one tensor at a time.

Every check that can fail on the files (missing shards, truncated files, keys the model does not
have, weights the files lack, shapes that disagree, pre-quantized settings that contradict the
strategy's) runs on the headers before anything is placed on the device. Then each linear weight
to quantize is read, cast to ``compute_dtype`` and quantized on the device, its 16-bit copy dropped
at once; every other weight is placed on the device in the dtype the conversion gives it. Should a
read fail halfway, the model is put back as it was (empty) so nothing is left on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.torch import own_buffers, own_parameters
from lightning_paged.core.compat.transformers import keys_to_ignore_on_load
from lightning_paged.core.deferred import mark_deferred
from lightning_paged.core.layers4bit import non_quantized_dtype, quantize_linear, set_submodule
from lightning_paged.core.loading.files import WeightFiles, WeightLoadError, file_key_for, ignored, listing
from lightning_paged.core.loading.prequantized import (
    Prequantized,
    check_settings,
    layer_from_files,
    read_prequantized,
    read_quantization_config,
    stored_shape,
)
from lightning_paged.core.qlora import ConversionReport, convert_to_qlora
from lightning_paged.core.qlora_config import QLoRAConfig
from lightning_paged.core.selection import matches


@dataclass
class LoadReport(ConversionReport):
    """What :func:`load_and_convert` did: the conversion's report plus where the weights came from."""

    directory: str = ""
    files: int = 0
    tensors_read: int = 0
    prequantized: bool = False

    def summary(self) -> str:
        kind = "pre-quantized 4-bit, loaded as stored" if self.prequantized else "quantized while loading"
        return (
            f"{super().summary()}; weights streamed from {self.directory} "
            f"({self.files} files, {self.tensors_read} tensors, {kind})"
        )


@dataclass
class _Plan:
    """Where each of the model's tensors comes from, checked against the files' headers."""

    sources: dict[str, str]
    """Model tensor name (tied names included) to its key in the files."""
    quantized: set[str]
    """Linear layers whose weight is quantized (or, pre-quantized, read packed)."""
    prequantized: Prequantized | None


def _linear_selection(model: nn.Module, config: QLoRAConfig) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in names if not matches(n, config.skip_modules)]


def plan_load(model: nn.Module, files: WeightFiles, config: QLoRAConfig) -> _Plan:
    """Match every tensor of ``model`` to the files, or raise naming what does not fit."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    keys = set(files.entries)
    quantized = _linear_selection(model, config)
    quant = read_quantization_config(files.directory)
    pre = None
    packed: dict[str, str] = {}  # model layer name -> file layer name of a stored 4-bit layer
    consumed: set[str] = set()
    if quant is not None:
        pre = read_prequantized(quant, files.directory / "config.json", files)
        layer_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name in layer_names:
            file_layer = file_key_for(name, set(pre.layers), prefix)
            if file_layer is not None:
                packed[name] = file_layer
                consumed.update(pre.state_keys(file_layer))
        check_settings(pre, config, quantized, list(packed))

    groups: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor

    sources: dict[str, str] = {}
    missing: list[str] = []
    bad_shapes: list[str] = []
    ignore_missing = keys_to_ignore_on_load(model, "missing")
    for ident, names in groups.items():
        key = next((k for k in (file_key_for(n, keys, prefix) for n in names) if k is not None), None)
        if key is None:
            if not all(ignored(n, ignore_missing) for n in names):
                missing.append(names[0])
            continue
        sources.update(dict.fromkeys(names, key))
        consumed.add(key)
        expected = tuple(tensors[ident].shape)
        layer = next((n.removesuffix(".weight") for n in names if n.removesuffix(".weight") in packed), None)
        found = (
            stored_shape(pre, files, packed[layer]) if pre is not None and layer else files.entries[key].shape
        )
        if found != expected:
            bad_shapes.append(
                f"{files.where(key)} has shape {list(found)} where the model has {list(expected)}"
            )
    ignore_unexpected = keys_to_ignore_on_load(model, "unexpected")
    unexpected = [k for k in files.entries if k not in consumed and not ignored(k, ignore_unexpected)]

    config_file = files.directory / "config.json"
    if bad_shapes:
        raise WeightLoadError(
            f"{files.directory}: {len(bad_shapes)} tensors do not have the shapes {config_file} gives the "
            f"model: {listing(bad_shapes)}. The weight files and config.json belong to different models"
        )
    if unexpected:
        where = f"{files.where(unexpected[0])}"
        raise WeightLoadError(
            f"{files.directory}: the files hold {len(unexpected)} tensors the model built from {config_file} "
            f"does not have: {listing(unexpected)} (first: {where}). The weight files and config.json "
            "belong to different models"
        )
    if missing:
        raise WeightLoadError(
            f"{files.directory}: {len(missing)} of the model's weights are in none of its files "
            f"({', '.join(p.name for p in files.files)}): {listing(missing)}. The files are incomplete or "
            "belong to another model"
        )
    return _Plan(
        sources=sources, quantized=set(packed) if pre is not None else set(quantized), prequantized=pre
    )


def load_and_convert(
    model: nn.Module,
    directory: str | Path,
    config: QLoRAConfig | None = None,
    device: torch.device | str | None = None,
) -> LoadReport:
    """Fill the empty ``model`` from ``directory`` while converting it to NF4 QLoRA on ``device``.

    ``model`` has its parameters on the meta device (:func:`~lightning_paged.core.loading.empty_model`,
    or any ``torch.device("meta")`` build of the same architecture). The result is the model
    :func:`~lightning_paged.core.qlora.convert_to_qlora` makes from the loaded model, bit for bit,
    without the 16-bit model ever being in memory. A pre-quantized bitsandbytes 4-bit directory is
    loaded as stored; its ``compute_dtype`` is replaced by ``config.compute_dtype``.
    """
    config = config or QLoRAConfig()
    config.validate()
    device = torch.device(device if device is not None else "cpu")
    with WeightFiles(directory) as files:
        plan = plan_load(model, files, config)
        swapped: list[tuple[str, nn.Module]] = []
        read = [0]

        def layers(name: str, linear: nn.Linear) -> nn.Module:
            swapped.append((name, linear))
            return _layer(name, linear, files, plan, config, device, read)

        try:
            read[0] += _place_unquantized(model, files, plan, config, device)
            report = convert_to_qlora(model, config, device, layers=layers)
        except BaseException:
            _empty_again(model, swapped, device)
            raise
    mark_deferred(model, None)
    return LoadReport(
        **report.values(),
        directory=str(files.directory),
        files=len(files.files),
        tensors_read=read[0],
        prequantized=plan.prequantized is not None,
    )


def _layer(
    name: str,
    linear: nn.Linear,
    files: WeightFiles,
    plan: _Plan,
    config: QLoRAConfig,
    device: torch.device,
    read: list[int],
) -> nn.Module:
    key = plan.sources[f"{name}.weight"]
    if plan.prequantized is not None:
        read[0] += 1
        prefix_free = key.removesuffix(".weight")
        return layer_from_files(linear, plan.prequantized, files, prefix_free, config, device)
    weight = files.read(key)  # cast to compute_dtype on the host by quantize_weight
    read[0] += 1
    layer = quantize_linear(linear, config, device, weight=weight)
    del weight
    if device.type == "cpu":  # quantizing on the host leaves freed float32 scratch in the heap
        _trim_host_heap()
    return layer


def _trim_host_heap() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    bitsandbytes' CPU quantization allocates float32 scratch several times a layer's size; glibc
    keeps freed blocks of that size in the heap, where the small 4-bit results pin them, so without
    this the process keeps growing by scratch it no longer uses.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        library = ctypes.CDLL(name) if name else None
        _LIBC = library if library is not None and hasattr(library, "malloc_trim") else False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _place_unquantized(
    model: nn.Module,
    files: WeightFiles,
    plan: _Plan,
    config: QLoRAConfig,
    device: torch.device,
    dtype_of: Callable[[nn.Module], torch.dtype] | None = None,
    modules: Iterable[tuple[str, nn.Module]] | None = None,
    placed: dict[int, nn.Parameter] | None = None,
) -> int:
    """Every parameter but the weights to quantize, and every buffer, on ``device``; returns tensors read.

    A floating-point weight takes ``dtype_of(module)``; by default the dtype the conversion gives it.
    ``modules`` (named, as in ``model.named_modules()``) limits it to those modules' own tensors, and
    ``placed`` carries tied parameters already placed from one call to the next (a sharded load places
    one block at a time).
    """
    dtype_of = dtype_of or (lambda module: non_quantized_dtype(module, config))
    placed = {} if placed is None else placed
    count = 0
    for module_name, module in model.named_modules() if modules is None else modules:
        prefix = f"{module_name}." if module_name else ""
        params, buffers = own_parameters(module), own_buffers(module)
        for name, param in list(params.items()):
            if param is None or (module_name in plan.quantized and name == "weight"):
                continue
            if id(param) not in placed:
                tensor = files.read(plan.sources[prefix + name])
                dtype = dtype_of(module) if tensor.is_floating_point() else tensor.dtype
                placed[id(param)] = nn.Parameter(tensor.to(device=device, dtype=dtype), param.requires_grad)
                count += 1
            params[name] = placed[id(param)]
        for name, buffer in list(buffers.items()):
            if buffer is None:
                continue
            key = plan.sources.get(prefix + name)
            if key is not None:  # a persistent buffer, saved with the weights
                buffers[name] = files.read(key).to(device=device, dtype=buffer.dtype)
                count += 1
            else:
                buffers[name] = buffer.to(device)
    return count


def _empty_again(model: nn.Module, swapped: list[tuple[str, nn.Module]], device: torch.device) -> None:
    """Undo a load that failed halfway: the original layers back, every parameter on meta again."""
    for name, linear in reversed(swapped):
        set_submodule(model, name, linear)
    emptied: dict[int, nn.Parameter] = {}
    for module in model.modules():
        params = own_parameters(module)
        for name, param in list(params.items()):
            if param is None or param.device.type == "meta":
                continue
            if id(param) not in emptied:
                emptied[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
            params[name] = emptied[id(param)]
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_unquantized(
    model: nn.Module, directory: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> None:
    """Fill the empty ``model`` from ``directory`` as it is, every floating weight in ``dtype``.

    For training without the QLoRA conversion (a plain strategy): the 16-bit model in memory.
    """
    directory = Path(directory)
    if read_quantization_config(directory) is not None:
        raise WeightLoadError(
            f"{directory} holds bitsandbytes 4-bit weights, which only a QLoRA strategy can train: "
            "use strategy paged_qlora or paged_qlora_ddp"
        )
    config = QLoRAConfig(skip_modules=[n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    with WeightFiles(directory) as files:
        plan = plan_load(model, files, config)
        _place_unquantized(model, files, plan, config, torch.device(device), lambda module: dtype)
    mark_deferred(model, None)


__all__ = ["LoadReport", "load_and_convert", "load_unquantized", "plan_load"]
