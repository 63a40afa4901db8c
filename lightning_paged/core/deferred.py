"""A model built without its weights: the directory they come from and the function that loads them.

:func:`~lightning_paged.core.loading.empty_model` builds such a model and marks it; the conversion
(:func:`~lightning_paged.core.qlora.convert_to_qlora`) finds the mark and hands the model to the
loader it names, which quantizes each weight as it reads it. The mark carries the loader, so the
conversion floor never imports the loading floor above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

_MARK = "_lightning_paged_weights"


@dataclass(frozen=True)
class DeferredWeights:
    """Where an empty model's weights are, and what fills it from there while converting it."""

    directory: Path
    """The model directory whose weight files the model waits for."""
    load_and_convert: Callable[..., Any]
    """``load_and_convert(model, directory, config, device)``: fills the model as it converts it."""


def deferred_weights(model: nn.Module) -> DeferredWeights | None:
    """The mark of a model that still waits for its weights; None when it holds them."""
    mark = model.__dict__.get(_MARK)
    return mark if isinstance(mark, DeferredWeights) else None


def deferred_directory(model: nn.Module) -> Path | None:
    """The directory whose weights ``model`` still waits for, or None when it holds its weights."""
    mark = deferred_weights(model)
    return mark.directory if mark is not None else None


def mark_deferred(model: nn.Module, mark: DeferredWeights | None) -> None:
    """Record (or, with None, clear) where ``model`` will take its weights from."""
    if mark is None:
        model.__dict__.pop(_MARK, None)
    else:
        model.__dict__[_MARK] = mark
