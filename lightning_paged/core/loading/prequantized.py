"""Directories saved already in bitsandbytes 4-bit (``save_pretrained`` of a model loaded in 4-bit).

``config.json`` carries a ``quantization_config`` (``quant_method: bitsandbytes``, ``load_in_4bit``,
``bnb_4bit_quant_type``, ``bnb_4bit_use_double_quant``, ``bnb_4bit_compute_dtype``,
``bnb_4bit_quant_storage``, ``llm_int8_skip_modules``); each 4-bit layer's weight is stored packed
as ``<layer>.weight`` with its quantization state beside it (``.absmax``, ``.quant_map``,
``.nested_absmax``, ``.nested_quant_map``, ``.quant_state.bitsandbytes__<type>``). The packed
weights are loaded as they are, never quantized a second time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_paged.core.errors import SettingError
from lightning_paged.core.layers4bit import linear4bit
from lightning_paged.core.loading.files import WeightFiles, WeightLoadError, listing
from lightning_paged.core.qlora_config import DTYPES, QLoRAConfig

STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
BLOB_PREFIX = "quant_state.bitsandbytes__"


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


@dataclass(frozen=True)
class Prequantized:
    """The 4-bit layers of a pre-quantized directory and the settings they were quantized with."""

    config_file: Path
    quant_type: str
    double_quant: bool
    compute_dtype: str
    quant_storage: str
    layers: dict[str, str]
    """Layer name in the files (with its checkpoint prefix) to the key of its packed quant_state blob."""

    def state_keys(self, file_layer: str) -> list[str]:
        """The files' keys of a 4-bit layer's quantization state (not its packed weight)."""
        return [self.layers[file_layer]] + [f"{file_layer}.weight.{s}" for s in STATE_SUFFIXES]


def _dtype_name(value: Any, default: str) -> str:
    if value is None:
        return default
    return str(value).removeprefix("torch.")


def read_prequantized(quant: dict[str, Any], config_file: Path, files: WeightFiles) -> Prequantized:
    """The 4-bit layers of ``files`` and the directory's settings (``quant`` is its quantization_config)."""
    layers = {}
    for key in files.entries:
        head, sep, kind = key.rpartition(".weight." + BLOB_PREFIX)
        if sep and kind in ("nf4", "fp4"):
            layers[head] = key
    return Prequantized(
        config_file=config_file,
        quant_type=str(quant.get("bnb_4bit_quant_type", "fp4")),
        double_quant=bool(quant.get("bnb_4bit_use_double_quant", False)),
        compute_dtype=_dtype_name(quant.get("bnb_4bit_compute_dtype"), "float32"),
        quant_storage=_dtype_name(quant.get("bnb_4bit_quant_storage"), "uint8"),
        layers=layers,
    )


def transformers_quantizes(module: nn.Module) -> bool:
    """Whether transformers' 4-bit load replaces this layer (``replace_with_bnb_linear``: exactly ``nn.Linear``, or ``Conv1D``).

    Subclasses such as Falcon's ``FalconLinear`` stay in 16 bits in its pre-quantized directories;
    they are quantized while loading here.
    """
    from lightning_paged.core.conv1d import is_conv1d

    return type(module) is nn.Linear or is_conv1d(module)


def check_settings(
    pre: Prequantized, config: QLoRAConfig, quantized: Sequence[str], stored: Sequence[str]
) -> None:
    """Refuse settings that contradict how the directory was quantized, naming both values.

    ``quantized`` are the layers ``config`` would quantize that transformers' 4-bit load quantizes too,
    ``stored`` the layers the files hold in 4-bit (both by model name). ``compute_dtype`` may differ: it only sets the dtype the 4-bit
    weights are dequantized into, and the strategy's value is used.
    """
    source = f"{pre.config_file}'s quantization_config"
    for setting, ours, theirs, key in (
        ("quant_type", config.quant_type, pre.quant_type, "bnb_4bit_quant_type"),
        ("double_quant", config.double_quant, pre.double_quant, "bnb_4bit_use_double_quant"),
        ("quant_storage", config.quant_storage, pre.quant_storage, "bnb_4bit_quant_storage"),
    ):
        if ours != theirs:
            raise SettingError(
                setting,
                ours,
                f"contradicts the pre-quantized model: {source} has {key}={theirs!r}. Set {setting} to "
                f"{theirs!r}, or load the original 16-bit model to quantize it with other settings",
            )
    ours_only = [n for n in quantized if n not in set(stored)]
    theirs_only = [n for n in stored if n not in set(quantized)]
    if ours_only and not stored:
        raise WeightLoadError(
            f"{pre.config_file} says the weights are bitsandbytes 4-bit, but no file holds a 4-bit layer "
            f"(<layer>.weight.{BLOB_PREFIX}nf4, expected for {listing(ours_only)}); the directory is damaged: "
            "save it again"
        )
    if ours_only or theirs_only:
        parts = []
        if ours_only:
            parts.append(f"would quantize layers the directory holds in 16 bits ({listing(ours_only)})")
        if theirs_only:
            parts.append(f"would leave 16-bit layers the directory holds in 4-bit ({listing(theirs_only)})")
        raise SettingError(
            "skip_modules",
            config.skip_modules,
            " and ".join(parts) + f" ({pre.config_file.parent} was quantized skipping "
            "other layers); set skip_modules to the layers the directory keeps in 16 bits",
        )


def stored_shape(pre: Prequantized, files: WeightFiles, file_layer: str) -> tuple[int, ...]:
    """The unpacked shape of a 4-bit layer, from its quantization state."""
    from bitsandbytes.utils import unpack_tensor_to_dict

    key = pre.layers[file_layer]
    try:
        shape = unpack_tensor_to_dict(files.read(key))["shape"]
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as err:
        raise WeightLoadError(
            f"{files.where(key)} is not a bitsandbytes quantization state ({err}); the directory is "
            "damaged: save it again"
        ) from None
    return tuple(int(s) for s in shape)


def layer_from_files(
    linear: nn.Module,
    pre: Prequantized,
    files: WeightFiles,
    file_layer: str,
    config: QLoRAConfig,
    device: torch.device,
) -> nn.Module:
    """The ``Linear4bit`` for ``linear`` from its packed weight and quantization state in the files."""
    import bitsandbytes as bnb

    stats = {}
    for key in pre.state_keys(file_layer):
        if key in files.entries:
            stats[key.removeprefix(f"{file_layer}.weight.")] = files.read(key)
    packed = files.read(f"{file_layer}.weight")

    def stored(new: Any) -> nn.Parameter:
        try:
            weight = bnb.nn.Params4bit.from_prequantized(
                data=packed,
                quantized_stats=stats,
                requires_grad=False,
                device=device,
                module=new,  # type: ignore[arg-type]
            )
        except (AssertionError, KeyError, ValueError, TypeError) as err:
            raise WeightLoadError(
                f"{files.where(pre.layers[file_layer])}: the 4-bit layer {file_layer} cannot be rebuilt from "
                f"its quantization state ({err or type(err).__name__}); the directory is damaged: save it again"
            ) from None
        # The dequantized weight comes out in the compute dtype, as for a layer quantized here.
        weight.quant_state.dtype = DTYPES[config.compute_dtype]
        return weight

    return linear4bit(linear, config, device, stored)
