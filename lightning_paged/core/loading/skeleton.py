"""A model built from its directory's config with no weights: parameters on the meta device.

The weights are filled in later, where the model is converted (:func:`~lightning_paged.core.qlora.
convert_to_qlora` streams them from the files, quantizing on the target device). Buffers that are
not saved (rotary frequencies) are computed as usual on the host: they are small.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_paged.core.loading.files import WeightFiles, WeightLoadError

_MARK = "_lightning_paged_weights"


def deferred_directory(model: nn.Module) -> Path | None:
    """The directory whose weights ``model`` still waits for, or None when it holds its weights."""
    directory = getattr(model, _MARK, None)
    return Path(directory) if directory is not None else None


def mark_deferred(model: nn.Module, directory: Path | None) -> None:
    """Record (or, with None, clear) the directory ``model`` will take its weights from."""
    if directory is None:
        if _MARK in model.__dict__:
            del model.__dict__[_MARK]
    else:
        model.__dict__[_MARK] = str(directory)


def read_quantization_config(directory: Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of ``config.json``, None for an unquantized model."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightLoadError(
            f"{path} cannot be read as JSON ({err}); it is truncated or damaged: save the model again"
        ) from None
    value = config.get("quantization_config") if isinstance(config, dict) else None
    return dict(value) if isinstance(value, dict) else None


def check_supported_quantization(directory: Path) -> None:
    """Refuse a directory quantized in a way that cannot be loaded (anything but bitsandbytes 4-bit)."""
    quant = read_quantization_config(directory)
    if quant is None:
        return
    method = quant.get("quant_method")
    supported = (
        "supported: an unquantized model (16 or 32-bit safetensors, quantized to 4-bit while loading) or a "
        "bitsandbytes 4-bit directory (quantization_config with load_in_4bit: true)"
    )
    if method != "bitsandbytes":
        raise WeightLoadError(
            f"{directory / 'config.json'} says the weights are quantized with quant_method={method!r}; "
            f"{supported}. Give the original 16-bit model"
        )
    if quant.get("load_in_8bit"):
        raise WeightLoadError(
            f"{directory / 'config.json'} says the weights are bitsandbytes 8-bit (load_in_8bit: true), "
            f"which QLoRA cannot train on; {supported}. Give the original 16-bit model"
        )
    if not quant.get("load_in_4bit"):
        raise WeightLoadError(
            f"{directory / 'config.json'} has a bitsandbytes quantization_config that is neither 4-bit nor "
            f"8-bit; {supported}"
        )


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within it, modules create their parameters on the meta device (no memory); buffers as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype the config says its weights were saved in (``dtype``, or the older ``torch_dtype``)."""
    value = getattr(config, "dtype", None)
    if value is None:
        value = getattr(config, "__dict__", {}).get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def empty_model(directory: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The causal LM of a local model directory with its parameters on the meta device.

    The directory's files are checked (a missing shard, a truncated file, a legacy pre-zip ``.bin``
    file, an 8-bit or other quantized checkpoint are refused here, with what to do), but no weight is read: the model is
    filled from the files where it is converted, one tensor at a time. ``dtype`` is that of the
    empty parameters (default: the config's ``dtype``/``torch_dtype``); the loaded weights take the
    dtypes the conversion gives them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(directory).expanduser().resolve()
    check_supported_quantization(directory)
    with WeightFiles(directory):  # every file's header read once: a missing or truncated file fails here
        pass
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if hasattr(config, "quantization_config"):  # packed weights are read as they are, at conversion
        del config.quantization_config
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or checkpoint_dtype(config))
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    mark_deferred(model, directory)
    return model.train()
