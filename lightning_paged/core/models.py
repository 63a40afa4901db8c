"""The causal LM a run trains: built from a transformers config (random weights) or built empty from a local directory.

Framework-free: :class:`~lightning_paged.lightning.module.CausalLMModule` builds its model here, and
so can a hand-written loop. Every refusal names the setting (``model_config.<key>``,
``model_name_or_path``) and what to do; nothing is downloaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_paged.core.errors import SettingError
from lightning_paged.core.loading import WeightLoadError, empty_model
from lightning_paged.core.settings import close_matches

EXTRA_CONFIG_KEYS = {"attn_implementation", "rope_theta", "rope_scaling"}
"""Config arguments that transformers accepts without listing them among a config's attributes."""


def model_from_config(model_config: Mapping[str, Any], tokenizer: Any, tokenizer_name: str = "") -> Any:
    """A randomly initialised causal LM from a transformers config dict with ``model_type``.

    ``vocab_size`` defaults to the tokenizer's size and the special token ids to the tokenizer's;
    ``tokenizer_name`` (as the user gave it) is for messages.
    """
    return causal_lm(transformers_config(model_config, tokenizer, tokenizer_name))


def causal_lm(config: Any) -> Any:
    """The causal LM of a transformers config object, randomly initialised (on the default device).

    Under ``torch.device("meta")`` it holds no memory: the memory plan builds its dry-run model so.
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def transformers_config(
    model_config: Mapping[str, Any], tokenizer: Any = None, tokenizer_name: str = ""
) -> Any:
    """The transformers config object of a dict with ``model_type``, every key checked against it.

    With a ``tokenizer``, ``vocab_size`` and the special token ids default to its own and the
    vocabulary must cover it; without one, ``vocab_size`` is the config class's default unless given.
    """
    from transformers import CONFIG_MAPPING

    settings = dict(model_config)
    model_type = settings.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        close = close_matches(str(model_type), CONFIG_MAPPING.keys(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "e.g. 'llama', 'mistral', 'qwen2'"
        raise SettingError(
            "model_config.model_type", model_type, f"must name a transformers model type; {hint}"
        )
    config_class = CONFIG_MAPPING[model_type]
    known = set(config_class().to_dict()) | _init_arguments(config_class) | EXTRA_CONFIG_KEYS
    for key in settings:
        if key not in known:
            close = close_matches(key, sorted(known), cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"see {config_class.__name__}"
            raise SettingError(f"model_config.{key}", settings[key], f"is not a {model_type} setting; {hint}")
    if tokenizer is not None:
        settings.setdefault("vocab_size", len(tokenizer))
        check_vocab(
            settings["vocab_size"],
            tokenizer,
            tokenizer_name,
            "model_config.vocab_size",
            settings["vocab_size"],
        )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            settings.setdefault(name, getattr(tokenizer, name, None))
    return config_class(**settings)


def model_from_directory(
    model_name_or_path: str, tokenizer: Any, tokenizer_name: str = "", dtype: torch.dtype = torch.bfloat16
) -> Any:
    """The causal LM of a local directory, built empty (:func:`~lightning_paged.core.loading.empty_model`).

    Its weights are read where it is converted (or, without a QLoRA strategy, loaded in ``dtype``).
    """
    path = Path(model_name_or_path).expanduser()
    if not (path / "config.json").is_file():
        problem = "has no config.json" if path.is_dir() else "is not a local directory"
        raise SettingError(
            "model_name_or_path",
            model_name_or_path,
            f"{problem}; give the directory of a saved transformers model (nothing is downloaded), "
            "or model_config to build a model from a config",
        )
    try:
        model = empty_model(path, dtype=dtype)
    except WeightLoadError as err:
        raise SettingError("model_name_or_path", model_name_or_path, f"cannot be loaded: {err}") from None
    rows = model.get_input_embeddings().num_embeddings
    check_vocab(rows, tokenizer, tokenizer_name, "model_name_or_path", model_name_or_path)
    return model


def check_vocab(rows: int, tokenizer: Any, tokenizer_name: str, setting: str, value: object) -> None:
    """The model's vocabulary (``rows`` embeddings) must cover every token id of the tokenizer."""
    if rows < len(tokenizer):
        raise SettingError(
            setting,
            value,
            f"gives a vocabulary of {rows} tokens, fewer than the {len(tokenizer)} of the tokenizer "
            f"({tokenizer_name}); the model's vocabulary must cover every token id",
        )


def _init_arguments(config_class: type) -> set[str]:
    return {name for name in inspect.signature(config_class).parameters if name != "kwargs"}
