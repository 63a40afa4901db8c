"""paged_qlora_fsdp: FSDP2 over two CPU processes (gloo) against one process, checkpoints, bad input.

The multi-process runs are one launch of two processes and one of a single process
(``tests/scripts/fsdp_train.py``), shared by the tests of this module.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SCRIPTS, child_env, free_port, quiet_trainer

from lightning_paged import PagedQLoRAFSDPStrategy, SettingError

SCRIPT = SCRIPTS / "fsdp_train.py"
STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    dist_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", NODE_RANK="0")
    ranks = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "fsdp", str(out)],
            env=child_env(LOCAL_RANK=str(rank), **dist_env),
            cwd=out,
            stdout=subprocess.DEVNULL,
            stderr=open(out / f"rank{rank}.err", "w"),  # noqa: SIM115
        )
        for rank in (0, 1)
    ]
    for process in ranks:
        process.wait(timeout=600)
    for rank, process in enumerate(ranks):
        assert process.returncode == 0, (out / f"rank{rank}.err").read_text()[-3000:]
    single = subprocess.run(
        [sys.executable, str(SCRIPT), "single", str(out)],
        env=child_env(),
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    return out


def _load(runs: Path, name: str) -> dict:
    return torch.load(runs / name, weights_only=False)


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.slow
def test_two_ranks_train_like_one_process_over_the_same_global_batches(runs):
    ranks = [_load(runs, f"fsdp_rank{r}.pt")["fsdp32"] for r in (0, 1)]
    single = _load(runs, "single.pt")["single32"]
    # each rank's loss is the mean over its half of the global batch (no padding: equal token counts)
    fsdp_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert len(fsdp_losses) == STEPS
    assert fsdp_losses == pytest.approx(single["losses"], abs=1e-5)
    _assert_same(ranks[0]["adapters"], single["adapters"], atol=1e-5)
    _assert_same(ranks[0]["adapters"], ranks[1]["adapters"], atol=0)  # gathered on each rank
    assert any(t.abs().sum() > 0 for n, t in single["adapters"].items() if "lora_B" in n)  # it trained


@pytest.mark.slow
def test_each_rank_holds_half_the_4bit_weights_and_half_the_adapter_state(runs):
    ranks = [_load(runs, f"fsdp_rank{r}.pt")["fsdp32"] for r in (0, 1)]
    for rank in ranks:
        assert rank["blocks"] == 2 and rank["block_class"] == "LlamaDecoderLayer"
        # packed 4-bit data, and with the quantization constants every rank keeps whole
        assert rank["local_packed"] == pytest.approx(rank["total_packed"] / 2, rel=0.10)
        with_constants = rank["local_packed"] + rank["quant_state"]
        assert with_constants == pytest.approx((rank["total_packed"] + rank["quant_state"]) / 2, rel=0.10)
    total_adapter = sum(t.numel() for t in ranks[0]["adapters"].values())
    assert sum(r["local_adapter_elements"] for r in ranks) == total_adapter
    assert ranks[0]["local_adapter_elements"] == total_adapter // 2
    # Adam's two 32-bit states of the local shard only
    assert ranks[0]["state_bytes"] == ranks[0]["local_adapter_elements"] * 4 * 2


@pytest.mark.slow
def test_resume_from_a_two_rank_checkpoint_equals_the_uninterrupted_run(runs):
    for rank in (0, 1):
        results = _load(runs, f"fsdp_rank{rank}.pt")
        whole, resumed = results["fsdp8"], results["fsdp8_resumed"]
        assert resumed["losses"] == whole["losses"][2:]
        _assert_same(resumed["adapters"], whole["adapters"], atol=0)


@pytest.mark.slow
def test_optimizer_state_on_shards_is_paged_and_paged_again_after_a_load(runs):
    results = _load(runs, "fsdp_rank1.pt")
    # host memory marked paged stands in for managed memory: every state buffer of the local shards
    # is paged; what is left is bookkeeping (quantization maps and block maxima of the 8-bit states)
    assert results["fsdp8"]["paged_fraction"] > 0.98
    assert results["fsdp8_resumed"]["paged_fraction"] == results["fsdp8"]["paged_fraction"]
    assert results["fabric"]["paged_fraction"] == results["fabric"]["loaded_paged_fraction"] == 1.0


@pytest.mark.slow
def test_fabric_loop_trains_like_the_lightning_strategy_and_loads_its_checkpoint(runs):
    for rank in (0, 1):
        results = _load(runs, f"fsdp_rank{rank}.pt")
        fabric, lightning = results["fabric"], results["fsdp32"]
        # the same core, batches and clipping (which sums the norms in another order)
        assert fabric["losses"] == pytest.approx(lightning["losses"], abs=2e-6)
        lightning_adapters = {k.removeprefix("model."): v for k, v in lightning["adapters"].items()}
        _assert_same(fabric["adapters"], lightning_adapters, atol=1e-5)
        _assert_same(fabric["loaded_adapters"], fabric["adapters"], atol=0)
    state = _load(runs, "fsdp_rank0.pt")["fabric"]
    assert state["state"]["state"]
    assert _load(runs, "fsdp_rank1.pt")["fabric"]["state"] == {}  # gathered on rank zero only
    for index, saved in state["state"]["state"].items():
        loaded = state["loaded_state"]["state"][index]["__bnb_optimizer_quant_state__"]
        for key, value in saved["__bnb_optimizer_quant_state__"].items():
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_process(runs):
    whole = _load(runs, "fsdp_rank0.pt")["fsdp8"]
    resumed = _load(runs, "single.pt")["single8_resumed"]
    assert len(resumed["losses"]) == STEPS - 2
    _assert_same(resumed["adapters"], whole["adapters"], atol=1e-5)


@pytest.mark.slow
def test_checkpoint_holds_gathered_adapters_and_optimizer_state_and_the_fingerprint(runs):
    checkpoint = torch.load(runs / "fsdp32" / "step=4.ckpt", weights_only=True)
    adapters = _load(runs, "fsdp_rank0.pt")["fsdp32"]["adapters"]
    assert set(checkpoint["state_dict"]) == set(adapters)  # no frozen base weights
    _assert_same(checkpoint["state_dict"], adapters, atol=0)
    meta = checkpoint["lightning_paged"]
    assert meta["fingerprint"]["base"]["kind"] == "tensors"
    assert meta["qlora"]["quant_storage"] == "float32"  # the compute dtype, chosen for sharding
    state = checkpoint["optimizer_states"][0]
    shapes = sorted(
        tuple(s["__bnb_optimizer_quant_state__"]["state1"].shape) for s in state["state"].values()
    )
    assert shapes == sorted(tuple(t.shape) for t in adapters.values())  # whole tensors, not shards
    for index, numels in state["fsdp_shard_numels"].items():
        state1 = state["state"][index]["__bnb_optimizer_quant_state__"]["state1"]
        assert len(numels) == 2 and sum(numels) == state1.numel()


@pytest.mark.slow
def test_eviction_monitor_records_each_rank(runs):
    lines = {
        rank: [json.loads(line) for line in (runs / "fsdp32" / f"eviction_events.rank{rank}.jsonl").open()]
        for rank in (0, 1)
    }
    for rank, records in lines.items():
        steps = [r for r in records if "rank" in r]
        assert steps and {r["rank"] for r in steps} == {rank}
    summary = (runs / "fsdp32" / "eviction_summary.txt").read_text()
    assert "rank 0" in summary and "rank 1" in summary


@pytest.mark.slow
def test_bf16_true_and_whole_tensor_optimizers_are_refused_on_every_rank(runs):
    for rank in (0, 1):
        refused = _load(runs, f"fsdp_rank{rank}.pt")["refused"]
        assert refused["bf16-true"].startswith("trainer.precision conflicts with PagedQLoRAFSDPStrategy")
        assert "cannot step on FSDP shards" in refused["lamb"] and "LAMB" in refused["lamb"]


@pytest.mark.slow
def test_export_reads_an_fsdp_checkpoint(runs, monkeypatch):
    from lightning_paged.commands.export import main

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    settings = {"compute_dtype": "float32", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}
    config = {
        "trainer": {
            "strategy": {"class_path": "lightning_paged.PagedQLoRAFSDPStrategy", "init_args": settings}
        },
        "model": {
            "class_path": "fsdp_train.Module",
            "init_args": {"seed": 100, "optimizer": "paged_adamw_32bit"},
        },
    }
    (runs / "config.yaml").write_text(yaml.safe_dump(config))
    out = runs / "adapter"
    assert (
        main([str(runs / "fsdp32" / "step=4.ckpt"), "--out", str(out), "--config", str(runs / "config.yaml")])
        == 0
    )
    from safetensors.torch import load_file

    exported = load_file(out / "adapter_model.safetensors")
    adapters = _load(runs, "fsdp_rank0.pt")["fsdp32"]["adapters"]
    assert len(exported) == len(adapters)
    assert sorted(t.sum().item() for t in exported.values()) == pytest.approx(
        sorted(t.sum().item() for t in adapters.values())
    )


# --- in-process settings


def test_quant_storage_defaults_to_the_compute_dtype_and_uint8_is_refused():
    assert PagedQLoRAFSDPStrategy(compute_dtype="float16").qlora.quant_storage == "float16"
    assert PagedQLoRAFSDPStrategy().qlora.quant_storage == "bfloat16"
    with pytest.raises(SettingError, match=r"trainer\.strategy\.init_args\.quant_storage must be a floating"):
        PagedQLoRAFSDPStrategy(quant_storage="uint8")


def test_one_device_is_refused_with_paged_qlora_suggested(tiny_llama, launcher_environ):
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(strategy=PagedQLoRAFSDPStrategy(), max_steps=1)
    with pytest.raises(SettingError, match=r"trainer\.devices is one process.*strategy='paged_qlora'"):
        trainer.fit(Module(), [torch.zeros(1, 4, dtype=torch.long)])


def test_strategy_is_registered_by_name():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["paged_qlora_fsdp"]["strategy"] is PagedQLoRAFSDPStrategy


def test_float16_mixed_precision_given_with_the_strategy_by_name_is_refused_before_fit(tiny_llama):
    """On a GPU, ``Trainer(strategy="paged_qlora_fsdp", precision="16-mixed")`` hands the strategy
    Lightning's float16 ``MixedPrecision`` with a gradient scaler (Lightning refuses it only for a
    strategy instance); the check the command runs before fit refuses it in one line."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama

    strategy = PagedQLoRAFSDPStrategy()
    strategy.precision_plugin = MixedPrecision("16-mixed", "cuda")
    with pytest.raises(
        SettingError, match=r"^trainer\.precision cannot be used with paged_qlora_fsdp.*bf16-mixed"
    ):
        strategy.check_module(Module())
    strategy.precision_plugin = MixedPrecision("bf16-mixed", "cuda")
    strategy.check_module(Module())
