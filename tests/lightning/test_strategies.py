"""PagedQLoRAStrategy on CPU: what it converts, parity with a hand-written loop, checkpoints, bad input."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer, tiny_llama_config
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lightning_paged import PagedQLoRADDPStrategy, PagedQLoRAFSDPStrategy, PagedQLoRAStrategy, SettingError

VOCAB = 128


def batches(n: int, seq: int = 12, seed: int = 1) -> DataLoader:
    """``n`` ready-made batches in a fixed order (a loader of pre-collated items)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return DataLoader(out, batch_size=None, shuffle=False)


class LlamaModule(pl.LightningModule):
    """Holds a transformers causal LM as ``self.model``; records losses and adapter gradients."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(tiny_llama_config())
        self.lr = lr
        self.losses: list[float] = []
        self.grad_norms: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        with torch.no_grad():
            self.log("val_loss", self.model(**batch).loss)

    def on_after_backward(self) -> None:
        self.grad_norms.append(
            {
                n: (p.grad.norm().item() if p.grad is not None else 0.0)
                for n, p in self.named_parameters()
                if "lora_B" in n
            }
        )

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**{"limit_val_batches": 0, **kwargs})


def fit(module, steps: int, strategy, data=None, **kwargs) -> pl.Trainer:
    t = trainer(strategy=strategy, max_steps=steps, **kwargs)
    t.fit(module, train_dataloaders=data or batches(steps))
    return t


def test_converts_linears_to_nf4_and_trains_only_adapters():
    module = LlamaModule()
    fit(module, 1, PagedQLoRAStrategy(lora_dropout=0.0))
    layers = {n: m for n, m in module.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per block
    for layer in layers.values():
        assert layer.weight.quant_type == "nf4"
        assert layer.weight.quant_state.nested  # double quantization
        assert layer.weight.dtype == torch.uint8
    assert type(module.model.lm_head) is nn.Linear
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert module.model.model.norm.weight.dtype == torch.float32
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_string_registration_and_fp4_setting():
    module = LlamaModule()
    t = fit(module, 1, "paged_qlora")
    assert isinstance(t.strategy, PagedQLoRAStrategy)
    module = LlamaModule()
    fit(
        module,
        1,
        PagedQLoRAStrategy(quant_type="fp4", double_quant=False, target_modules=["q_proj", "v_proj"]),
    )
    q = module.model.model.layers[0].self_attn.q_proj
    assert q.base_layer.weight.quant_type == "fp4" and not q.base_layer.weight.quant_state.nested
    assert not hasattr(module.model.model.layers[0].self_attn.k_proj, "lora_A")


class PlainModule(pl.LightningModule):
    """No ``model`` attribute: the whole module is converted."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_plain_torch_module_is_converted_whole():
    module = PlainModule()
    data = DataLoader([(torch.randn(4, 16), torch.randint(0, 4, (4,))) for _ in range(2)], batch_size=None)
    fit(module, 2, PagedQLoRAStrategy(skip_modules=["head"], compute_dtype="float32"), data=data)
    assert isinstance(module.net[0].base_layer, bnb.nn.Linear4bit)
    assert type(module.head) is nn.Linear and not module.head.weight.requires_grad
    assert module.net[0].lora_B.default.weight.abs().sum() > 0  # trained


def _hand_written_qlora(seed_model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The reference: bitsandbytes layers swapped in by hand, then PEFT's get_peft_model."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(seed_model)
    for name, linear in list(model.named_modules()):
        if not isinstance(linear, nn.Linear) or name.endswith("lm_head"):
            continue
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4"
        )
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", module=q)
        q.weight = q.weight.to("cpu")  # quantize
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    model.is_loaded_in_4bit = True
    torch.manual_seed(123)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets)
    )
    peft_model.base_model.model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False}
    )
    return peft_model


class SeededLlamaModule(LlamaModule):
    """Seeds right before conversion so LoRA init draws the same numbers as the reference."""

    def setup(self, stage: str) -> None:
        torch.manual_seed(123)


def test_training_step_matches_hand_written_bitsandbytes_peft_loop():
    data = batches(3)
    module = SeededLlamaModule()
    reference = _hand_written_qlora(module.model)
    fit(module, 3, PagedQLoRAStrategy(lora_dropout=0.0, compute_dtype="float32"), data=data)

    optimizer = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
    reference.train()
    ref_losses = []
    for batch in data:
        loss = reference(**batch).loss
        ref_losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert module.losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    ours = {n.removeprefix("model."): p for n, p in module.named_parameters() if p.requires_grad}
    theirs = {
        n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad
    }
    assert set(ours) == set(theirs)
    for name, param in ours.items():
        torch.testing.assert_close(param, theirs[name], rtol=1e-4, atol=1e-6)


def test_checkpoint_holds_only_adapters_and_resume_matches_uninterrupted(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = batches(3)
    straight = LlamaModule()
    t = trainer(strategy=PagedQLoRAStrategy(lora_dropout=0.0), max_epochs=2)
    t.fit(straight, train_dataloaders=data)

    first = LlamaModule()
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    t = trainer(
        strategy=PagedQLoRAStrategy(lora_dropout=0.0),
        max_epochs=1,
        callbacks=[saver],
        enable_checkpointing=True,
    )
    t.fit(first, train_dataloaders=data)
    path = saver.last_model_path or saver.best_model_path
    checkpoint = torch.load(path, weights_only=False)
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == trainable
    assert checkpoint["optimizer_states"] and checkpoint["global_step"] == 3

    resumed = LlamaModule()
    t = trainer(strategy=PagedQLoRAStrategy(lora_dropout=0.0), max_epochs=2)
    t.fit(resumed, train_dataloaders=data, ckpt_path=path)
    assert len(resumed.losses) == 3
    assert first.losses + resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, msg=name)


def test_checkpoint_from_other_lora_settings_is_refused(tmp_path):
    t = fit(LlamaModule(), 1, PagedQLoRAStrategy(lora_r=8))
    path = tmp_path / "r8.ckpt"
    t.save_checkpoint(path)
    t = trainer(strategy=PagedQLoRAStrategy(target_modules=["q_proj"]), max_steps=2)
    with pytest.raises(RuntimeError, match="does not fit this model"):
        t.fit(LlamaModule(), train_dataloaders=batches(2), ckpt_path=path)
    t = trainer(strategy=PagedQLoRAStrategy(lora_r=4), max_steps=2)
    with pytest.raises(RuntimeError, match="another lora_r"):
        t.fit(LlamaModule(), train_dataloaders=batches(2), ckpt_path=path)


def test_validation_between_training_steps_does_not_change_training():
    """On CPU an eval forward repacks 4-bit weights in place; the next training steps must not notice."""
    repacked = []

    class Probe(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            repacked.append(
                sum(
                    bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
                    for m in pl_module.modules()
                    if isinstance(m, bnb.nn.Linear4bit)
                )
            )

    plain = LlamaModule()
    fit(plain, 4, PagedQLoRAStrategy(lora_dropout=0.0), data=batches(4))
    validated = LlamaModule()
    t = trainer(
        strategy=PagedQLoRAStrategy(lora_dropout=0.0),
        max_steps=4,
        limit_val_batches=1,
        val_check_interval=1,
        callbacks=[Probe()],
    )
    t.fit(validated, train_dataloaders=batches(4), val_dataloaders=batches(1, seed=7))
    assert repacked == [0, 0, 0, 0]  # base weights keep their training layout through validation
    assert all(value > 0 for step in validated.grad_norms for value in step.values())
    assert validated.losses == plain.losses
    assert validated.grad_norms == plain.grad_norms


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="repacking happens only with AVX512-BF16")
def test_restore_training_layout_undoes_cpu_repacking():
    from lightning_paged.core.layers4bit import linear4bit_layers, restore_training_layout
    from lightning_paged.core.qlora import QLoRAConfig, convert_to_qlora

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    convert_to_qlora(model, QLoRAConfig(lora_dropout=0.0, compute_dtype="float32"))
    layers = linear4bit_layers(model)
    ids = torch.randint(0, VOCAB, (2, 8))

    def adapter_grads():
        model.zero_grad()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if "lora_B" in n]

    before = adapter_grads()
    for layer in layers:  # what a layer outside our conversion does on an eval forward
        layer.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    assert restore_training_layout(layers) == len(layers)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    after = adapter_grads()
    for a, b in zip(after, before):  # equal up to the bfloat16 absmax the repacking stored
        assert (a - b).norm() <= 2e-2 * b.norm()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "nf8"}, "trainer.strategy.init_args.quant_type must be one of nf4, fp4"),
        ({"compute_dtype": "fp8"}, "trainer.strategy.init_args.compute_dtype must be one of"),
        ({"lora_r": 0}, "trainer.strategy.init_args.lora_r must be a positive integer"),
        ({"target_modules": "all"}, "target_modules must be 'all-linear' or a list"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(SettingError, match=message):
        PagedQLoRAStrategy(**kwargs)


def test_target_modules_matching_nothing_lists_the_linear_layers():
    t = trainer(strategy=PagedQLoRAStrategy(target_modules=["qkv_proj"]), max_steps=1)
    with pytest.raises(SettingError, match=r"match no linear layer; linear layers found: .*self_attn.q_proj"):
        t.fit(LlamaModule(), train_dataloaders=batches(1))


def test_model_without_linear_layers_is_refused():
    class NoLinear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Conv1d(2, 2, 1))

        def training_step(self, batch, batch_idx):
            return self.model(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    t = trainer(strategy=PagedQLoRAStrategy(), max_steps=1)
    with pytest.raises(SettingError, match="has no nn.Linear layers"):
        t.fit(NoLinear(), train_dataloaders=DataLoader([torch.randn(1, 2, 3)], batch_size=None))


def test_true_half_precision_is_refused_mixed_is_accepted():
    t = trainer(strategy=PagedQLoRAStrategy(), max_steps=1, precision="bf16-true")
    with pytest.raises(SettingError, match=r"trainer.precision conflicts with PagedQLoRAStrategy"):
        t.fit(LlamaModule(), train_dataloaders=batches(1))
    module = LlamaModule()
    fit(module, 1, PagedQLoRAStrategy(), precision="bf16-mixed")
    assert module.losses and torch.isfinite(torch.tensor(module.losses)).all()


def test_spawn_start_method_is_refused_for_ddp():
    with pytest.raises(SettingError, match="start_method must be 'popen'"):
        PagedQLoRADDPStrategy(start_method="spawn")


def test_single_device_strategy_refuses_several_devices():
    t = trainer(strategy="paged_qlora", devices=2, max_steps=1)
    with pytest.raises(SettingError, match="use strategy='paged_qlora_ddp'"):
        t.fit(LlamaModule(), train_dataloaders=batches(1))


def test_strategies_take_every_qlora_setting_by_name_and_refuse_an_unknown_one():
    from dataclasses import asdict

    from lightning_paged import QLoRAConfig

    wanted = QLoRAConfig(
        quant_type="fp4",
        double_quant=False,
        compute_dtype="float32",
        quant_storage="float32",
        skip_modules=["lm_head", "o_proj"],
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj"],
        use_rslora=True,
        use_dora=True,
        gradient_checkpointing=False,
        offload_activations=True,
        upcast_non_quantized=True,
    )
    assert wanted != QLoRAConfig() and all(v != getattr(QLoRAConfig(), k) for k, v in asdict(wanted).items())
    for cls in (PagedQLoRAStrategy, PagedQLoRADDPStrategy, PagedQLoRAFSDPStrategy):
        assert cls(**asdict(wanted)).qlora == wanted, cls
        with pytest.raises(SettingError, match=r"^trainer\.strategy\.init_args\.lora_rank is not a setting"):
            cls(lora_rank=8)


@pytest.mark.parametrize(
    "cls", [PagedQLoRAStrategy, PagedQLoRADDPStrategy, PagedQLoRAFSDPStrategy], ids=lambda c: c.__name__
)
def test_cli_help_of_both_strategies_shows_each_qlora_setting_with_its_docstring(cls, capsys):
    from dataclasses import fields

    from lightning_paged import QLoRAConfig
    from lightning_paged.commands.main import main
    from lightning_paged.core.settings import field_docs

    with pytest.raises(SystemExit):
        main(["fit", "--trainer.strategy.help", f"lightning_paged.{cls.__name__}"])
    help_text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(QLoRAConfig)
    assert set(docs) == {f.name for f in fields(QLoRAConfig)}
    entries: dict[str, str] = {}  # option name to its help entry (an option's "+" form joined to it)
    for piece in help_text.split("Help for", 1)[1].split(" --trainer.strategy.")[1:]:
        name = piece.split(" ", 1)[0].rstrip(",+")
        entries[name] = entries.get(name, "") + " " + piece
    defaults = QLoRAConfig()
    for name, doc in docs.items():
        # each field with its docstring, its type and its true default (a list's included)
        entry = entries[name]
        assert " ".join(doc.split()[:4]) in entry, name
        default = getattr(defaults, name)
        if cls is PagedQLoRAFSDPStrategy and name == "quant_storage":
            default = None  # the FSDP strategy's own: unset takes compute_dtype
        shown = "null" if default is None else str(default)
        assert f"default: {shown})" in entry, (name, entry)
    assert "default: ['lm_head']" in help_text


def test_the_strategy_lets_callbacks_prepare_before_its_device_set_up(tiny_llama):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lightning_paged import PagedQLoRAStrategy
    from lightning_paged.lightning.mixin import PagedOptimizerMixin

    order: list[str] = []

    class Recorder(pl.Callback):
        def before_cuda_init(self, device: torch.device) -> None:
            order.append(f"before_cuda_init {device.type}")

        def setup(self, trainer, pl_module, stage):
            order.append("setup")

    class Module(PagedOptimizerMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

    strategy = PagedQLoRAStrategy(lora_r=2, compute_dtype="float32", gradient_checkpointing=False)
    trainer = quiet_trainer(strategy=strategy, max_steps=1, callbacks=[Recorder()])
    trainer.fit(Module(), DataLoader([torch.randint(0, 128, (8,))], batch_size=1))
    assert order[:2] == ["before_cuda_init cpu", "setup"]  # setup_environment comes before every setup hook


# --- an optimizer that holds no adapter: refused; adapters outside every optimizer: a warning ------


def test_a_users_lightning_cli_with_its_own_optimizer_is_refused_before_training(tmp_path, monkeypatch):
    """``LightningCLI(MyModule, MyData)`` keeps its default ``auto_configure_optimizers=True``; its
    ``--optimizer`` is built over the model before the strategy converts it: no adapter in it."""
    import json
    import sys

    from lightning.pytorch.cli import LightningCLI

    from lightning_paged import CausalLMModule, InstructionDataModule
    from lightning_paged.core.errors import UsageError

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in "abcdefgh"))
    model_config = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    args = [
        "fit",
        "--optimizer",
        "torch.optim.AdamW",
        "--optimizer.lr",
        "0.01",
        "--trainer.strategy",
        "paged_qlora",
        "--trainer.accelerator",
        "cpu",
        "--trainer.max_steps",
        "2",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.model_config={json.dumps(model_config)}",
        f"--data.data_path={data}",
        "--data.val_split=0",
        "--data.batch_size=2",
    ]
    monkeypatch.setattr(sys, "argv", ["my_cli.py"])
    with (
        pytest.warns(UserWarning, match="configure_optimizers` will be overridden"),
        pytest.raises(UsageError, match=r"AdamW holds none of the model's \d+ trainable adapter") as raised,
    ):
        LightningCLI(CausalLMModule, InstructionDataModule, args=args, save_config_callback=None)
    message = str(raised.value)
    assert "before the conversion" in message and "auto_configure_optimizers=False" in message


def test_adapters_outside_every_optimizer_are_named_in_a_warning():
    class OnlyA(LlamaModule):
        def configure_optimizers(self):
            return torch.optim.AdamW([p for n, p in self.named_parameters() if "lora_A" in n], lr=self.lr)

    module = OnlyA()
    with pytest.warns(
        UserWarning, match=r"of the model's \d+ trainable adapter parameters are in no optimizer .*lora_B"
    ):
        fit(module, 1, PagedQLoRAStrategy())


class OwnLayersModule(pl.LightningModule):
    """A LightningModule of its own linear layers: no transformers checkpointing to offload from."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(VOCAB, 32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, VOCAB))
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["input_ids"])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_offload_activations_puts_the_hooks_on_the_checkpointed_layers_and_changes_no_result():
    runs = {}
    for offload in (False, True):
        module = LlamaModule()
        strategy = PagedQLoRAStrategy(lora_dropout=0.0, compute_dtype="float32", offload_activations=offload)
        fit(module, 2, strategy)
        runs[offload] = (module, strategy)
    (plain, _), (module, strategy) = runs[False], runs[True]
    stats = strategy.conversion_report.offload
    assert stats is not None and strategy.step_offload is None
    assert "checkpointed layer inputs wait in host memory" in strategy.conversion_report.summary()
    # On the host nothing moves, but every block's saved input went through the hooks.
    assert stats.offloaded_tensors == 0 and stats.kept_tensors == 2 * module.model.config.num_hidden_layers
    assert module.losses == plain.losses


def test_offload_activations_on_any_lightning_module_wraps_its_training_steps():
    runs = {}
    for offload in (False, True):
        module = OwnLayersModule()
        strategy = PagedQLoRAStrategy(lora_dropout=0.0, compute_dtype="float32", offload_activations=offload)
        fit(module, 2, strategy)
        runs[offload] = (module, strategy)
    (plain, _), (module, strategy) = runs[False], runs[True]
    assert strategy.conversion_report.offload is None
    assert "no gradient checkpointing to offload from" in strategy.conversion_report.summary()
    assert strategy.step_offload is not None and strategy.step_offload.stats.kept_tensors > 0
    assert module.losses == plain.losses
