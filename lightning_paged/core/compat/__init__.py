"""The one fence around the framework-free libraries' internals: torch, transformers, PEFT, bitsandbytes.

Each private attribute, private function or undocumented contract of one of these libraries that the
project relies on is reached through one named function here, in the module of its library, with the
version it was read from; ``tests/core/test_compat.py`` fails loudly when one of them moves. Nowhere
else in the package touches another library's ``_private`` names (``tests/test_architecture.py``).
The front-door libraries (Lightning, jsonargparse, OmegaConf) have theirs in
:mod:`lightning_paged.compat`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any


class CompatError(AttributeError):
    """A library no longer has an internal the project reached through its fence (a bug to report, not bad input)."""


def installed(distribution: str) -> str:
    """The installed version of ``distribution`` (``"lightning"``), or ``"not installed"``."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def require(obj: Any, name: str, library: str, read_from: str, source: str) -> Any:
    """``obj.<name>``, or a :class:`CompatError` naming the library, the attribute, the file and READ_FROM.

    Every fence function reads its private through this, so a release that moved one fails at its
    first use with a message that says what to pin, instead of an ``AttributeError`` deep in a run.
    """
    try:
        return getattr(obj, name)
    except AttributeError:
        raise CompatError(missing(library, f"{type(obj).__name__}.{name}", read_from, source)) from None


def missing(library: str, what: str, read_from: str, source: str) -> str:
    """The message for an internal ``what`` of ``library`` (read in ``source``) that the installed version lacks."""
    return (
        f"{library} {installed(library)} has no {what}, which lightning_paged reads from {library} "
        f"{read_from} ({source}): install a {library} version that lightning_paged supports "
        f"(see its pyproject.toml) or report this"
    )
