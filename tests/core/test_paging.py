"""Paging coverage: threshold, pool, coverage report and re-paging after a checkpoint load.

CPU has no managed memory, so the paged paths run on ``HostMemory``: the same policy, pool,
coverage and re-paging code, with the three unified-memory primitives answered by host tensors
marked paged the way bitsandbytes marks its managed buffers.
"""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from torch import nn

from lightning_paged.core.optimizers import build_optimizer
from lightning_paged.core.paging import (
    BELOW_THRESHOLD,
    NOT_BITSANDBYTES,
    NOT_REPAGED,
    POOL_ALIGN,
    PagingPolicy,
    paging_coverage,
    repage_optimizer_state,
)
from lightning_paged.testing import HostMemory

SMALL = (64, 64)  # 4,096 elements: below bitsandbytes' 100,000 threshold, like a LoRA matrix
LARGE = (320, 320)  # 102,400 elements: bitsandbytes pages it


def _params(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _run(optimizer, params, steps, start=0):
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def _build(name, params, **settings):
    memory = HostMemory()
    policy = PagingPolicy(memory=memory, **settings)
    policy.pool.slab_bytes = 2**20  # small slabs keep these tests light
    return build_optimizer(name, params, paging=policy, lr=1e-2), memory


def _state_buffers(optimizer):
    return [t for state in optimizer.state.values() for k, t in state.items() if k in ("state1", "state2")]


def test_bitsandbytes_threshold_leaves_small_state_unpaged():
    params = _params(SMALL, SMALL, LARGE)
    optimizer, memory = _build("paged_adamw_32bit", params, page_small=False, pooled=False)
    _run(optimizer, params, 1)
    coverage = paging_coverage(optimizer)
    assert coverage.paged_bytes == 2 * 4 * 102_400
    assert coverage.unpaged_bytes == {BELOW_THRESHOLD: 2 * 2 * 4 * 4096}
    assert memory.allocations == 2


@pytest.mark.parametrize("pooled", [False, True])
def test_page_small_pages_every_state(pooled):
    params = _params(SMALL, SMALL, SMALL, LARGE)
    optimizer, memory = _build("paged_adamw_32bit", params, page_small=True, pooled=pooled)
    _run(optimizer, params, 1)
    coverage = paging_coverage(optimizer)
    assert coverage.paged_bytes == 2 * 4 * (3 * 4096 + 102_400)
    assert coverage.unpaged_bytes == {}
    assert coverage.paged_tensors == 8
    # the pool takes the six small states from one allocation; the large states get one each
    assert memory.allocations == (1 + 2 if pooled else 8)


def test_pool_buffers_are_aligned_disjoint_and_zeroed_before_use():
    params = _params(SMALL, (7, 5), SMALL)
    optimizer, memory = _build("paged_lion_32bit", params, page_small=True)
    _run(optimizer, params, 1)
    buffers = _state_buffers(optimizer)
    starts = sorted(t.data_ptr() for t in buffers)
    base = starts[0]
    assert all((s - base) % POOL_ALIGN == 0 for s in starts)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in buffers)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    assert memory.allocations == 1


@pytest.mark.parametrize(
    "name", ["paged_adamw_8bit", "paged_adamw_32bit", "paged_ademamix_8bit", "paged_lion_8bit"]
)
def test_pooled_state_trains_exactly_like_ordinary_state(name):
    paged_params = _params(SMALL, (32,), LARGE)
    plain_params = [nn.Parameter(p.detach().clone()) for p in paged_params]
    paged, memory = _build(name, paged_params, page_small=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = build_optimizer(name, plain_params, lr=1e-2)  # CPU: ordinary state
    _run(paged, paged_params, 4)
    _run(plain, plain_params, 4)
    assert all(getattr(t, "is_paged", False) for t in _state_buffers(paged))
    assert not any(getattr(t, "is_paged", False) for t in _state_buffers(plain))
    for a, b in zip(paged_params, plain_params):
        assert torch.equal(a, b)
    # every step prefetches every paged state buffer once, as bitsandbytes does
    assert memory.prefetches == 4 * len(_state_buffers(paged))


def test_coverage_on_cpu_says_paging_is_unavailable():
    params = _params(SMALL, LARGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer("paged_adamw_8bit", params, lr=1e-3)
    assert (
        paging_coverage(optimizer).summary()
        == "paging: AdamW has no state yet (it is created at the first step)"
    )
    _run(optimizer, params, 1)
    coverage = paging_coverage(optimizer)
    assert coverage.paged_bytes == 0
    assert coverage.unpaged_bytes["paging unavailable on cpu"] == 2 * (4096 + 102_400)
    summary = coverage.summary()
    assert summary.startswith("paging: 0 B of ")
    assert "paging unavailable on cpu" in summary
    metrics = coverage.metrics()
    assert metrics["paging/paged_fraction"] == 0.0
    assert metrics["paging/unpaged_bytes/paging_unavailable_on_cpu"] == 2 * (4096 + 102_400)
    assert metrics["paging/unpaged_bytes"] == coverage.total_bytes


def test_coverage_of_a_torch_optimizer():
    params = _params(SMALL)
    optimizer = torch.optim.AdamW(params)
    _run(optimizer, params, 1)
    coverage = paging_coverage(optimizer)
    assert set(coverage.unpaged_bytes) == {NOT_BITSANDBYTES}
    assert repage_optimizer_state(optimizer) == 0


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "paged_ademamix_32bit"])
def test_repaging_after_a_checkpoint_load_restores_paged_buffers_with_identical_values(name):
    params = _params(SMALL, (48,), LARGE)
    optimizer, _ = _build(name, params, page_small=True)
    _run(optimizer, params, 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    _run(optimizer, params, 3, start=3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [nn.Parameter(t.clone()) for t in saved["params"]]
    optimizer2, memory2 = _build(name, resumed, page_small=True)
    optimizer2.load_state_dict(saved["optimizer"])
    _optimizer_to_device(optimizer2, torch.device("cpu"))  # what Lightning does after the load
    loaded = [t.clone() for t in _state_buffers(optimizer2)]
    assert not any(getattr(t, "is_paged", False) for t in _state_buffers(optimizer2))
    assert set(paging_coverage(optimizer2).unpaged_bytes) <= {
        NOT_REPAGED,
        "bookkeeping (quantization maps, block maxima, norms)",
    }

    assert repage_optimizer_state(optimizer2) == len(loaded)
    repaged = _state_buffers(optimizer2)
    assert all(t.is_paged for t in repaged)
    assert all(torch.equal(a, b) for a, b in zip(repaged, loaded))
    assert memory2.allocations == 1 + 2  # the pool's slab, and one each for the large parameter's states
    assert repage_optimizer_state(optimizer2) == 0  # nothing left to do

    _run(optimizer2, resumed, 3, start=3)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_a_state_dict_holds_each_paged_state_alone_and_unflagged():
    params = _params(SMALL, (40,), LARGE)
    optimizer, _ = _build(
        "paged_adamw_8bit", params, page_small=True
    )  # a slab holding uint8 and float32 states
    _run(optimizer, params, 1)
    saved = optimizer.state_dict()["state"]
    tensors = [t for state in saved.values() for t in state["__bnb_optimizer_quant_state__"].values()]
    assert not any(getattr(t, "is_paged", False) for t in tensors)
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors if t.numel() > 256)
    assert all(t.is_paged for t in _state_buffers(optimizer))  # the live state stays paged
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    assert buffer.tell() < 2 * sum(t.nbytes for t in tensors) + 100_000  # not the whole slab


def test_repaging_on_cpu_without_managed_memory_changes_nothing():
    params = _params(SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer("paged_adamw_32bit", params, lr=1e-3)
    _run(optimizer, params, 1)
    before = [t.clone() for t in _state_buffers(optimizer)]
    assert repage_optimizer_state(optimizer) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, _state_buffers(optimizer)))


def test_repaging_an_optimizer_built_elsewhere_follows_bitsandbytes_rule():
    import bitsandbytes as bnb

    params = _params(SMALL, LARGE)
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(optimizer, params, 1)
    memory = HostMemory()
    policy = PagingPolicy(page_small=False, pooled=False, memory=memory)
    assert repage_optimizer_state(optimizer, policy) == 2  # the large parameter's two states only
    assert [getattr(t, "is_paged", False) for t in _state_buffers(optimizer)] == [False, False, True, True]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("page_small", [False, True])
def test_cuda_coverage_of_a_4096_wide_lora_at_rank_16(page_small):
    lora = [
        nn.Parameter(torch.randn(16, 4096, device="cuda")),
        nn.Parameter(torch.zeros(4096, 16, device="cuda")),
    ]
    optimizer = build_optimizer(
        "paged_adamw_32bit", lora, paging=PagingPolicy(page_small=page_small), lr=1e-4
    )
    for p in lora:
        p.grad = torch.randn_like(p)
    optimizer.step()
    coverage = paging_coverage(optimizer)
    state_bytes = 2 * 2 * 4 * 65_536
    if page_small:
        assert coverage.paged_bytes == state_bytes
    else:
        assert coverage.unpaged_bytes == {BELOW_THRESHOLD: state_bytes}


@pytest.mark.requires_cuda
def test_cuda_state_is_paged_again_after_a_checkpoint_load():
    params = [
        nn.Parameter(torch.randn(16, 4096, device="cuda")),
        nn.Parameter(torch.randn(512, 512, device="cuda")),
    ]

    def step(optimizer):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()

    optimizer = build_optimizer("paged_adamw_8bit", params, lr=1e-4)
    step(optimizer)
    assert all(t.is_paged for t in _state_buffers(optimizer))
    state = optimizer.state_dict()
    optimizer2 = build_optimizer("paged_adamw_8bit", params, lr=1e-4)
    optimizer2.load_state_dict(state)
    _optimizer_to_device(optimizer2, torch.device("cuda", 0))
    assert not any(getattr(t, "is_paged", False) for t in _state_buffers(optimizer2))
    expected = [t.cpu() for t in _state_buffers(optimizer2)]
    assert repage_optimizer_state(optimizer2) == 4
    assert all(t.is_paged for t in _state_buffers(optimizer2))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(expected, _state_buffers(optimizer2)))
    step(optimizer2)


class FillCheckingMemory(HostMemory):
    """Refuses to zero an empty range, as bitsandbytes' ``fill`` on CUDA cannot (its launch check exits)."""

    def zero_(self, buffer):
        assert buffer.numel() > 0, "fill of zero elements"
        super().zero_(buffer)


@pytest.mark.parametrize("pooled", [False, True])
def test_an_empty_state_is_never_filled_or_allocated(pooled):
    weight = nn.Parameter(torch.randn(*SMALL))
    optimizer = bnb_optimizer_with_an_empty_parameter(weight)
    memory = FillCheckingMemory()
    policy = PagingPolicy(memory=memory, pooled=pooled)
    policy.pool.slab_bytes = 2**20
    from lightning_paged.core.paging import install_paging

    install_paging(optimizer, policy)
    _run(optimizer, optimizer.param_groups[0]["params"], 1)
    coverage = paging_coverage(optimizer)
    assert coverage.paged_bytes == 2 * 4 * 4096 and coverage.unpaged_bytes == {}
    assert memory.allocations == (1 if pooled else 2)
    assert repage_optimizer_state(optimizer, policy) == 0


def bnb_optimizer_with_an_empty_parameter(weight):
    """An optimizer built outside ``build_optimizer`` (which drops empty parameters), holding one."""
    import bitsandbytes as bnb

    return bnb.optim.AdamW([weight, nn.Parameter(torch.zeros(0))], lr=1e-2, optim_bits=32, is_paged=True)


def test_monitor_counts_the_state_in_pool_slabs_not_the_slabs():
    from bitsandbytes import functional as F

    from lightning_paged.core.eviction.paged import PagedBytes

    class ListedHostMemory(HostMemory):
        def allocate(self, nbytes, device):  # listed where bitsandbytes lists its managed buffers
            buffer = super().allocate(nbytes, device)
            F.GlobalPageManager.get_instance().paged_tensors.append(buffer)
            return buffer

    listed = F.GlobalPageManager.get_instance().paged_tensors
    before = len(listed)
    try:
        params = _params(SMALL, SMALL, LARGE)
        memory = ListedHostMemory()
        policy = PagingPolicy(memory=memory)
        policy.pool.slab_bytes = 2**20
        optimizer = build_optimizer("paged_adamw_32bit", params, paging=policy, lr=1e-2)
        _run(optimizer, params, 1)
        paged = PagedBytes(device_index=0)
        state = 2 * 4 * (2 * 4096 + 102_400)
        assert paged() == state == paging_coverage(optimizer).paged_bytes
        assert paged.capacity() == 2**20 + 2 * 4 * 102_400  # one slab, whole, and the two large states
    finally:
        del listed[before:]
