"""transformers internals the project relies on, each behind one function. Read from transformers 5.25.0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

READ_FROM = "5.25.0"


def no_split_modules(model: Any) -> set[str]:
    """Class names of the blocks a model says must not be split (``PreTrainedModel._no_split_modules``).

    transformers declares its decoder layers there for ``device_map``; the FSDP strategies shard one
    such block at a time (``modeling_utils.py``, ``PreTrainedModel._no_split_modules``).
    """
    return set(getattr(model, "_no_split_modules", None) or [])


def keys_to_ignore_on_load(model: Any, kind: Literal["missing", "unexpected"]) -> list[str]:
    """Patterns of checkpoint keys a model may lack or hold (``_keys_to_ignore_on_load_missing/unexpected``).

    transformers' own loader skips them without a word (``modeling_utils.py``); so does the streaming loader.
    """
    return list(getattr(model, f"_keys_to_ignore_on_load_{kind}", None) or [])


def attn_implementation(model: Any) -> str | None:
    """The attention implementation a model (or a PEFT wrapper of one) runs: ``config._attn_implementation``.

    The config's own record of what ``attn_implementation=`` resolved to (``configuration_utils.py``,
    ``PreTrainedConfig._attn_implementation``); None for a model without a transformers config.
    """
    return config_attn_implementation(getattr(model, "config", None))


def config_attn_implementation(config: Any) -> str | None:
    """What a config says its model's attention runs (``PreTrainedConfig._attn_implementation``), None if unset."""
    return getattr(config, "_attn_implementation", None)


def set_config_attn_implementation(config: Any, implementation: str) -> None:
    """Make a config's models run ``implementation`` attention (the setter of ``_attn_implementation``,
    ``configuration_utils.py``), as ``attn_implementation=`` at ``from_config`` would."""
    config._attn_implementation = implementation


def apply_expert_gate(experts: Any, gate_up: Any) -> Any:
    """An experts module's gate on its fused gate-and-up projection (``_apply_gate``).

    ``use_experts_implementation`` gives every experts class ``_default_apply_gate`` (the activation on
    one half times the other half) unless the class brings its own, as GPT-OSS does; every built-in
    expert loop calls it (``integrations/moe.py``, ``_default_apply_gate`` and ``use_experts_implementation``).
    """
    return experts._apply_gate(gate_up)


def is_expert_parallel(experts: Any) -> bool:
    """Whether an experts module is split across ranks (``_is_expert_parallel``, set by tensor-parallel plans).

    ``use_experts_implementation`` sets it to False in ``__init__`` (``integrations/moe.py``); such a
    module holds only this rank's experts.
    """
    return bool(getattr(experts, "_is_expert_parallel", False))


def set_checkpoint_function(model: Any, function: Callable[..., Any]) -> bool:
    """Make ``function`` the checkpoint call of every checkpointed layer of ``model``; False where it cannot.

    ``PreTrainedModel._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=...)``
    (``modeling_utils.py:3223``), where ``_activation_checkpointing_enable`` installs its own
    (``modeling_utils.py:3176-3181``): every module with a ``gradient_checkpointing`` flag gets it.
    """
    setter = getattr(model, "_set_gradient_checkpointing", None)
    if not callable(setter):
        return False
    setter(enable=True, gradient_checkpointing_func=function)
    return True
