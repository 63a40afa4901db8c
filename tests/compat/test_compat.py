"""The fence around Lightning, jsonargparse and OmegaConf internals holds on the installed versions.

A two-step fit of a tiny module on CPU gives the fence functions real objects to read; each fails
loudly, naming the library, the attribute and the version it was read from, on an object without it.
"""

from __future__ import annotations

import inspect
import types

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_paged.compat import jsonargparse as jsonargparse_compat
from lightning_paged.compat import lightning as lightning_compat
from lightning_paged.compat import omegaconf as omegaconf_compat
from lightning_paged.core.compat import CompatError, installed


def test_read_from_is_the_installed_version():
    for module, distribution in (
        (lightning_compat, "lightning"),
        (jsonargparse_compat, "jsonargparse"),
        (omegaconf_compat, "omegaconf"),
    ):
        assert installed(distribution) == module.READ_FROM, distribution


class _During(Callback):
    """What the fence functions read in the middle of a fit (teardown clears some of it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fetcher = lightning_compat.data_fetcher(trainer.fit_loop)
        self.logging_started = lightning_compat.logging_started(trainer)
        self.steps = lightning_compat.batches_that_stepped(trainer)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Trainer:
    trainer = Trainer(
        callbacks=[_During()],
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("fit"),
    )
    trainer.fit(BoringModel())
    return trainer


def test_trainer_internals_read_through_the_fence(fitted: Trainer):
    during = next(c for c in fitted.callbacks if isinstance(c, _During))
    assert (
        during.fetcher is not None and during.logging_started and during.steps == 1
    )  # the last batch, before Lightning counts it
    assert lightning_compat.batches_that_stepped(fitted) == fitted.global_step == 2
    assert lightning_compat.logger_connector(fitted) is fitted._logger_connector
    assert lightning_compat.attached_trainer(fitted.strategy) is fitted


def test_checkpoint_names_and_start_method():
    callback = ModelCheckpoint()
    assert callback._enable_version_counter
    lightning_compat.keep_checkpoint_names(callback)
    assert not callback._enable_version_counter
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    assert lightning_compat.start_method(DDPStrategy(start_method="spawn")) == "spawn"
    assert lightning_compat.start_method(SingleDeviceStrategy("cpu")) is None
    assert lightning_compat.attached_trainer(SingleDeviceStrategy("cpu")) is None


@pytest.mark.parametrize(
    ("read", "attribute"),
    [
        (lambda o: lightning_compat.data_fetcher(o), "_data_fetcher"),
        (lambda o: lightning_compat.logger_connector(o), "_logger_connector"),
        (lambda o: lightning_compat.keep_checkpoint_names(o), "_enable_version_counter"),
        (lambda o: lightning_compat.attached_trainer(o), "_lightning_module"),
        (lambda o: omegaconf_compat.root_node(o), "_get_parent"),
    ],
)
def test_a_moved_internal_fails_loudly(read, attribute):
    with pytest.raises(CompatError, match=rf"SimpleNamespace\.{attribute}") as err:
        read(types.SimpleNamespace())
    library = "omegaconf" if attribute == "_get_parent" else "lightning"
    read_from = omegaconf_compat.READ_FROM if library == "omegaconf" else lightning_compat.READ_FROM
    assert str(err.value).startswith(f"{library} {installed(library)} has no")
    assert f"{library} {read_from} (" in str(err.value)


def test_private_members_the_subclasses_rely_on_exist():
    lightning_compat.check_private_members()
    # and a member that is not there is reported by name
    lightning_compat.PRIVATE_MEMBERS["lightning.pytorch.cli.LightningCLI"]["_gone"] = "pytorch/cli.py: test"
    try:
        with pytest.raises(CompatError, match=r"LightningCLI\._gone.*lightning 2\.6\.6 \(pytorch/cli\.py\)"):
            lightning_compat.check_private_members()
    finally:
        del lightning_compat.PRIVATE_MEMBERS["lightning.pytorch.cli.LightningCLI"]["_gone"]


def test_model_parallel_setup_is_still_the_one_the_fsdp_strategy_repeats():
    assert lightning_compat.model_parallel_setup_steps() == lightning_compat.MODEL_PARALLEL_SETUP_STEPS


def test_the_connectors_fill_parallel_devices_where_the_attribute_exists():
    from lightning.fabric.connector import _Connector
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    for connector in (_AcceleratorConnector, _Connector):
        source = inspect.getsource(connector)
        assert f'hasattr(self.strategy, "{lightning_compat.DEVICES_FILLED_BY_CONNECTOR}")' in source


def test_jsonargparse_messages_and_frames():
    from typing import Literal

    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--mode", type=Literal["nf4", "fp4"])
    parser.add_argument("--rank", type=int | None)
    with pytest.raises(Exception) as err:
        parser.parse_args(["--mode", "nf8"])
    assert jsonargparse_compat.LITERAL.search(str(err.value)), str(err.value)
    with pytest.raises(Exception) as err:
        parser.parse_args(["--rank", "x"])
    assert jsonargparse_compat.UNION in str(err.value)
    with pytest.raises(Exception) as err:
        parser.parse_args(["--nope", "1"])
    assert "nope" in str(err.value)
    dests = [getattr(a, "dest", None) for a in jsonargparse_compat.parser_actions(parser)]
    assert {"mode", "rank"} <= set(dests)
    with pytest.raises(Exception) as err:
        parser.parse_args(["--rank", "x"])
    union_error = err.value
    while union_error is not None and not str(union_error).startswith(jsonargparse_compat.UNION):
        union_error = union_error.__cause__ or union_error.__context__
    assert union_error is not None
    frames = []
    tb = union_error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    branches = jsonargparse_compat.union_branch_errors(frames)
    assert len(branches) == 2, [str(b) for b in branches]  # the int branch and the None branch


def test_omegaconf_root_and_missing_key():
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    config = OmegaConf.create({"trainer": {"max_steps": "${trainer.nope}"}, "model": {"lr": 1}})
    leaf = config.trainer._get_node("max_steps")
    assert omegaconf_compat.root_node(leaf) is config
    with pytest.raises(InterpolationKeyError) as err:
        _ = config.trainer.max_steps
    match = omegaconf_compat.missing_interpolation_key(str(err.value).splitlines()[0])
    assert match is not None and match.group(1) == "trainer.nope"
