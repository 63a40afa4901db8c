"""The LightningCLI of ``lightning-paged fit/validate/test``.

Configs are YAML with omegaconf interpolation resolved over the merged config (``${vars.x}``,
``${trainer.default_root_dir}``, command-line overrides included). The CLI's automatic
``--optimizer`` is off: it would build the optimizer over the unconverted model's parameters
before the strategy adds the adapters, and training would silently learn nothing. Optimizers are
set under ``model.init_args.optimizer`` and built over the trainable parameters.
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_paged.commands.cli_errors import (
    config_files,
    explain_interpolation_error,
    explain_parse_error,
    explain_yaml_error,
    instantiating_key,
    locate_setting_error,
    one_line,
)
from lightning_paged.commands.config_checks import (
    check_checkpoint_path,
    check_command_line_comments,
    check_config,
    check_val_check_interval,
)
from lightning_paged.compat import jsonargparse as jsonargparse_compat
from lightning_paged.core.errors import BadInput, SettingError, UsageError

PREDICT_LEFT_OUT = (
    "predict is not a lightning-paged subcommand: no module or data module here defines prediction. To "
    "answer a file of prompts with a trained run, use lightning-paged generate RUN --prompts FILE --out "
    "FILE.jsonl; to load it elsewhere, export its adapter (lightning-paged export RUN --out DIR) and load it "
    "with PEFT onto the base model (docs/checkpoints.md)"
)
"""What ``lightning-paged predict`` answers."""
DESCRIPTION = (
    "NF4 QLoRA fine-tuning with paged optimizers and eviction monitoring. Models: "
    "lightning_paged.CausalLMModule or any LightningModule; data: lightning_paged.InstructionDataModule or "
    "any LightningDataModule."
)


class PagedCLI(LightningCLI):
    """LightningCLI with omegaconf+ interpolation, a ``vars`` section and optimizer settings on the model."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``: ``predict`` is left out (see :data:`PREDICT_LEFT_OUT`)."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name != "predict"}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--vars",
            type=dict[str, Any],
            default={},
            help="Free-form shared values for interpolation elsewhere in the config, e.g. ${vars.max_length}.",
        )

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            if jsonargparse_compat.PROBLEMS_PARSING_CONFIG in str(err):
                raise explain_yaml_error(config_files(argv)) or explain_parse_error(err) from err
            raise explain_parse_error(err, known=self._parser_keys(argv)) from err
        except Exception as err:
            if type(err).__module__.startswith("omegaconf"):
                subcommand = next((a for a in argv if a in self.subcommands()), None)
                raise explain_interpolation_error(err, subcommand) from err
            raise
        subcommand = self.config.get("subcommand")
        check_command_line_comments(argv, self.config.get(subcommand) if subcommand else self.config)

    def _parser_keys(self, argv: list[str]) -> list[str]:
        """The keys of the subcommand's parser (``trainer.max_steps``, ...), for "did you mean"."""
        parsers = getattr(self, "_subcommand_parsers", {})
        parser = next((parsers[a] for a in argv if a in parsers), getattr(self, "parser", None))
        dests = [getattr(a, "dest", None) for a in jsonargparse_compat.parser_actions(parser)]
        return [d for d in dests if d and d != "help"]

    @override
    def _parse_ckpt_path(self) -> None:
        """Check the ``ckpt_path`` file; keep the config's model section.

        Lightning replaces the model section with the checkpoint's saved hyper-parameters here
        (lightning 2.6 ``cli.py``, ``LightningCLI._parse_ckpt_path``), silently dropping every
        ``--model.*`` given with ``--ckpt_path``; ``before_<subcommand>`` compares them instead.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None:
            check_checkpoint_path(ckpt_path)

    @override
    def before_instantiate_classes(self) -> None:
        check_config(self.config[self.subcommand] if self.subcommand else self.config)

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except BadInput:
            raise
        except MisconfigurationException as err:  # Lightning's own bad-input error (the Trainer's settings)
            raise UsageError(one_line(str(err))) from err
        except Exception as err:
            if not str(err).startswith(jsonargparse_compat.UNION):
                raise
            raise explain_parse_error(err, root=instantiating_key(err)) from err

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
            end_process_group()
        except SettingError as err:
            raise locate_setting_error(err) from err
        except MisconfigurationException as err:
            raise UsageError(one_line(str(err))) from err

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        has_bar = any(isinstance(c, ProgressBar) for c in [*(config.get("callbacks") or []), *callbacks])
        if config.get("enable_progress_bar") is not False and not has_bar:
            callbacks = [*callbacks, RichProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def _check_checkpoint(self) -> None:
        """Resolve and check ``--ckpt_path`` before the subcommand writes anything into the run."""
        from lightning_paged.commands.resume_check import check_resume

        assert self.subcommand is not None
        arguments = self.config_init[self.subcommand]
        model_section = self.config[self.subcommand].get("model")
        arguments["ckpt_path"] = check_resume(
            arguments.get("ckpt_path"), self.trainer, self.model, model_section
        )

    # LightningCLI calls before_<subcommand> and after_<subcommand> when present.
    def before_fit(self) -> None:
        # What fit would refuse only after its loggers have cleared an existing log directory.
        from lightning_paged.lightning.data import InstructionDataModule
        from lightning_paged.lightning.strategies.base import QLoRAStrategyMixin

        if isinstance(self.datamodule, InstructionDataModule):
            self.datamodule.check_data()
            check_val_check_interval(self.trainer, self.datamodule)
        strategy = self.trainer.strategy
        if isinstance(strategy, QLoRAStrategyMixin):
            strategy.check_module(self.model)
        warn_unless_qlora = getattr(self.model, "warn_unless_qlora", None)
        if callable(warn_unless_qlora):  # here, in the launching process: ddp_spawn's hooks run elsewhere
            warn_unless_qlora(strategy)
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def after_fit(self) -> None:
        # trainer.log_dir broadcasts (lightning trainer.py, Trainer.log_dir): every rank reads it
        # here, and only then does rank zero print, so no rank waits on a peer that has exited.
        _print_run_summary(self.trainer, self.trainer.log_dir)


@rank_zero_only
def _print_run_summary(trainer: Any, log_dir: str | None) -> None:
    """The end-of-run lines, on rank zero. Touches no collective: ``log_dir`` was read on every rank."""
    from lightning_paged.lightning.monitor import EvictionMonitor

    lines = ["", "Run finished."]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        path = checkpoint.last_model_path or checkpoint.best_model_path
        if path:
            lines.append(f"  checkpoint:      {path}")
    if log_dir:
        lines.append(f"  logs and config: {log_dir}")
    for callback in trainer.callbacks:
        path = getattr(callback, "path", None)
        if isinstance(callback, EvictionMonitor) and path is not None:
            lines.append(f"  eviction log:    {path}")
            report = Path(path).with_name("eviction_report.png")
            lines.append(f"  report:          {_write_report(path, report)}")
    print("\n".join(lines))


def _write_report(log_path: str | Path, out: Path) -> str:
    from lightning_paged.core.plot import ReportError, plot_available, report

    if not plot_available():
        return f"lightning-paged report {log_path} --out {out}  (needs: pip install 'lightning-paged[plot]')"
    try:
        report(Path(log_path), out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return f"not written; run: lightning-paged report {log_path} --out {out}"
    return str(out)


class _ParsedCLI(PagedCLI):
    """The fit config parsed and checked against every class's signature, nothing seeded or built."""

    @override
    def _set_seed(self) -> None:
        pass

    @override
    def before_instantiate_classes(self) -> None:
        pass

    @override
    def instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str], description: str = DESCRIPTION) -> Any:
    """The config ``fit`` would run for ``args`` (files, overrides, interpolation), as a namespace; nothing is built."""
    saved, sys.argv = (
        sys.argv,
        [sys.argv[0], *args],
    )  # LightningCLI warns when handed args beside a command line
    try:
        return _build(_ParsedCLI, None, run=False, description=description).config
    finally:
        sys.argv = saved


def end_process_group() -> None:
    """Destroy the default process group a finished multi-process run started, on every rank.

    Lightning leaves it to the interpreter's exit, where gloo's worker threads can still hold work
    objects: their destruction then aborts the process ("terminate called without an active
    exception", exit code -6) after the run has finished (pytorch/pytorch#179291). Destroying the
    group is local to each rank; no collective runs.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli_main(args: list[str] | None = None, run: bool = True, description: str = DESCRIPTION) -> PagedCLI:
    """Build the CLI. ``run=False`` parses and instantiates without running a subcommand (tests, notebooks)."""
    return _build(PagedCLI, args, run=run, description=description)


def _build(cls: type[PagedCLI], args: list[str] | None, run: bool, description: str) -> PagedCLI:
    from jsonargparse import set_parsing_settings

    from lightning_paged.commands.config_callback import RunConfigCallback

    # Subcommands nest the config under "fit."; this keeps ${vars.x} in a config file pointing at
    # the file's own top level, still resolved after command-line overrides are merged.
    # Attribute docstrings make every settings field (OptimizerConfig, ...) explain itself in --help.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True, docstring_parse_attribute_docstrings=True)
    return cls(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "default_env": False,
            "exit_on_error": False,  # errors reach the command as exceptions, told in one line there
            "description": description,
        },
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )
