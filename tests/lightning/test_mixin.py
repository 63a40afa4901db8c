"""PagedOptimizerMixin: settings, trainable parameters, schedule, coverage logging, resume, LightningCLI."""

from __future__ import annotations

import logging
import warnings

import bitsandbytes as bnb
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_paged.core.errors import SettingError
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.lightning.mixin import PagedOptimizerMixin
from lightning_paged.testing import HostMemory

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"
)


class Tiny(PagedOptimizerMixin, LightningModule):
    """A frozen base layer, a trainable adapter, a norm and a head; two batches per epoch."""

    def __init__(self, optimizer: OptimizerConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.base = nn.Linear(16, 16)
        self.base.requires_grad_(False)
        self.adapter = nn.Linear(16, 16, bias=False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 1)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        x, y = batch
        return F.mse_loss(self.head(self.norm(self.base(x) + self.adapter(x))), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 16, generator=gen), torch.randn(16, 1, generator=gen))
        return DataLoader(data, batch_size=8)


class NoSettings(PagedOptimizerMixin, LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)


def _trainer(max_steps, **kwargs):
    defaults = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


def _optimizer_of(module):
    return module.configure_optimizers()["optimizer"]


def test_a_module_without_settings_gets_the_defaults():
    optimizer = _optimizer_of(NoSettings())
    assert isinstance(optimizer, bnb.optim.AdamW)
    assert optimizer.args.optim_bits == 8 and optimizer.is_paged
    assert optimizer.param_groups[0]["lr"] == OptimizerConfig().lr


def test_only_trainable_parameters_with_no_decay_on_biases_and_norms():
    module = Tiny(OptimizerConfig(name="adamw", weight_decay=0.1))
    optimizer = _optimizer_of(module)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(module.adapter.weight), id(module.head.weight)}
    expected = {id(module.norm.weight), id(module.norm.bias), id(module.head.bias)}
    assert {id(p) for p in no_decay["params"]} == expected


def test_settings_rule_attribute_then_hparams_then_defaults():
    module = Tiny(OptimizerConfig(name="lion_8bit"))
    assert module.resolved_optimizer_config().name == "lion_8bit"  # from hparams
    module.optimizer_config = OptimizerConfig(name="paged_lion_32bit")
    assert module.resolved_optimizer_config().name == "paged_lion_32bit"  # the attribute wins
    module.optimizer_config = None
    module.hparams["optimizer"] = {"name": "adam", "lr": 0.5}  # as a checkpoint may hold it
    assert module.resolved_optimizer_config() == OptimizerConfig(name="adam", lr=0.5)


def test_a_bad_setting_names_where_it_lives():
    with pytest.raises(SettingError, match=r"^model\.optimizer\.lr must be positive"):
        Tiny(OptimizerConfig(lr=-1.0)).configure_optimizers()
    with pytest.raises(
        SettingError,
        match=r"^model\.optimizer\.name is not an optimizer name \(did you mean 'paged_lion_8bit'",
    ):
        Tiny(OptimizerConfig(name="paged_lion8bit")).configure_optimizers()
    frozen = NoSettings()
    frozen.requires_grad_(False)
    with pytest.raises(SettingError, match="has no trainable parameters"):
        frozen.configure_optimizers()


def test_fit_steps_the_schedule_per_optimizer_step_and_reports_coverage_once():
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(handler)
    try:
        module = Tiny(OptimizerConfig(name="paged_adamw_8bit", lr=0.1, scheduler="cosine", warmup_steps=1))
        trainer = _trainer(4, accumulate_grad_batches=2)  # 8 batches, 4 optimizer steps
        trainer.fit(module)
    finally:
        lightning_logger.removeHandler(handler)
    assert trainer.global_step == 4
    cosine = [0.05, 0.1, 0.075, 0.025]  # warmup 1 of 4 steps, then cosine over 3
    assert module.lrs == pytest.approx([lr for lr in cosine for _ in range(2)])
    lines = [r for r in records if r.startswith("paging:")]
    assert len(lines) == 1 and "paging unavailable on cpu" in lines[0]
    assert trainer.logged_metrics["paging/paged_fraction"] == 0.0
    assert trainer.logged_metrics["paging/unpaged_bytes/paging_unavailable_on_cpu"] > 0


def test_warmup_ratio_counts_the_steps_of_max_epochs_when_max_steps_is_unset():
    module = Tiny(OptimizerConfig(name="adamw", lr=0.1, warmup_ratio=0.5))
    trainer = _trainer(-1, max_epochs=3, accumulate_grad_batches=2)  # 2 batches an epoch: 1 optimizer step
    trainer.fit(module)
    assert trainer.global_step == 3
    # ceil(0.5 * 3) = 2 warmup steps, rising from lr / 3, then the constant rate
    assert module.lrs == pytest.approx([lr for lr in (0.1 / 3, 0.2 / 3, 0.1) for _ in range(2)])


def _paged_module(config):
    module = Tiny(config)
    module.managed_memory = HostMemory()
    return module


def test_resume_puts_state_back_in_paged_memory_and_continues_like_an_uninterrupted_run(tmp_path):
    config = OptimizerConfig(name="paged_adamw_32bit", lr=0.05, scheduler="linear", weight_decay=0.01)
    uninterrupted = _paged_module(config)
    _trainer(4).fit(uninterrupted)

    first = _paged_module(config)  # the same run, saving a checkpoint after step 2
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    _trainer(4, enable_checkpointing=True, callbacks=[checkpoint]).fit(first)
    assert all(s["state1"].is_paged for s in first.trainer.optimizers[0].state.values())

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("lightning.pytorch").addHandler(handler)
    try:
        resumed = _paged_module(config)
        trainer = _trainer(4, enable_checkpointing=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(resumed, ckpt_path=tmp_path / "epoch=0-step=2.ckpt")
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(handler)
    assert any("state tensors back in paged memory" in r for r in records), records
    assert trainer.logged_metrics["paging/paged_fraction"] == 1.0
    states = trainer.optimizers[0].state.values()
    assert all(s["state1"].is_paged and s["state2"].is_paged for s in states)
    assert resumed.lrs == uninterrupted.lrs[2:]
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lightning_cli_configures_name_lr_and_scheduler_from_yaml(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "model:\n"
        "  optimizer:\n"
        "    name: lion_8bit\n"
        "    lr: 0.01\n"
        "    scheduler: linear\n"
        "    warmup_steps: 1\n"
        "trainer:\n"
        "  accelerator: cpu\n"
        "  max_steps: 4\n"
        "  logger: false\n"
        "  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
    )
    cli = LightningCLI(
        Tiny,
        run=False,
        auto_configure_optimizers=False,
        save_config_callback=None,
        args=["--config", str(config), "--model.optimizer.lr=0.02"],
    )
    settings = cli.model.resolved_optimizer_config()
    assert (settings.name, settings.lr, settings.scheduler, settings.warmup_steps) == (
        "lion_8bit",
        0.02,
        "linear",
        1,
    )
    cli.trainer.fit(cli.model)
    assert isinstance(cli.trainer.optimizers[0], bnb.optim.Lion)
    assert cli.trainer.optimizers[0].args.optim_bits == 8
    assert cli.model.lrs == pytest.approx([0.01, 0.02, 0.02 * 2 / 3, 0.02 / 3])


def test_lightning_cli_help_lists_the_optimizer_settings(capsys):
    with pytest.raises(SystemExit):
        LightningCLI(Tiny, run=False, auto_configure_optimizers=False, args=["--help"])
    out = capsys.readouterr().out
    assert "--model.optimizer.help" in out
    assert "--optimizer " not in out  # the automatic optimizer is off
    with pytest.raises(SystemExit):
        LightningCLI(Tiny, run=False, auto_configure_optimizers=False, args=["--model.optimizer.help"])
    out = capsys.readouterr().out
    for flag in ("name NAME", "lr LR", "scheduler {constant,linear,cosine}", "warmup_steps", "page_adapters"):
        assert f"--model.optimizer.{flag}" in out
