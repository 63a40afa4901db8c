"""OmegaConf internals the command line relies on, each behind one function. Read from omegaconf 2.4.0."""

from __future__ import annotations

import re
from typing import Any

from lightning_paged.core.compat import require

READ_FROM = "2.4.0"
LIBRARY = "omegaconf"


def root_node(node: Any) -> Any:
    """The root of the config ``node`` belongs to, walking ``Node._get_parent()`` (``omegaconf/base.py``).

    An interpolation error carries only the node it failed at (``parent_node``); its siblings, for
    "did you mean", are found from the root.
    """
    while node is not None:
        parent = require(node, "_get_parent", LIBRARY, READ_FROM, "omegaconf/base.py")()
        if parent is None:
            return node
        node = parent
    return None


_MISSING_KEY = (re.compile(r"resolved to '([^']+)'"), re.compile(r"Interpolation key '([^']+)'"))


def missing_interpolation_key(message: str) -> re.Match[str] | None:
    """The key a failed ``${...}`` names, matched in the first line of OmegaConf's message; group 1 is the key.

    ``InterpolationKeyError`` says "Interpolation key '...' not found" and a relative one "... resolved
    to '...'" (``omegaconf/base.py``, ``Node._resolve_interpolation_from_parse_tree``).
    """
    for pattern in _MISSING_KEY:
        match = pattern.search(message)
        if match is not None:
            return match
    return None
