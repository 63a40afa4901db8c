"""Griffe extension for the API reference: runtime defaults and plain code for Sphinx roles.

The strategies take their defaults from one place (``quant_type: ... = _D.quant_type`` with
``_D = QLoRAConfig()``). Read statically, the reference would print ``_D.quant_type``; this
extension imports the function and puts the value Python actually uses in its place, so every
default on the site is the code's own. Literal defaults are left as griffe read them.

Docstrings also use Sphinx roles (``:class:`~lightning_paged.QLoRAConfig```), which Markdown
would print verbatim; they become code spans with the name as written (the last part after ``~``).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from typing import Any

from griffe import Extension, Function, Object

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


def _runtime_object(func: Function) -> Any:
    module = importlib.import_module(func.module.path)
    target: Any = module
    for part in func.path[len(func.module.path) + 1 :].split("."):
        target = getattr(target, part)
    return target


def _show(value: Any) -> str:
    if isinstance(value, type):
        return value.__qualname__
    return repr(value)


class RuntimeDefaults(Extension):
    """Replaces expression defaults (``_D.lora_r``) with their runtime values (``16``)."""

    def on_function_instance(self, *, func: Function, **kwargs: Any) -> None:
        pending = [p for p in func.parameters if p.default is not None and not _is_literal(str(p.default))]
        if not pending:
            return
        try:
            signature = inspect.signature(_runtime_object(func))
        except (ImportError, AttributeError, TypeError, ValueError):
            return  # leave the source text; the reference still builds
        for param in pending:
            runtime = signature.parameters.get(param.name)
            if runtime is not None and runtime.default is not inspect.Parameter.empty:
                param.default = _show(runtime.default)

    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":`" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(_plain_role, obj.docstring.value)
