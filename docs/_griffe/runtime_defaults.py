"""Griffe extension for the API reference: runtime defaults and plain code for Sphinx roles.

The strategies take their defaults from one place (``quant_type: ... = _D.quant_type`` with
``_D = QLoRAConfig()``), and dataclass fields may have a ``default_factory``. Read statically, the
reference would print ``_D.quant_type`` or ``(lambda: ["lm_head"])()``; this extension imports the
function and puts the value Python actually uses in its place, so every default on the site is the
code's own. Literal defaults are left as griffe read them. It runs after griffe's dataclasses
extension (list ``dataclasses`` before it), which writes the ``__init__`` of each dataclass.

Docstrings also use Sphinx roles (``:class:`~lightning_paged.QLoRAConfig```), which Markdown
would print verbatim; they become code spans with the name as written (the last part after ``~``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

from griffe import Alias, Class, Extension, Function, Module, Object

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _plain_role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1]}`" if match.group(1) else f"`{target}`"


def _is_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return True


def _runtime_object(obj: Object) -> Any:
    target: Any = importlib.import_module(obj.module.path)
    for part in obj.path[len(obj.module.path) + 1 :].split("."):
        target = getattr(target, part)
    return target


def _show(value: Any) -> str:
    if isinstance(value, type):
        return value.__qualname__
    return repr(value)


def _functions(obj: Object) -> Iterator[Function]:
    for member in obj.members.values():
        if isinstance(member, Alias):
            continue
        if isinstance(member, Function):
            yield member
        elif isinstance(member, (Class, Module)):
            yield from _functions(member)


def _fix_defaults(func: Function) -> None:
    pending = [p for p in func.parameters if p.default is not None and not _is_literal(str(p.default))]
    if not pending:
        return
    try:
        runtime = _runtime_object(func)
        signature = inspect.signature(runtime)
    except (ImportError, AttributeError, TypeError, ValueError):
        return  # leave the source text; the reference still builds
    owner = _runtime_object(func.parent) if isinstance(func.parent, Class) else None
    factories = (
        {f.name: f.default_factory for f in dataclasses.fields(owner)}
        if dataclasses.is_dataclass(owner)
        else {}
    )
    for param in pending:
        value = signature.parameters.get(param.name)
        if value is None or value.default is inspect.Parameter.empty:
            continue
        default = value.default
        if default is dataclasses._HAS_DEFAULT_FACTORY and param.name in factories:  # type: ignore[attr-defined]
            default = factories[param.name]()  # type: ignore[misc]
        param.default = _show(default)


class RuntimeDefaults(Extension):
    """Replaces expression defaults (``_D.lora_r``) with their runtime values (``16``)."""

    def on_package(self, *, pkg: Module, **kwargs: Any) -> None:
        for func in _functions(pkg):
            _fix_defaults(func)

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(_plain_role, obj.docstring.value)
