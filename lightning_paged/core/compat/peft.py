"""PEFT's undocumented contracts the project relies on, each behind one function. Read from peft 0.21.2."""

from __future__ import annotations

from typing import Any

READ_FROM = "0.21.2"
LOADED_IN_4BIT = "is_loaded_in_4bit"
"""The model attribute PEFT reads to choose its bitsandbytes 4-bit LoRA layer (``tuners/lora/model.py``)."""


def mark_loaded_in_4bit(model: Any) -> None:
    """Tell PEFT that ``model``'s linear layers are bitsandbytes 4-bit, so it wraps them in its 4-bit LoRA layer.

    ``LoraModel._create_and_replace`` passes ``loaded_in_4bit=getattr(self.model, "is_loaded_in_4bit", False)``
    to the layer dispatch; transformers sets it when it loads in 4-bit, the conversion here sets it itself.
    """
    setattr(model, LOADED_IN_4BIT, True)


def unmark_loaded_in_4bit(model: Any) -> None:
    """Remove the mark :func:`mark_loaded_in_4bit` set on ``model`` itself (a block the sharded load adapted)."""
    model.__dict__.pop(LOADED_IN_4BIT, None)
