"""jsonargparse internals the command line relies on, each behind one name. Read from jsonargparse 4.53.0.

jsonargparse's errors carry no structure: what went wrong is in their message text and in the
locals of the frames that raised them. The texts matched and the frames read are here, once;
paths are under ``jsonargparse/`` in site-packages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import FrameType

READ_FROM = "4.53.0"
LIBRARY = "jsonargparse"

PROBLEMS_PARSING_CONFIG = "Problems parsing config"
"""How a config file's own parse error begins (``_core.py``, ``_load_config_parser_mode``)."""
UNION = "Does not validate against any of the Union subtypes"
"""How a value no branch of a ``Union`` accepted is told (``_typehints.py``, ``raise_union_unexpected_value``)."""
PARSER_KEY = re.compile(r'Parser key "([^"]+)":')
"""The key each nested level of a parse error names (``_typehints.py``, ``ActionTypeHint``)."""
CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)':")
"""A subclass's ``class_path`` that failed (``_typehints.py``, ``adapt_typehints``)."""
LITERAL = re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", re.S)
"""A value outside a ``Literal`` (``_typehints.py``, ``adapt_typehints``)."""
TYPE = re.compile(r"Expected an? (?:<class '([\w.]+)'>|([\w.\[\], ]+))\. Got value: (.*)", re.S)
"""A value of the wrong type (``_typehints.py``, ``adapt_typehints``)."""
OPTION = re.compile(r"(?:Option|Key) '([^']+)' (?:is )?not accepted")
"""An unknown option or config key (``_core.py``, ``check_config``)."""
TRIVIAL_BRANCH = re.compile(r"Expected an? <class '(NoneType|str)'>")
"""A ``None`` or ``str`` union branch refusing a value: says nothing about what went wrong (``_typehints.py``)."""
SUBCOMMAND_OPTION = re.compile(r"does not accept option '([^']+)'")
"""An option a subcommand does not have (``_core.py``, ``_parse_common``)."""

UNION_RAISER = "raise_union_unexpected_value"
"""The function whose local ``exceptions`` holds what every union branch raised (``_typehints.py``)."""
TYPE_HINT_ACTION = "ActionTypeHint"
"""The action whose ``dest`` is the key being parsed or instantiated (``_typehints.py``)."""


def union_branch_errors(frames: Iterable[FrameType]) -> list[BaseException]:
    """What each branch of a failed union raised: the local ``exceptions`` of :data:`UNION_RAISER`.

    jsonargparse chains only the first of them to the error it raises.
    """
    for frame in frames:
        if frame.f_code.co_name == UNION_RAISER:
            return [e for e in frame.f_locals.get("exceptions", ()) if isinstance(e, BaseException)]
    return []


def key_being_instantiated(frames: Iterable[FrameType]) -> list[str]:
    """The config key (``["trainer", "strategy"]``) of the innermost :data:`TYPE_HINT_ACTION` on ``frames``."""
    keys: list[str] = []
    for frame in frames:
        owner = frame.f_locals.get("self")
        dest = getattr(owner, "dest", None)
        if type(owner).__name__ == TYPE_HINT_ACTION and dest:
            keys = str(dest).split(".")
    return keys


def parser_actions(parser: object) -> list[object]:
    """A parser's actions (argparse's ``ArgumentParser._actions``, which jsonargparse extends)."""
    return list(getattr(parser, "_actions", None) or [])
