"""Checkpoint keys to model keys, converted as transformers' own ``from_pretrained`` converts them.

transformers 5 renames and fuses checkpoint tensors on load (its conversion mapping:
``transformers.conversion_mapping.get_model_conversion_mapping``): Mixtral's ``block_sparse_moe`` is
the model's ``mlp``, its per-expert ``experts.N.w1/w3`` are stacked and concatenated into one fused
``experts.gate_up_proj``, GPT-NeoX's ``embed_out`` is ``lm_head``, and so on. This module asks the
installed transformers for that mapping and renames every key with transformers' own
``rename_source_key``, then builds each model tensor with the mapping's own operations
(``MergeModulelist``, ``Concatenate``, ...). Nothing is copied from transformers' tables, so a
family transformers loads is a family this loads.

A fused tensor of experts can also be built one expert at a time (:meth:`Source.read_expert`) when
its operations allow it (stacking the experts first, then work inside one expert), so a streaming
load never holds one layer's experts at 16 bits.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_paged.core.loading.files import WeightFiles


@dataclass
class Source:
    """Where one model tensor comes from: file keys, and the transformers converter that joins them."""

    target: str
    """The model key transformers' converter is keyed by (its first target)."""
    keys: list[str] = field(default_factory=list)
    """The file keys feeding it, in transformers' order (natural order of the keys: expert 0, 1, ...)."""
    patterns: list[str] = field(default_factory=list)
    """The converter's source pattern each key matched (empty without a converter)."""
    converter: Any = None
    """A ``transformers.core_model_loading.WeightConverter``, or None when the tensor is one file key."""

    @property
    def key(self) -> str:
        """The first file key (the only one without a converter), for messages."""
        return self.keys[0]

    def read(self, files: WeightFiles, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Every model tensor this source makes, by model key (one, unless the converter splits)."""
        if self.converter is None:
            return {self.target: files.read(self.key)}
        feeds = [(k, p, functools.partial(files.read, k)) for k, p in zip(self.keys, self.patterns)]
        return self._convert(feeds, model)

    def shapes(self, files: WeightFiles, model: nn.Module | None = None) -> dict[str, tuple[int, ...]]:
        """The shapes :meth:`read` would give, from the files' headers (the converter runs on meta tensors)."""
        if self.converter is None:
            return {self.target: files.entries[self.key].shape}
        feeds = [(k, p, _on_meta(files, k)) for k, p in zip(self.keys, self.patterns)]
        return {name: tuple(t.shape) for name, t in self._convert(feeds, model).items()}

    @property
    def per_expert(self) -> bool:
        """Whether expert ``e`` of the built tensor can be built from expert ``e``'s file tensors alone.

        True for one file key (a slice of it) and for a converter that stacks the experts first
        (``MergeModulelist(dim=0)``) and then only works inside each expert (concatenating or
        transposing along other dimensions).
        """
        if self.converter is None:
            return True
        from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

        operations = list(self.converter.operations)
        if not operations or not (isinstance(operations[0], MergeModulelist) and operations[0].dim == 0):
            return False
        for op in operations[1:]:
            if isinstance(op, Concatenate) and op.dim != 0:
                continue
            if isinstance(op, Transpose) and 0 not in (op.dim0, op.dim1):
                continue
            return False
        return True

    def experts(self) -> int:
        """How many experts feed each of the converter's source patterns (1 without a converter)."""
        if self.converter is None:
            return 1
        counts = {p: self.patterns.count(p) for p in set(self.patterns)}
        return min(counts.values())

    def read_expert(self, files: WeightFiles, expert: int, model: nn.Module | None = None) -> torch.Tensor:
        """Expert ``expert`` of the (fused, 3-D) tensor, read from that expert's file tensors only."""
        if self.converter is None:
            return files.read_slice(self.key, expert)
        feeds = []
        for pattern in dict.fromkeys(self.patterns):
            keys = [k for k, p in zip(self.keys, self.patterns) if p == pattern]
            feeds.append((keys[expert], pattern, functools.partial(files.read, keys[expert])))
        (built,) = self._convert(feeds, model).values()
        return built[0]

    def _convert(
        self, feeds: Sequence[tuple[str, str, Callable[[], torch.Tensor]]], model: nn.Module | None
    ) -> dict[str, torch.Tensor]:
        """The converter's operations (transformers' own) on ``feeds``: (file key, pattern, loader) each."""
        converter = copy.deepcopy(self.converter)
        for key, pattern, load in feeds:
            converter.add_tensor(self.target, key, pattern, load)
        built = converter.convert(self.target, model=model, config=getattr(model, "config", None))
        return {name: value[0] if isinstance(value, list) else value for name, value in built.items()}


def _on_meta(files: WeightFiles, key: str) -> Callable[[], torch.Tensor]:
    entry = files.entries[key]
    return lambda: torch.empty(entry.shape, dtype=entry.dtype, device="meta")


@dataclass
class KeyMap:
    """The model's tensors matched to a directory's file keys."""

    sources: dict[str, Source]
    """Model key to its source (every model key a source makes points to it)."""
    unexpected: list[str]
    """File keys that become no model key."""
    transforms: list[str]
    """The transformers conversions that matched at least one key, for messages and reports."""

    def model_key(self, file_key: str) -> str | None:
        """The model key a single file key was renamed to (None when it feeds a converter or nothing)."""
        for name, source in self.sources.items():
            if source.converter is None and source.key == file_key:
                return name
        return None


def conversions(model: nn.Module) -> list[Any]:
    """transformers' conversion mapping for ``model`` (renamings and converters), empty for other models."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # transformers before 5 renamed nothing on load
        return []
    if not isinstance(model, PreTrainedModel):
        return []
    return list(get_model_conversion_mapping(model))


def map_keys(model: nn.Module, file_keys: Iterable[str], model_keys: dict[str, Any]) -> KeyMap:
    """Match ``file_keys`` to ``model_keys`` (the model's state dict, values unused but not None).

    Follows ``transformers.core_model_loading.convert_and_load_state_dict_in_model`` step by step:
    keys in natural order, every renaming applied then at most one converter
    (``rename_source_key``), the base model's prefix added or removed where the model needs it, and
    a key the model has as it is kept as it is.
    """
    transforms = conversions(model)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    if transforms:
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        ordered = sorted(file_keys, key=dot_natural_key)
    else:
        renamings, converters, by_pattern, ordered = [], [], {}, sorted(file_keys)

    sources: dict[str, Source] = {}
    unexpected: list[str] = []
    for key in ordered:
        if transforms:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix or None, model_keys)
            if renamed not in model_keys and key in model_keys:
                renamed, pattern = key, None
        else:
            renamed, pattern = _with_prefix(key, prefix, model_keys), None
        if renamed not in model_keys:
            unexpected.append(key)
            continue
        if pattern is None:
            sources.setdefault(renamed, Source(renamed, [key]))
            continue
        source = sources.get(renamed)
        if source is None:
            source = sources[renamed] = Source(renamed, converter=by_pattern[pattern])
        source.keys.append(key)
        source.patterns.append(pattern)
    for source in list(sources.values()):  # a converter that splits one tensor makes several model tensors
        if source.converter is not None and len(source.converter.target_patterns) > 1:
            first = source.converter.target_patterns[0]
            for other in source.converter.target_patterns[1:]:
                sources.setdefault(source.target.replace(first, other), source)
    used = [repr(t) for t in transforms if t.was_used()]
    return KeyMap(sources=sources, unexpected=unexpected, transforms=used)


def _with_prefix(key: str, prefix: str, model_keys: Mapping[str, Any]) -> str:
    """``key`` as it is, without ``prefix.`` or with it: whichever the model has."""
    if key in model_keys or not prefix:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1 :] in model_keys:
        return key[len(prefix) + 1 :]
    return f"{prefix}.{key}"


__all__ = ["KeyMap", "Source", "conversions", "map_keys"]
