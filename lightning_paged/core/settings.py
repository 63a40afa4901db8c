"""Settings objects from what users write: a dataclass instance, a mapping of its fields, or None.

One rule for every front door (Lightning strategies, Fabric, Accelerate, the export command):
unknown keys are named with their place in the user's config, and the first bad value is named
by :meth:`validate`. :func:`closest` is the one "did you mean" of the project.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import itertools
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from lightning_paged.core.errors import SettingError

T = TypeVar("T")


def close_matches(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` choices near enough to ``word`` to be what a typo of it meant, nearest first."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str], template: str = " Did you mean {!r}?") -> str:
    """``template`` filled with the closest choice, or ``""`` when none is close."""
    match = close_matches(word, choices)
    return template.format(match[0]) if match else ""


def settings_from_mapping(cls: type[T], value: Any, where: str) -> T:
    """A validated ``cls`` (a settings dataclass with ``validate()``) from an instance, a mapping or None.

    ``where`` is the settings' place in the user's config, with a trailing dot (``"qlora."``,
    ``"model.optimizer."``): an unknown key or a bad value is reported as ``<where><name>``.
    """
    if isinstance(value, Mapping):
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = [key for key in value if key not in names]
        if unknown:
            raise SettingError(
                f"{where}{unknown[0]}",
                value[unknown[0]],
                f"is not a setting of {cls.__name__}; its settings: " + ", ".join(names),
            )
        value = cls(**value)
    config = cls() if value is None else value
    if not isinstance(config, cls):
        raise SettingError(
            where.rstrip("."), type(value).__name__, f"must be {cls.__name__}(...) or a dict of its fields"
        )
    try:
        config.validate()  # type: ignore[attr-defined]
    except SettingError as err:
        raise err.located(where) from None
    return config


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source), by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def args_section(docs: dict[str, str], indent: str = "    ") -> str:
    """Google-style ``Args:`` lines for ``docs`` (name to description), for a docstring built at import."""
    lines = [f"{indent}{indent}{name}: {' '.join(text.split())}" for name, text in docs.items()]
    return f"\n\n{indent}Args:\n" + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SettingPlaces:
    """Where a front door's settings live in what its user writes, for error messages.

    Each front door names its places once (``lightning/strategies/base.py``, ``fabric/strategies.py``,
    ``accelerate.py``); a refused setting is reported as ``<place><name>``. Prefixes end with a dot.
    """

    qlora: str
    """The QLoRA settings (:class:`~lightning_paged.core.qlora_config.QLoRAConfig`'s fields)."""
    strategy: str
    """The front door's other conversion settings (``model_attr``, ``block_class``)."""
    optimizer: str
    """The optimizer settings (:class:`~lightning_paged.core.optimizers.OptimizerConfig`'s fields)."""
    precision: str
    """The precision setting, as a whole name."""
    devices: str
    """The device-count setting, as a whole name."""
