"""Mixture-of-experts weights in 4 bits: per-expert bytes, routed-only compute, LoRA on experts as PEFT lays it out."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_paged import QLoRAConfig, SettingError, convert_to_qlora
from lightning_paged.core.experts4bit import ExpertWeights4bit, dense_copy_of_experts
from lightning_paged.testing import tiny_config

FAST = QLoRAConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, gradient_checkpointing=False)


def tiny(model_type: str = "mixtral", dtype: torch.dtype = torch.bfloat16, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).to(dtype)


def experts_of(model) -> dict[str, ExpertWeights4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertWeights4bit)}


def dense_reference(model, converted):
    """``model`` (the 16-bit original) with every weight the conversion quantized replaced by its dequantized copy."""
    import bitsandbytes as bnb

    reference = copy.deepcopy(model)
    state = reference.state_dict()
    for name, module in converted.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            state[name.removesuffix(".base_layer") + ".weight"] = weight
    state.update(dense_copy_of_experts(converted))
    reference.load_state_dict(state)
    return reference


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(quant_type="fp4"),
        dict(double_quant=False),
        dict(compute_dtype="float32", quant_storage="bfloat16"),
    ],
)
def test_each_expert_is_quantized_as_a_linear4bit_weight_would_be(settings):
    import bitsandbytes as bnb

    model = tiny()
    fused = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 3}
    config = QLoRAConfig(**{**vars(FAST), **settings})
    report = convert_to_qlora(model, config, device="cpu")
    experts = experts_of(model)
    assert sorted(experts) == sorted(fused) and report.expert_tensors == sorted(fused, key=list(fused).index)
    for name, weights in experts.items():
        for e in range(weights.num_experts):
            param = bnb.nn.Params4bit(
                fused[name][e].to(getattr(torch, config.compute_dtype)),
                requires_grad=False,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                quant_storage=getattr(torch, config.quant_storage),
            ).to("cpu")
            packed = param.data.reshape(-1).view(torch.uint8)
            assert torch.equal(weights.weight[e].view(torch.uint8), packed), (name, e)
            assert torch.equal(weights.absmax[e], param.quant_state.absmax), (name, e)
            dense = bnb.functional.dequantize_4bit(param.data, param.quant_state)
            assert torch.equal(weights.dequantize(e), dense), (name, e)
        # NF4 theory: 4 bits a value; per block of 64 an 8-bit maximum (32-bit without double quantization);
        # with double quantization a 32-bit maximum per 256 blocks and one 32-bit offset per expert.
        values = weights.out_features * weights.in_features
        blocks = -(-values // 64)
        nested = blocks * 8 + -(-blocks // 256) * 32 + 32
        bits = values * 4 + (nested if config.double_quant else blocks * 32)
        assert 8 * weights.nbytes() == weights.num_experts * bits
    assert report.expert_params == sum(p.numel() for p in fused.values())
    if config.double_quant:
        assert report.expert_bytes <= 0.27 * 2 * report.expert_params
    assert report.expert_bytes == sum(w.nbytes() for w in experts.values())
    assert f"{report.expert_params:,} expert parameters in 4-bit" in report.summary()


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_loss_and_input_gradients_equal_a_dense_copy_of_the_same_4bit_experts(model_type):
    """gpt_oss: experts stored transposed (in x out), with biases and its own gate."""
    model = tiny(
        model_type, **({"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "gpt_oss" else {})
    )
    original = copy.deepcopy(model)
    convert_to_qlora(model, FAST, device="cpu")
    reference = dense_reference(original, model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    embeddings = [m.get_input_embeddings()(ids).detach().requires_grad_() for m in (model, reference)]
    losses = [m(inputs_embeds=x, labels=ids).loss for m, x in zip((model, reference), embeddings)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-3)
    torch.testing.assert_close(embeddings[0].grad, embeddings[1].grad, rtol=0.05, atol=2e-3)


def test_nf4_with_double_quantization_takes_4_127_bits_per_expert_parameter():
    weights = ExpertWeights4bit((2, 512, 1024), False, QLoRAConfig(), torch.device("cpu"))
    for e in range(2):
        weights.set_expert(e, torch.randn(512, 1024))
    assert 8 * weights.nbytes() / (2 * 512 * 1024) == pytest.approx(4.127, abs=0.001)


def test_only_the_experts_the_router_chose_run(monkeypatch):
    model = tiny()
    convert_to_qlora(model, FAST, device="cpu")
    chosen: list[torch.Tensor] = []
    model.model.layers[0].mlp.experts.register_forward_pre_hook(lambda m, args: chosen.append(args[1]))
    used: list[int] = []
    real = ExpertWeights4bit.matmul

    def recording(self, x, expert):  # the real matmul, noting which expert it ran
        used.append(expert)
        return real(self, x, expert)

    monkeypatch.setattr(ExpertWeights4bit, "matmul", recording)
    ids = torch.randint(
        0, 64, (1, 1), generator=torch.Generator().manual_seed(2)
    )  # one token: 2 of 4 experts
    model(input_ids=ids, labels=ids).loss.backward()
    (routed,) = chosen
    assert sorted(used) == sorted(2 * routed.flatten().tolist()) and len(set(used)) == 2


def test_expert_lora_trains_and_loads_in_peft_onto_the_dense_model(tmp_path):
    from peft import PeftModel

    from lightning_paged.core.export import adapter_from_model, save_adapter

    model = tiny(dtype=torch.float32)
    original = copy.deepcopy(model)
    settings = QLoRAConfig(**{**vars(FAST), "lora_on_experts": True, "compute_dtype": "float32"})
    report = convert_to_qlora(model, settings, device="cpu")
    assert report.adapted_experts == ["experts.down_proj", "experts.gate_up_proj"]
    names = [n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n]
    assert names == [  # PEFT's nesting: the parameter registered first is the inner wrapper
        "model.layers.0.mlp.experts.lora_A.default.weight",
        "model.layers.0.mlp.experts.lora_B.default.weight",
        "model.layers.0.mlp.experts.base_layer.lora_A.default.weight",
        "model.layers.0.mlp.experts.base_layer.lora_B.default.weight",
    ]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n)

    save_adapter(adapter_from_model(model), tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(dense_reference(original, model), str(tmp_path / "adapter"))
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_experts_stay_in_16_bits_when_asked():
    model = tiny()
    report = convert_to_qlora(model, QLoRAConfig(**{**vars(FAST), "quantize_experts": False}), device="cpu")
    assert not experts_of(model) and not report.expert_tensors
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


class _OwnExperts(nn.Module):
    """Fused expert weights with a forward of its own, outside transformers' experts interface."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
        self.down_proj = nn.Parameter(torch.randn(2, 4, 4))


def test_experts_outside_transformers_interface_are_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), _OwnExperts())
    with pytest.raises(
        SettingError, match=r"^quantize_experts cannot handle the experts of 1 \(_OwnExperts\).*"
    ):
        convert_to_qlora(model, FAST, device="cpu")
    keep = QLoRAConfig(**{**vars(FAST), "quantize_experts": False})
    convert_to_qlora(model, keep, device="cpu")  # the experts stay as they are
    assert model[1].gate_up_proj.shape == (2, 8, 4)


def test_lora_on_experts_needs_no_dropout():
    with pytest.raises(SettingError, match=r"^lora_dropout cannot be used with lora_on_experts"):
        QLoRAConfig(lora_on_experts=True, lora_dropout=0.05).validate()
    with pytest.raises(SettingError, match=r"^use_dora cannot be used with lora_on_experts"):
        QLoRAConfig(lora_on_experts=True, lora_dropout=0.0, use_dora=True).validate()


def test_merging_lora_on_experts_is_refused_with_what_to_do(tmp_path):
    from lightning_paged.core.export import ExportError, adapter_from_model, merge_adapter

    model = tiny()
    convert_to_qlora(model, QLoRAConfig(**{**vars(FAST), "lora_on_experts": True}), device="cpu")
    with pytest.raises(ExportError, match=r"merging LoRA on fused expert weights .* merge_and_unload\(\)"):
        merge_adapter(adapter_from_model(model), tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
