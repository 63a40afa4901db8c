"""The chunked cross-entropy: the standard loss and gradients, chunk by chunk, never the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_paged.core.loss import LogitTransform, chunked_cross_entropy

B, T, H, V = 2, 23, 16, 101


def standard(hidden, head, labels, transform=None):
    """transformers' ForCausalLMLoss on ``head(hidden)``: upcast, shift, mean over labelled positions."""
    logits = head(hidden) if isinstance(head, nn.Module) else hidden @ head.t()
    if transform:
        logits, _ = transform.apply(logits)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :6] = -100  # a prompt
    labels[1, 9] = -100  # the first token of a second packed example
    labels[1, -3:] = -100  # padding
    return hidden, labels


def linear(bias=False, dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return nn.Linear(H, V, bias=bias, dtype=dtype)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


TRANSFORMS = [None, LogitTransform(multiply=0.25), LogitTransform(divide=4.0), LogitTransform(softcap=1.5)]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "multiply", "divide", "softcap"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_equals_the_standard_loss_and_its_gradients(transform, bias, chunk_size):
    hidden, labels = data()
    head = linear(bias)
    tensors = [hidden, *head.parameters()]
    expected = standard(hidden, head, labels, transform)
    loss = chunked_cross_entropy(hidden, head, labels, chunk_size=chunk_size, transform=transform)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads(loss, tensors), grads(expected, tensors)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_any_head_module_runs_under_checkpointing_with_the_same_result():
    """A head that is not a bare nn.Linear (LoRA, 4-bit, hooks) is called chunk by chunk and recomputed."""
    hidden, labels = data()
    head = nn.Sequential(nn.Linear(H, H), nn.Tanh(), linear())
    calls = []
    head.register_forward_hook(lambda *args: calls.append(1))
    tensors = [hidden, *head.parameters()]
    expected = standard(hidden, head, labels, LogitTransform(softcap=2.0))
    calls.clear()
    loss = chunked_cross_entropy(hidden, head, labels, chunk_size=8, transform=LogitTransform(softcap=2.0))
    kept = int((labels[:, 1:] != -100).sum())
    chunks = -(-kept // 8)
    assert len(calls) == chunks  # one call per chunk in the forward
    got = grads(loss, tensors)
    assert len(calls) == 2 * chunks  # and one recomputation per chunk in the backward
    torch.testing.assert_close(loss, expected)
    for a, b in zip(got, grads(expected, tensors)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_weight_tensor_is_a_head_and_sum_is_the_mean_times_the_labelled_positions():
    hidden, labels = data()
    weight = linear().weight.detach().requires_grad_()
    mean = chunked_cross_entropy(hidden, weight, labels, chunk_size=5)
    total = chunked_cross_entropy(hidden, weight, labels, chunk_size=5, reduction="sum")
    torch.testing.assert_close(mean, standard(hidden, weight, labels))
    torch.testing.assert_close(total, mean * (labels[:, 1:] != -100).sum())
    assert grads(total, [weight])[0].abs().sum() > 0


def test_unshifted_labels_are_targets_of_their_own_positions():
    hidden, labels = data()
    head = linear()
    shifted = chunked_cross_entropy(hidden, head, labels)
    own = chunked_cross_entropy(hidden[:, :-1], head, labels[:, 1:], shift=False)
    torch.testing.assert_close(own, shifted)


def test_a_batch_without_labels_gives_zero_and_zero_gradients():
    hidden, labels = data()
    labels[:] = -100
    head = linear()
    loss = chunked_cross_entropy(hidden, head, labels)
    assert loss.item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads(loss, [hidden, head.weight]))


def test_without_gradients_only_the_loss_is_computed():
    hidden, labels = data()
    head = linear()
    with torch.no_grad():
        loss = chunked_cross_entropy(hidden, head, labels, chunk_size=4)
        expected = standard(hidden, head, labels)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, expected)


def test_bfloat16_and_autocast_stay_within_bfloat16_tolerance():
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        hidden, labels = data(dtype=dtype)
        head = linear(bias=True, dtype=dtype)
        tensors = [hidden, *head.parameters()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = standard(hidden, head, labels, LogitTransform(softcap=3.0))
            loss = chunked_cross_entropy(
                hidden, head, labels, chunk_size=6, transform=LogitTransform(softcap=3.0)
            )
        torch.testing.assert_close(loss, expected, rtol=2e-3, atol=2e-3)
        for a, b in zip(grads(loss, tensors), grads(expected, tensors)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2 * float(b.abs().max()))


class LargestTensor(TorchDispatchMode):
    """The most elements any operation produced while it was active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("bias", [False, True])
def test_no_tensor_of_the_loss_is_larger_than_one_chunk_of_logits(bias):
    """The standard loss makes sequence x vocabulary tensors; the chunked one at most chunk x vocabulary."""
    hidden, labels = data()
    head = linear(bias)
    with LargestTensor() as full:
        standard(hidden, head, labels).backward()
    with LargestTensor() as chunked:
        chunked_cross_entropy(hidden, head, labels, chunk_size=4).backward()
    assert full.largest >= B * (T - 1) * V
    assert chunked.largest <= max(4 * V, H * V)  # one chunk's logits, or the head's weight gradient


def test_bad_arguments_are_refused():
    hidden, labels = data()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, linear(), labels, chunk_size=0)
    with pytest.raises(ValueError, match="do not match"):
        chunked_cross_entropy(hidden, linear(), labels[:, :-1])
