"""The memory check before ``fit``, on CPU through a fake memory probe standing in for the GPU's."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import quiet_trainer

from lightning_paged.core.errors import SettingError, UsageError
from lightning_paged.core.eviction.prediction import PREDICTION_NAME
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.plan import plan_memory
from lightning_paged.lightning.data import InstructionDataModule
from lightning_paged.lightning.memory_check import MEMORY_CHECKS
from lightning_paged.lightning.module import CausalLMModule
from lightning_paged.lightning.monitor import EvictionMonitor
from lightning_paged.lightning.strategies import PagedQLoRAStrategy
from lightning_paged.testing import FakeProbe

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
ROWS = [{"instruction": f"Uppercase: {w}", "output": w.upper()} for w in ["cat", "horse", "tiger", "owl"] * 2]
OPTIMIZER = OptimizerConfig(name="paged_adamw")  # 32-bit state: a visible share of the tiny model's step
QLORA = {"compute_dtype": "float32", "lora_dropout": 0.0, "lora_r": 64, "lora_alpha": 64}


def _run(tmp_path, total: int | None, mode: str = "warn", monitor: bool = False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = InstructionDataModule(str(path), val_split=0, batch_size=2, max_length=96)
    module = CausalLMModule(model_config=TINY, optimizer=OPTIMIZER)
    strategy = PagedQLoRAStrategy(memory_check=mode, **QLORA)
    if total is not None:
        strategy.memory_probe = FakeProbe(total=total)
    callbacks = [EvictionMonitor(source="none", log_path=str(tmp_path / "events.jsonl"))] if monitor else []
    trainer = quiet_trainer(
        strategy=strategy, max_steps=1, callbacks=callbacks, default_root_dir=str(tmp_path)
    )
    trainer.fit(module, data)
    return trainer, module


@pytest.fixture(scope="module")
def plan():
    """What the check plans for ``_run``'s fit, without a device limit: the thresholds of the tests."""
    module = CausalLMModule(model_config=TINY, optimizer=OPTIMIZER)
    return plan_memory(
        module.model.config,
        qlora=QLORA,
        optimizer=OPTIMIZER,
        batch_size=2,
        seq_len=96,
        seq_lens=(32,),
        loss=module.loss_kind,  # the module's loss, as the check plans it
        loss_chunk_size=module.loss_chunk_size,
    )


def _short_fits(plan) -> int:
    """A device where 32 tokens fit with paging and 96 do not."""
    return plan.by_seq_len[0].peak_without_paged_bytes


def test_a_run_that_cannot_fit_is_refused_in_one_line_naming_the_levers(tmp_path, plan):
    with pytest.raises(UsageError) as refused:
        _run(tmp_path, total=_short_fits(plan), mode="error")
    text = refused.value.message
    assert "does not fit even with every paged byte evicted" in text
    assert "Levers: sequence length: at most" in text and "activation offloading" in text
    assert "trainer.strategy.init_args.memory_check to warn to try anyway" in text


def test_a_run_that_cannot_fit_warns_once_and_trains(tmp_path, plan):
    with pytest.warns(UserWarning, match="does not fit even with every paged byte evicted") as caught:
        trainer, _ = _run(tmp_path, total=_short_fits(plan))
    assert trainer.global_step == 1
    assert sum("Memory plan" in str(w.message) for w in caught) == 1


def test_a_run_that_fits_only_with_paging_leaves_its_prediction_for_the_report(tmp_path, plan, caplog):
    point = plan.by_seq_len[-1]
    total = (point.peak_without_paged_bytes + plan.peak_bytes) // 2
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        _run(tmp_path, total=total, monitor=True)
    said = caplog.text
    assert "fits only with paging" in said
    saved = json.loads((tmp_path / PREDICTION_NAME).read_text())
    lengths = [p["seq_len"] for p in saved["by_seq_len"]]
    assert lengths == [24, 48, 72, 96] and saved["device_memory"] == total
    assert saved["by_seq_len"][-1]["evicted_bytes"] == plan.peak_bytes - total
    assert "predicted by the memory plan" in said  # the end-of-fit summary's table


def test_a_run_that_fits_says_nothing_and_off_or_no_gpu_plans_nothing(tmp_path, plan, monkeypatch):
    calls = []
    import lightning_paged.lightning.memory_check as check

    real = check.plan_memory
    monkeypatch.setattr(check, "plan_memory", lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=r"(?!Memory plan)")
        _run(tmp_path / "fits", total=plan.peak_bytes * 2)
    assert calls == [1]
    _run(tmp_path / "off", total=plan.peak_bytes // 2, mode="off")
    _run(tmp_path / "cpu", total=None)  # a CPU device and no probe: nothing to plan against
    assert calls == [1]


def test_a_bad_memory_check_is_named():
    with pytest.raises(
        SettingError, match="trainer.strategy.init_args.memory_check must be one of warn, error, off"
    ):
        PagedQLoRAStrategy(memory_check="loud")
    assert MEMORY_CHECKS == ("warn", "error", "off")
