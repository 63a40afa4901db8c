"""The LightningCLI of ``lightning-paged fit/validate/test/predict``.

Configs are YAML with omegaconf interpolation resolved over the merged config (``${vars.x}``,
``${trainer.default_root_dir}``, command-line overrides included). The CLI's automatic
``--optimizer`` is off: it would build the optimizer over the unconverted model's parameters
before the strategy adds the adapters, and training would silently learn nothing. Optimizers are
set under ``model.init_args.optimizer`` and built over the trainable parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_paged.core.errors import SettingError
from lightning_paged.core.settings import did_you_mean

DESCRIPTION = (
    "NF4 QLoRA fine-tuning with paged optimizers and eviction monitoring. Models: "
    "lightning_paged.CausalLMModule or any LightningModule; data: lightning_paged.InstructionDataModule or "
    "any LightningDataModule."
)


class PagedCLI(LightningCLI):
    """LightningCLI with omegaconf+ interpolation, a ``vars`` section and optimizer settings on the model."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--vars",
            type=dict[str, Any],
            default={},
            help="Free-form shared values for interpolation elsewhere in the config, e.g. ${vars.max_length}.",
        )

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        _check_strategy_name(config.get("trainer", {}).get("strategy"))
        _check_optimizer_name(config.get("model"))

    def after_fit(self) -> None:  # LightningCLI calls after_<subcommand> when present
        _print_run_summary(self.trainer)


def _check_strategy_name(strategy: Any) -> None:
    if not isinstance(strategy, str) or strategy in StrategyRegistry or strategy == "auto":
        return
    names = sorted(StrategyRegistry.available_strategies())
    raise SettingError(
        "trainer.strategy",
        strategy,
        f"is not a strategy name.{did_you_mean(strategy, names)} QLoRA strategies: paged_qlora, paged_qlora_ddp",
    )


def _check_optimizer_name(model: Any) -> None:
    """An optimizer name typo, caught before the model is built and named as the config spells it."""
    from lightning_paged.core.optimizers import resolve_name

    def field(node: Any, key: str) -> Any:
        return node.get(key) if isinstance(node, dict) else getattr(node, key, None)

    name = field(field(field(model, "init_args"), "optimizer"), "name")
    if not isinstance(name, str) or "." in name:
        return
    try:
        resolve_name(name)
    except SettingError as err:
        raise err.located("model.init_args.optimizer.") from None


@rank_zero_only
def _print_run_summary(trainer: Any) -> None:
    from lightning_paged.lightning.monitor import EvictionMonitor

    lines = ["", "Run finished."]
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        path = checkpoint.last_model_path or checkpoint.best_model_path
        if path:
            lines.append(f"  checkpoint:      {path}")
    if trainer.log_dir:
        lines.append(f"  logs and config: {trainer.log_dir}")
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


def located(err: SettingError) -> SettingError:
    """Put the config section in front of a module's or datamodule's own setting name."""
    if err.where:
        return err
    from inspect import signature

    from lightning_paged.lightning.data import InstructionDataModule
    from lightning_paged.lightning.module import CausalLMModule

    root = err.setting.split(".")[0]
    for section, cls in (("data", InstructionDataModule), ("model", CausalLMModule)):
        if root in signature(cls.__init__).parameters:
            return err.located(f"{section}.init_args.")
    return err


def cli_main(args: list[str] | None = None, run: bool = True, description: str = DESCRIPTION) -> PagedCLI:
    """Build the CLI. ``run=False`` parses and instantiates without running a subcommand (tests, notebooks)."""
    from jsonargparse import set_parsing_settings

    # Subcommands nest the config under "fit."; this keeps ${vars.x} in a config file pointing at
    # the file's own top level, still resolved after command-line overrides are merged.
    # Attribute docstrings make every settings field (OptimizerConfig, ...) explain itself in --help.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True, docstring_parse_attribute_docstrings=True)
    return PagedCLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False, "description": description},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RichProgressBar()]},
        args=args,
        run=run,
    )
