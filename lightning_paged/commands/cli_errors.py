"""jsonargparse, YAML and interpolation errors of the LightningCLI, each told as one line.

jsonargparse wraps what went wrong in nested union dumps ("Does not validate against any of the
Union subtypes", a ``Parser key`` per level); :func:`explain_parse_error` finds the error that
matters inside (the project's own :class:`~lightning_paged.core.errors.SettingError`, a value
outside a ``Literal``, a wrong type, an unknown key) and names the key as it is typed on the
command line, with the allowed values and a close match. :func:`locate_setting_error` puts a
module's or data module's own setting name under its config section (``model.init_args.``).
:mod:`lightning_paged.commands.errors` prints the result.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from lightning_paged.compat import jsonargparse as jsonargparse_compat
from lightning_paged.compat.omegaconf import missing_interpolation_key, root_node
from lightning_paged.core.errors import SettingError, UsageError
from lightning_paged.core.settings import did_you_mean

CONFIG_SECTIONS = ("trainer", "model", "data", "ckpt_path", "seed_everything", "vars", "config")
"""The top-level keys of a ``fit``/``validate``/... config."""


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces."""
    return " ".join(text.split())


# --- where a SettingError lives in the user's config -------------------------------------------


def locate_setting_error(err: SettingError, section: str | None = None) -> SettingError:
    """``err`` named as on the command line: ``<section>.init_args.<setting>``.

    ``section`` (``model``, ``data``, ...) defaults to that of the innermost LightningModule,
    LightningDataModule or Callback on the error's traceback: the object whose setting it is.
    """
    name = err.where + err.setting
    top, _, rest = name.partition(".")
    if top in ("model", "data") and rest and not rest.startswith("init_args."):
        return err.located(f"{top}.init_args.{err.where[len(top) + 1 :]}")
    if top in CONFIG_SECTIONS:
        return err
    section = section or _section_on_traceback(err)
    if section is None or name == section:
        return err
    return err.located(f"{section}.init_args.{err.where}")


def _section_on_traceback(err: BaseException) -> str | None:
    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    section = None
    for frame in _frames(err):
        owner = frame.f_locals.get("self")
        if isinstance(owner, LightningModule):
            section = "model"
        elif isinstance(owner, LightningDataModule):
            section = "data"
        elif isinstance(owner, Callback):
            section = "trainer.callbacks"
    return section


def _frames(err: BaseException) -> Iterator[FrameType]:
    """The frames of ``err``'s traceback, outermost first."""
    tb = err.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


# --- jsonargparse --------------------------------------------------------------------------------

_PARSER_KEY = jsonargparse_compat.PARSER_KEY
_CLASS_PATH = jsonargparse_compat.CLASS_PATH
_UNION = jsonargparse_compat.UNION
_LITERAL = jsonargparse_compat.LITERAL
_TYPE = jsonargparse_compat.TYPE
_OPTION = jsonargparse_compat.OPTION
_SUBCOMMAND_OPTION = jsonargparse_compat.SUBCOMMAND_OPTION
_UNRECOGNIZED = "unrecognized arguments: "
_TYPE_NAMES = {
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "NoneType": "null",
    "dict": "a mapping",
    "list": "a list",
}


@dataclass
class _Found:
    """The innermost error of a jsonargparse error, with the config keys that lead to it."""

    keys: list[str]
    error: BaseException
    class_path: str | None = None
    cannot_import: bool = False


def is_parse_error(err: BaseException) -> bool:
    import argparse

    return isinstance(err, argparse.ArgumentError) or (
        isinstance(err, ValueError) and str(err).startswith(_UNION)
    )


def explain_parse_error(
    err: BaseException, keys: Sequence[str] = (), known: Iterable[str] = (), root: Sequence[str] = ()
) -> UsageError:
    """One line for a jsonargparse error: the key as typed, the value, what is allowed.

    ``known`` lists the parser's keys (for "did you mean"); ``root`` is where ``err`` was raised
    when jsonargparse does not say (instantiation errors carry no ``Parser key``).
    """
    found = _innermost(err, list(root))
    return _describe(found, list(known))


def _innermost(err: BaseException, keys: list[str], class_path: str | None = None) -> _Found:
    while True:
        text = str(err)
        if isinstance(err, SettingError):
            return _Found(keys, err, class_path)
        if match := _PARSER_KEY.match(text):
            keys = [*keys, *match.group(1).split(".")]
            inner = _next_cause(err)
            if inner is None:
                return _Found(keys, ValueError(text[match.end() :].strip()), class_path)
            err = inner
        elif match := _CLASS_PATH.match(text):
            class_path = match.group(1)
            cause = err.__cause__
            if cause is None:
                return _Found(keys, ValueError(text[match.end() :].strip()), class_path)
            if isinstance(cause, (ImportError, AttributeError)):
                return _Found([*keys, "class_path"], cause, class_path, cannot_import=True)
            if _takes_init_args(class_path):
                keys = [*keys, "init_args"]
            err = cause
        elif text.startswith(_UNION):
            branches = _union_branches(err)
            if not branches:
                return _Found(keys, err, class_path)
            found = [_innermost(branch, keys, class_path) for branch in branches]
            return _simple_types(found) or max(found, key=_relevance)
        else:
            return _Found(keys, err, class_path)


def instantiating_key(err: BaseException) -> list[str]:
    """The config key (``["trainer", "strategy"]``) jsonargparse was instantiating when ``err`` was raised."""
    return jsonargparse_compat.key_being_instantiated(_frames(err))


def _next_cause(err: BaseException) -> BaseException | None:
    """The first exception ``err`` was raised from whose message differs from its own."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    while cause is not None and str(cause) == text:
        cause = cause.__cause__ or cause.__context__
    return cause


def _union_branches(err: BaseException) -> list[BaseException]:
    """What each subtype of a failed union raised.

    jsonargparse chains only the first of them (often the ``str`` or ``None`` branch, which says
    nothing); the whole list is a local of the function that raised the union error.
    """
    return jsonargparse_compat.union_branch_errors(_frames(err))


def _simple_types(found: list[_Found]) -> _Found | None:
    """For a union of plain types that all refused the value (``bool | int``), one error naming them all."""
    matches = [_TYPE.match(str(f.error).strip()) for f in found]
    if len(found) < 2 or not all(matches) or len({tuple(f.keys) for f in found}) != 1:
        return None
    wanted = [m.group(1) or m.group(2) for m in matches if m and (m.group(1) or m.group(2)) != "NoneType"]
    value = matches[0].group(3) if matches[0] else ""
    names = " or ".join(dict.fromkeys(_TYPE_NAMES.get(w, w) for w in wanted))
    return _Found(found[0].keys, ValueError(f"Expected a {names}. Got value: {value}"))


def _relevance(found: _Found) -> tuple[int, int, int]:
    """Which union branch explains the failure: the project's own error, then the deepest, not ``None``."""
    text = str(found.error)
    trivial = bool(jsonargparse_compat.TRIVIAL_BRANCH.match(text))
    return (isinstance(found.error, SettingError), not trivial, len(found.keys))


def _takes_init_args(class_path: str) -> bool:
    """Whether settings of ``class_path`` sit under ``init_args`` (classes) or directly (dataclasses)."""
    cls = import_class_path(class_path)
    return cls is None or not dataclasses.is_dataclass(cls)


def import_class_path(class_path: Any) -> Any:
    """The object a dotted ``class_path`` names; None when it cannot be imported."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _settings_of(class_path: str | None) -> list[str]:
    """The settings of ``class_path`` as the parser takes them (``**qlora`` resolved to QLoRAConfig's fields)."""
    cls = import_class_path(class_path)
    if cls is None:
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False)
    except Exception:  # a class jsonargparse cannot describe: no list to offer
        return []
    return list(dict.fromkeys(key.split(".")[0] for key in parser.get_defaults().keys()))  # noqa: SIM118  (a Namespace)


def _describe(found: _Found, known: list[str]) -> UsageError:
    key = ".".join(found.keys)
    err = found.error
    text = str(err).strip()
    if isinstance(err, SettingError):
        keys = found.keys[:-1] if found.keys[-1:] == ["init_args"] else found.keys
        section = ".".join(keys) or None
        return UsageError(one_line(str(locate_setting_error(err, section))))
    if found.cannot_import and found.class_path:
        return UsageError(
            f"{key} {found.class_path!r} cannot be imported ({one_line(text)}).{_close_class(found.class_path)}"
        )
    if match := _LITERAL.match(text):
        value = match.group(2).strip()
        try:
            choices = [str(c) for c in ast.literal_eval(f"[{match.group(1)}]")]
        except (SyntaxError, ValueError):
            choices = [match.group(1)]
        close = did_you_mean(value, choices, ". Did you mean {!r}?")
        return UsageError(f"{key} must be one of {', '.join(choices)}; got {value!r}{close}")
    if match := _TYPE.match(text):
        wanted = match.group(1) or match.group(2)
        value = match.group(3).strip()
        return UsageError(f"{key} must be {_TYPE_NAMES.get(wanted, wanted)}; got {value!r}")
    if match := _OPTION.search(text):
        name = match.group(1)
        owner = found.class_path.rpartition(".")[2] if found.class_path else "this section"
        settings = _settings_of(found.class_path)
        hint = f"Settings of {owner}: {', '.join(settings)}" if settings else ""
        return UsageError(f"{key}.{name} is not a setting of {owner}.{did_you_mean(name, settings)}", hint)
    if match := _SUBCOMMAND_OPTION.search(text):
        name = match.group(1)
        return UsageError(f"{name} is not a setting.{did_you_mean(name, known)}")
    if text.startswith(_UNRECOGNIZED):
        return _unrecognized(text[len(_UNRECOGNIZED) :].split(), known)
    first = one_line(text.splitlines()[0] if text else type(err).__name__)
    own = type(err).__module__ in ("builtins",) or type(err).__module__.startswith("jsonargparse")
    if not own:
        first = f"{type(err).__name__}: {first}"
    return UsageError(f"{key}: {first}" if key else first)


def _close_class(class_path: str) -> str:
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError):
        return ""
    names = [n for n in dir(module) if not n.startswith("_")]
    return did_you_mean(name, names, f" Did you mean {module_name}.{{}}?")


def _unrecognized(tokens: list[str], known: list[str]) -> UsageError:
    options = [t for t in tokens if t.startswith("--")] or tokens
    name = options[0].lstrip("-").split("=")[0] if options else ""
    if name.split(".")[0] in ("optimizer", "lr_scheduler"):
        return UsageError(
            f"--{name} is not an option: optimizers and schedules are set under model.init_args.optimizer, "
            "and built over the adapter weights the strategy adds",
            "e.g. --model.init_args.optimizer.name paged_adamw_8bit --model.init_args.optimizer.lr 2e-4",
        )
    if not name:
        return UsageError(f"unrecognized arguments: {' '.join(tokens)}")
    return UsageError(
        f"--{name} is not an option.{did_you_mean(name, known, ' Did you mean --{}?')}",
        "lightning-paged fit --help lists them",
    )


# --- YAML and interpolation ----------------------------------------------------------------------


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config``/``-c`` in ``argv``, in order."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def explain_yaml_error(files: Iterable[str]) -> UsageError | None:
    """The first of ``files`` that is not valid YAML, as ``file:line:column: problem``; None when all are."""
    import yaml

    for name in files:
        path = Path(name)
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            problem = err.problem or err.context or "not valid YAML"
            return UsageError(f"{where}: not valid YAML: {problem}")
        except yaml.YAMLError as err:
            return UsageError(f"{path}: not valid YAML: {one_line(str(err))}")
    return None


def explain_interpolation_error(err: BaseException, subcommand: str | None = None) -> UsageError:
    """A ``${...}`` that names no key: which one, where it is used, and the keys that do exist."""
    text = str(err)
    first = text.splitlines()[0] if text else type(err).__name__
    full_key = _strip_subcommand(str(getattr(err, "full_key", "") or ""), subcommand)
    match = missing_interpolation_key(first)
    if match is None:
        return UsageError(f"{full_key}: {first}" if full_key else first)
    missing = _strip_subcommand(match.group(1), subcommand).lstrip(".")
    parent, _, name = missing.rpartition(".")
    used = f" (in {full_key})" if full_key else ""
    keys = _keys_at(err, f"{subcommand}.{parent}" if subcommand and parent else parent)
    if keys is None:
        where = f"there is no {parent!r} section" if parent else "there is no such key"
        return UsageError(f"${{{missing}}}{used} names no setting: {where}")
    return UsageError(
        f"${{{missing}}}{used} names no setting: {parent or 'the config'} has no {name!r}."
        f"{did_you_mean(name, keys)} Its keys: {', '.join(keys) or 'none'}"
    )


def _strip_subcommand(key: str, subcommand: str | None) -> str:
    if subcommand and key.startswith(f"{subcommand}."):
        return key[len(subcommand) + 1 :]
    return key


def _keys_at(err: BaseException, dotted: str) -> list[str] | None:
    from omegaconf import DictConfig, OmegaConf

    node = root_node(getattr(err, "parent_node", None))
    if node is None:
        return None
    section = OmegaConf.select(node, dotted, throw_on_missing=False) if dotted else node
    if not isinstance(section, DictConfig):
        return None
    return [str(k) for k in section]
