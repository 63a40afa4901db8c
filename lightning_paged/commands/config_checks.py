"""Checks of a parsed ``lightning-paged`` config, run before anything is built, loaded or written.

Each check refuses with a :class:`~lightning_paged.core.errors.SettingError` naming the setting as
it is typed on the command line. They catch what would otherwise fail late (after the data is
tokenized and the model quantized) or with a message about something else: a strategy or
optimizer name with a typo, optimizer settings, ``warmup_steps`` that outlast ``max_steps``, a GPU
accelerator without a GPU, a model tokenizer that is not the data's, output directories that cannot
be written, a ``ckpt_path`` that is not a readable checkpoint, a command-line value YAML read as a
comment, and a ``val_check_interval`` longer than the epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning_paged.commands.cli_errors import import_class_path
from lightning_paged.core.errors import SettingError, UsageError
from lightning_paged.core.settings import did_you_mean

CHECKPOINT_NAMES = ("last", "best", "hpc")
"""``ckpt_path`` values Lightning resolves itself rather than as a file."""
_DIRECTORY_SETTINGS = ("default_root_dir", "save_dir", "root_dir", "dirpath")
_FILE_SETTINGS = ("log_path",)


def check_config(config: Any) -> None:
    """The checks below on the config of one subcommand (the ``fit`` section, say), but ``ckpt_path``'s."""
    trainer = _get(config, "trainer")
    model = _get(config, "model")
    check_strategy_name(_get(trainer, "strategy"))
    check_accelerator(_get(trainer, "accelerator"))
    check_optimizer(model, _get(trainer, "max_steps"))
    check_tokenizers(model, _get(config, "data"))
    check_output_paths(trainer)


def _get(node: Any, key: str) -> Any:
    if node is None:
        return None
    if isinstance(node, dict):
        return node.get(key)
    getter = getattr(node, "get", None)
    return getter(key) if callable(getter) else getattr(node, key, None)


def _as_dict(node: Any) -> Any:
    return node.as_dict() if hasattr(node, "as_dict") else node


def check_strategy_name(strategy: Any) -> None:
    """A strategy given by name must be a registered one."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_paged.commands.run_config import QLORA_STRATEGIES

    if not isinstance(strategy, str) or strategy in StrategyRegistry or strategy == "auto":
        return
    names = sorted(StrategyRegistry.available_strategies())
    raise SettingError(
        "trainer.strategy",
        strategy,
        f"is not a strategy name.{did_you_mean(strategy, names)} QLoRA strategies: {', '.join(QLORA_STRATEGIES)}",
    )


def check_accelerator(accelerator: Any) -> None:
    """A GPU accelerator needs a GPU torch can see."""
    if not isinstance(accelerator, str) or accelerator.lower() not in ("gpu", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SettingError(
            "trainer.accelerator",
            accelerator,
            "asks for a GPU, but torch sees none (torch.cuda.is_available() is False); "
            "use cpu here, or a CUDA build of torch on a machine with an NVIDIA GPU",
        )


def check_optimizer(model: Any, max_steps: Any) -> None:
    """The optimizer settings of a :class:`PagedOptimizerMixin` model, and warm-up shorter than the run."""
    from lightning_paged.core.optimizers import OptimizerConfig
    from lightning_paged.lightning.mixin import PagedOptimizerMixin

    cls = import_class_path(_get(model, "class_path"))
    if not (isinstance(cls, type) and issubclass(cls, PagedOptimizerMixin)):
        return
    where = "model.init_args.optimizer."
    settings = _as_dict(_get(_get(model, "init_args"), "optimizer"))
    config = OptimizerConfig(**settings) if isinstance(settings, dict) else OptimizerConfig()
    try:
        config.validate()
    except SettingError as err:
        raise err.located(where) from None
    if isinstance(max_steps, int) and max_steps > 0 and config.warmup_steps >= max_steps:
        raise SettingError(
            "warmup_steps",
            config.warmup_steps,
            f"must be below trainer.max_steps ({max_steps}): the learning rate would still be warming up "
            "when training stops",
            where=where,
        )


def check_tokenizers(model: Any, data: Any) -> None:
    """The model's ``tokenizer`` (which decodes its samples) must be the data's (which encoded the batches)."""
    model_tokenizer = _get(_get(model, "init_args"), "tokenizer")
    data_tokenizer = _get(_get(data, "init_args"), "tokenizer")
    if not isinstance(model_tokenizer, str) or not isinstance(data_tokenizer, str):
        return
    if _same_tokenizer(model_tokenizer, data_tokenizer):
        return
    raise SettingError(
        "model.init_args.tokenizer",
        model_tokenizer,
        f"differs from data.init_args.tokenizer ({data_tokenizer!r}); the model must use the tokenizer the data "
        "is encoded with: give both the same value",
    )


def _same_tokenizer(a: str, b: str) -> bool:
    if a == b:
        return True
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_output_paths(trainer: Any) -> None:
    """Every output directory in the trainer's config (root, loggers, checkpoints) can be created and written."""
    for name, value, is_file in _output_paths(trainer, "trainer"):
        _check_writable(name, value, is_file)


def _output_paths(node: Any, where: str) -> Iterator[tuple[str, Any, bool]]:
    node = _as_dict(node)
    if isinstance(node, list):
        for item in node:
            yield from _output_paths(item, where)
    elif isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, (str, os.PathLike)) and key in _DIRECTORY_SETTINGS + _FILE_SETTINGS:
                yield f"{where}.{key}", value, key in _FILE_SETTINGS
            elif isinstance(value, (dict, list)) or hasattr(value, "as_dict"):
                yield from _output_paths(value, f"{where}.{key}")


def _check_writable(name: str, value: Any, is_file: bool) -> None:
    path = Path(value).expanduser()
    if is_file:
        if path.is_dir():
            raise SettingError(name, str(value), "is a directory; give a file path")
        path = path.parent
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = (
            "is a file, not a directory" if existing == path else f"cannot be created: {existing} is a file"
        )
        raise SettingError(name, str(value), problem)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingError(name, str(value), f"cannot be written: {existing} is not writable by this user")


def check_checkpoint_path(ckpt_path: Any) -> None:
    """A ``ckpt_path`` file exists and is a checkpoint ``torch.load(weights_only=True)`` reads, as Lightning will."""
    from lightning_paged.core.atomic import read_checkpoint

    value = str(ckpt_path)
    if value in CHECKPOINT_NAMES or value.startswith("registry"):
        return
    path = Path(value).expanduser()
    if not path.is_file():
        from lightning_paged.commands.resume_check import checkpoint_listing

        problem = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise SettingError(
            "ckpt_path", value, problem + checkpoint_listing(path if path.is_dir() else path.parent)
        )
    try:
        read_checkpoint(path, weights_only=True)
    except Exception as err:
        if "weights" not in str(err).lower():
            raise
        raise SettingError(
            "ckpt_path",
            value,
            "is not a Lightning checkpoint: torch.load(weights_only=True), as Lightning resumes, refuses "
            "what it holds; give a .ckpt file that a lightning-paged run wrote",
        ) from err


def check_command_line_comments(argv: list[str], config: Any) -> None:
    """Refuse a command-line value that starts with ``#`` and was parsed as nothing.

    jsonargparse reads command-line values as YAML, where an unquoted ``#`` starts a comment:
    ``--data.init_args.prompt_template "### Question: ..."`` arrives as null, and quoting it in the
    shell does not help (the shell removes the quotes; YAML quotes would stay in the value).
    ``config`` is the parsed config of the subcommand.
    """
    for index, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        option, equals, value = arg.partition("=")
        if not equals:
            if index + 1 >= len(argv):
                continue
            value = argv[index + 1]
        if not value.lstrip().startswith("#") or _get_dotted(config, option[2:]) is not None:
            continue
        section, _, key = option[2:].rpartition(".")
        shown = value if len(value) <= 40 else value[:37] + "..."
        instead = f'set it in a config file, quoted ({key or option[2:]}: "{shown}")'
        if section:
            instead += f', or give its section as JSON: --{section} \'{{"{key}": "{shown}"}}\''
        raise UsageError(
            f"{option} {value!r} starts with #, which YAML (how command-line values are read) takes for a "
            f"comment, so the setting would be empty; {instead}"
        )


def _get_dotted(config: Any, key: str) -> Any:
    try:
        getter = getattr(config, "get", None)
        return getter(key) if callable(getter) else None
    except (KeyError, AttributeError, TypeError):
        return None


def check_val_check_interval(trainer: Any, datamodule: Any) -> None:
    """An integer ``val_check_interval`` must fit in an epoch, which Lightning checks only once ``fit`` runs.

    ``datamodule`` is an :class:`~lightning_paged.InstructionDataModule`; it is tokenized here (what
    its ``setup`` does anyway, once) to count the batches each process trains in an epoch, after
    ``limit_train_batches``, as Lightning counts them (``loops/fit_loop.py``, ``setup_data``).
    """
    interval = getattr(trainer, "val_check_interval", None)
    if not isinstance(interval, int) or isinstance(interval, bool):
        return
    if trainer.check_val_every_n_epoch is None or not trainer.limit_val_batches:
        return  # validation counts batches across epochs, or is off
    import math

    datamodule.setup("fit")
    samples = len(datamodule.train_dataloader().dataset)
    world = max(int(trainer.world_size), 1)
    batches = math.ceil(math.ceil(samples / world) / datamodule.batch_size)
    limit = trainer.limit_train_batches
    limited = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if interval <= limited:
        return
    kind = "rows" if getattr(datamodule, "packing", False) else "samples"
    where = f"{samples} training {kind} in batches of {datamodule.batch_size}"
    if world > 1:
        where += f" on each of {world} processes"
    if limited != batches:
        where += f", limit_train_batches {limit}"
    raise SettingError(
        "trainer.val_check_interval",
        interval,
        f"is more than the {limited} training batches of an epoch ({where}): validation would never run. "
        f"Set it to at most {limited}, or to a fraction of the epoch (0.5), or set "
        "trainer.check_val_every_n_epoch to null to count batches across epochs",
    )
