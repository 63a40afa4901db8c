"""A model built from its directory's config with no weights: parameters on the meta device.

The weights are filled in later, where the model is converted (:func:`~lightning_paged.core.qlora.
convert_to_qlora` streams them from the files, quantizing on the target device). Buffers that are
not saved (rotary frequencies) are computed as usual on the host: they are small.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_paged.core.compat.torch import own_parameters
from lightning_paged.core.deferred import DeferredWeights, mark_deferred
from lightning_paged.core.loading.files import WeightFiles, WeightLoadError
from lightning_paged.core.loading.prequantized import check_supported_quantization
from lightning_paged.core.loading.stream import load_and_convert


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Within it, modules create their parameters on the meta device (no memory); buffers as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            own_parameters(module)[name] = nn.Parameter(
                param.data.to("meta"), requires_grad=param.requires_grad
            )

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


def check_causal_lm(config: Any, directory: Path) -> None:
    """Refuse, by name, a model type transformers cannot build as a causal language model."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return
    examples = [
        t
        for t in ("llama", "mistral", "qwen3", "gemma3_text", "gpt2", "mixtral", "qwen3_moe")
        if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ]
    raise WeightLoadError(
        f"{directory / 'config.json'} is a {getattr(config, 'model_type', '?')!r} model ({type(config).__name__}), "
        f"which transformers does not build as a causal language model (AutoModelForCausalLM); supported are the "
        f"{len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} model types AutoModelForCausalLM knows, such as "
        f"{', '.join(examples)}. Give the directory of a decoder-only language model"
    )


def directory_config(path: str | Path) -> Any:
    """The transformers config of a model directory (or of its ``config.json`` file); no weight file is read.

    Its ``quantization_config`` is dropped: packed weights are read as they are, at conversion.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def empty_model(directory: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The causal LM of a local model directory with its parameters on the meta device.

    The directory's files are checked (a missing shard, a truncated file, a legacy pre-zip ``.bin``
    file, an 8-bit or other quantized checkpoint are refused here, with what to do), but no weight is read: the model is
    filled from the files where it is converted, one tensor at a time. ``dtype`` is that of the
    empty parameters (default: the config's ``dtype``/``torch_dtype``); the loaded weights take the
    dtypes the conversion gives them.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    directory = Path(directory).expanduser().resolve()
    check_supported_quantization(directory)
    with WeightFiles(directory):  # every file's header read once: a missing or truncated file fails here
        pass
    config = directory_config(directory)
    check_causal_lm(config, directory)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or checkpoint_dtype(config))
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory), local_files_only=True)
    mark_deferred(model, DeferredWeights(directory, load_and_convert))
    return model.train()
