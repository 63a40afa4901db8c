"""The plan follows the run's loss (chunked by default, or standard) and its activation offloading."""

from __future__ import annotations

import functools

import torch

from lightning_paged.core.causal_lm_loss import batch_loss
from lightning_paged.core.optimizers import OptimizerConfig
from lightning_paged.core.plan import RealRun, plan_memory
from lightning_paged.core.plan.counter import LiveBytes
from lightning_paged.core.plan.offload import PlanOffload
from lightning_paged.core.qlora_config import QLoRAConfig
from lightning_paged.testing import tiny_llama_config

OPTIMIZER = OptimizerConfig(name="adamw_8bit")  # unpaged: the peaks compare as they are
QLORA = QLoRAConfig(compute_dtype="float32", lora_dropout=0.0)


def test_the_chunked_plan_is_below_the_standard_one_by_the_logits_it_never_holds():
    vocab, batch, length = 4096, 2, 256
    config = tiny_llama_config(num_hidden_layers=4, vocab_size=vocab, max_position_embeddings=1024)
    logits = batch * length * vocab * 4  # float32 logits of the whole batch (every position a target)
    plans, measured = {}, {}
    for loss in ("chunked", "standard"):
        plans[loss] = plan_memory(
            config,
            qlora=QLORA,
            optimizer=OPTIMIZER,
            batch_size=batch,
            seq_len=length,
            loss=loss,
            target="cpu",
        )
        run = RealRun(config, QLORA, OPTIMIZER, step_loss=functools.partial(batch_loss, loss=loss))
        measured[loss] = run.measure(batch, length).peak_bytes
    chunked, standard = plans["chunked"], plans["standard"]
    # Each plan is the step its loss really takes (same counter, real tensors): to the byte here.
    assert abs(chunked.peak_bytes / measured["chunked"] - 1) <= 0.05
    assert abs(standard.peak_bytes / measured["standard"] - 1) <= 0.05
    # The standard loss holds the batch's logits (and their log-softmax and gradient); the chunked
    # loss only one chunk's.
    assert standard.components["loss"] >= logits > chunked.components["loss"]
    assert logits <= standard.peak_bytes - chunked.peak_bytes <= 4 * logits
    assert any("chunked loss" in note for note in chunked.notes)
    default = plan_memory(
        config, qlora=QLORA, optimizer=OPTIMIZER, batch_size=batch, seq_len=length, target="cpu"
    )
    assert default.peak_bytes == chunked.peak_bytes  # the chunked loss is the default, as CausalLMModule's


def test_fsdp_is_planned_with_the_standard_loss_it_falls_back_to():
    config = tiny_llama_config(num_hidden_layers=2, vocab_size=2048)
    plan = plan_memory(config, seq_len=128, world_size=2, sharded=True, target="cpu", search=False)
    assert any("FSDP runs it whatever the loss setting" in note for note in plan.notes)


def test_offloaded_checkpoint_inputs_are_host_bytes_not_device_bytes():
    layers, batch, length, hidden = 4, 2, 1024, 256
    config = tiny_llama_config(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=512,
        vocab_size=512,
        max_position_embeddings=2048,
    )
    one_input = (
        batch * length * hidden * 4
    )  # each checkpointed layer's input, 2 MiB: over the 1 MiB threshold
    plans = {
        offload: plan_memory(
            config,
            qlora=QLoRAConfig(compute_dtype="float32", lora_dropout=0.0, offload_activations=offload),
            optimizer=OPTIMIZER,
            batch_size=batch,
            seq_len=length,
            target="cpu",
            device_memory=16 << 20,  # too small for either: the levers are named
            search=False,
        )
        for offload in (False, True)
    }
    kept, offloaded = plans[False], plans[True]
    assert offloaded.peak_bytes < kept.peak_bytes
    # Every checkpointed input but the one the backward pass has brought back is on the host.
    saved = kept.components["activations"] - offloaded.components["activations"]
    assert saved >= (layers - 1) * one_input
    assert any("offload_activations" in note for note in offloaded.notes)
    assert any("offload_activations" in lever for lever in kept.levers)
    assert not any("offload_activations" in lever for lever in offloaded.levers)


def test_a_model_without_checkpointing_offloads_what_the_whole_step_saves():
    config = tiny_llama_config(num_hidden_layers=2, hidden_size=256, intermediate_size=512, vocab_size=512)
    activations = [
        plan_memory(
            config,
            qlora=QLoRAConfig(
                compute_dtype="float32", gradient_checkpointing=False, offload_activations=offload
            ),
            batch_size=2,
            seq_len=1024,
            target="cpu",
            search=False,
        ).components["activations"]
        for offload in (False, True)
    ]
    assert activations[1] < activations[0] / 2


def test_the_offload_hooks_copies_are_counted_apart_from_the_device():
    counter, hooks = LiveBytes(), PlanOffload(min_bytes=1024)
    hooks.counter = counter
    weight = torch.nn.Parameter(torch.randn(512, 512))  # a parameter: saved, never moved
    one = 4 * 512 * 4  # bytes of x, of x @ weight and of y
    with counter, counter.in_phase("forward"):
        x = torch.randn(4, 512)
        with hooks:
            y = (x @ weight).sin()  # saves x and x @ weight for the backward pass
        # On the device: x and y. x @ weight lives on only as its host copy; x has one there too.
        assert counter.live == 2 * one
        assert counter.host_bytes == 2 * one
        assert hooks.stats.offloaded_tensors == 2
    with counter, counter.in_phase("backward"):
        y.sum().backward()
    assert hooks.stats.restored_tensors == 2
    assert counter.peaks["backward"].bytes > 2 * one  # the copies brought back are device bytes again
