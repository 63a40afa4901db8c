"""Lightning internals the front doors rely on, each behind one function. Read from lightning 2.6.6.

Paths below are under ``lightning/`` in site-packages.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, TypeAlias

from lightning.fabric.utilities import types as _fabric_types

from lightning_paged.core.compat import CompatError, missing, require

READ_FROM = "2.6.6"
LIBRARY = "lightning"

PathLike: TypeAlias = _fabric_types._PATH  # type: ignore[valid-type]
"""A checkpoint path as Lightning's hooks type it (``fabric/utilities/types.py``, ``_PATH``)."""
Device: TypeAlias = _fabric_types._DEVICE  # type: ignore[valid-type]
"""A device as Lightning's strategies type it (``fabric/utilities/types.py``, ``_DEVICE``)."""

PRIVATE_MEMBERS: dict[str, dict[str, str]] = {
    "lightning.pytorch.cli.LightningCLI": {
        "_parse_ckpt_path": "pytorch/cli.py: overridden to keep the config's model section",
        "_instantiate_trainer": "pytorch/cli.py: overridden to add the rich progress bar",
        "_run_subcommand": "pytorch/cli.py: overridden to tell a bad setting in one line",
        "_subcommand_parsers": "pytorch/cli.py: each subcommand's parser, for did-you-mean keys",
        "_set_seed": "pytorch/cli.py: overridden by the plan command, which parses a fit config and trains nothing",
    },
    "lightning.fabric.loggers.csv_logs._ExperimentWriter": {
        "_check_log_dir_exists": "fabric/loggers/csv_logs.py: overridden to keep an existing metrics.csv",
        "_rewrite_with_new_header": "fabric/loggers/csv_logs.py: overridden to rewrite atomically",
        "_fs": "fabric/loggers/csv_logs.py: the writer's filesystem",
    },
    "lightning.pytorch.loggers.csv_logs.CSVLogger": {
        "_experiment": "fabric/loggers/csv_logs.py: the logger's writer, built on first use",
        "_fs": "fabric/loggers/csv_logs.py: the logger's filesystem",
    },
    "lightning.pytorch.strategies.model_parallel.ModelParallelStrategy": {
        "_data_parallel_size": "pytorch/strategies/model_parallel.py: the data-parallel mesh size",
    },
    "lightning.fabric.strategies.model_parallel.ModelParallelStrategy": {
        "_data_parallel_size": "fabric/strategies/model_parallel.py: the data-parallel mesh size",
    },
    "lightning.fabric.strategies.strategy.Strategy": {
        "_convert_stateful_objects_in_state": "fabric/strategies/strategy.py: what fabric.save writes",
    },
    "lightning.pytorch.strategies.single_device.SingleDeviceStrategy": {
        "_root_device": "pytorch/strategies/single_device.py: the device given at construction",
    },
    "lightning.fabric.strategies.single_device.SingleDeviceStrategy": {
        "_root_device": "fabric/strategies/single_device.py: the device given at construction",
    },
    "lightning.pytorch.core.module.LightningModule": {
        "_trainer": "pytorch/core/module.py: the attached Trainer, None before fit (the property raises)",
    },
}
"""Private members of Lightning classes that the project's subclasses override or read on ``self``.

Overriding or reading them is the point of those subclasses, so they cannot go through a function;
they are declared here instead, each checked to exist by ``tests/compat/test_compat.py``, and
``tests/test_architecture.py`` refuses a subclass's private member of a Lightning base not listed here.
"""

DEVICES_FILLED_BY_CONNECTOR = "parallel_devices"
"""The strategy attribute Lightning's connectors fill from ``accelerator``/``devices`` when it exists.

``hasattr(self.strategy, "parallel_devices")`` (``pytorch/trainer/connectors/accelerator_connector.py``
``_lazy_init_strategy``, ``fabric/connector.py``): the single-device QLoRA strategies declare it so a
strategy given by name runs on the devices the Trainer was told.
"""

MODEL_PARALLEL_SETUP_STEPS = (
    "self.accelerator.setup",
    "is_overridden",
    "any",
    "isinstance",
    "_materialize_distributed_module",
    "self.precision_plugin.convert_module",
    "self.model_to_device",
    "self.barrier",
    "self.setup_optimizers",
    "self.setup_precision_plugin",
    "_optimizers_to_device",
)
"""The calls of ``ModelParallelStrategy.setup`` (``pytorch/strategies/model_parallel.py``), in order.

``PagedQLoRAFSDPStrategy.setup`` cannot call it: it requires a ``configure_model`` hook and
materializes meta modules, where the strategy converts and shards the model itself. It repeats the
steps after those (accelerator, precision, barrier, optimizers, precision plugin); when Lightning
changes them, :func:`model_parallel_setup_steps` stops matching this and the fence test fails.
"""


def model_parallel_setup_steps() -> tuple[str, ...]:
    """The calls ``ModelParallelStrategy.setup`` makes on the installed Lightning, in source order."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    tree = ast.parse(textwrap.dedent(inspect.getsource(ModelParallelStrategy.setup)))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    names = [ast.unparse(n.func) for n in calls]
    return tuple(n for n in names if n not in ("TypeError", "type", "self.model.modules"))


def data_fetcher(fit_loop: Any) -> Any:
    """The fit loop's data fetcher, None before its first epoch (``pytorch/loops/fit_loop.py``, ``_data_fetcher``)."""
    return require(fit_loop, "_data_fetcher", LIBRARY, READ_FROM, "pytorch/loops/fit_loop.py")


def batches_that_stepped(trainer: Any) -> int:
    """The logger step: batches whose optimizer stepped (``pytorch/loops/training_epoch_loop.py``).

    ``_TrainingEpochLoop._batches_that_stepped``: the step Lightning logs rows at and restores on resume.
    """
    loop = trainer.fit_loop.epoch_loop
    return int(
        require(loop, "_batches_that_stepped", LIBRARY, READ_FROM, "pytorch/loops/training_epoch_loop.py")
    )


def logger_connector(trainer: Any) -> Any:
    """The Trainer's ``_LoggerConnector`` (``pytorch/trainer/trainer.py``, ``Trainer._logger_connector``).

    Its public members (``should_update_logs``, ``metrics``) say whether and what a step logs.
    """
    return require(trainer, "_logger_connector", LIBRARY, READ_FROM, "pytorch/trainer/trainer.py")


def logging_started(trainer: Any) -> bool:
    """True once the fit loop has started logging (``_LoggerConnector._first_loop_iter`` is a bool).

    ``pytorch/trainer/connectors/logger_connector/logger_connector.py``: ``should_update_logs``
    asserts it is a bool; before the first training batch it is None.
    """
    source = "pytorch/trainer/connectors/logger_connector/logger_connector.py"
    return isinstance(
        require(logger_connector(trainer), "_first_loop_iter", LIBRARY, READ_FROM, source), bool
    )


def keep_checkpoint_names(callback: Any) -> None:
    """Let ``callback`` (a ``ModelCheckpoint``) overwrite a checkpoint name that exists instead of adding ``-v1``.

    ``ModelCheckpoint._enable_version_counter`` (``pytorch/callbacks/model_checkpoint.py``), the
    constructor's ``enable_version_counter``; a resume turns it off for the callbacks it restores.
    """
    require(callback, "_enable_version_counter", LIBRARY, READ_FROM, "pytorch/callbacks/model_checkpoint.py")
    callback._enable_version_counter = False


def start_method(strategy: Any) -> str | None:
    """A DDP strategy's process start method (``pytorch/strategies/ddp.py``, ``DDPStrategy._start_method``); None elsewhere."""
    from lightning.pytorch.strategies import DDPStrategy

    if not isinstance(strategy, DDPStrategy):
        return None
    return str(require(strategy, "_start_method", LIBRARY, READ_FROM, "pytorch/strategies/ddp.py"))


def attached_trainer(strategy: Any) -> Any:
    """The Trainer a strategy's LightningModule is attached to, None before ``connect``.

    ``Strategy._lightning_module`` (``pytorch/strategies/strategy.py``) and ``LightningModule._trainer``
    (``pytorch/core/module.py``): the public properties raise where these are None.
    """
    module = require(strategy, "_lightning_module", LIBRARY, READ_FROM, "pytorch/strategies/strategy.py")
    if module is None:
        return None
    return require(module, "_trainer", LIBRARY, READ_FROM, "pytorch/core/module.py")


def check_private_members() -> None:
    """Raise :class:`CompatError` for the first member of :data:`PRIVATE_MEMBERS` the installed Lightning lacks."""
    import importlib

    for qualified, members in PRIVATE_MEMBERS.items():
        module_name, _, class_name = qualified.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        for name, source in members.items():
            if not _declares(cls, name):
                raise CompatError(missing(LIBRARY, f"{class_name}.{name}", READ_FROM, source.split(":")[0]))


def _declares(cls: type, name: str) -> bool:
    """``cls`` (or a base) defines ``name`` as a class member or assigns ``self.<name>`` in its source."""
    for base in cls.__mro__:
        if name in vars(base):
            return True
        try:
            if f"self.{name}" in inspect.getsource(base):
                return True
        except (OSError, TypeError):
            continue
    return False
