"""The live-bytes counter: each storage once, gone when freed, categories, peaks per phase, workspaces."""

from __future__ import annotations

import gc

import torch

from lightning_paged.core.plan.counter import ACTIVATIONS, LOSS, TEMPORARIES, WORKSPACE, LiveBytes
from lightning_paged.core.plan.cuda import round_size


def test_a_storage_counts_once_however_many_views_and_leaves_when_freed():
    counter = LiveBytes()
    with counter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:20].view(2, 5)
        b = a.t() if a.dim() == 2 else a.reshape(10, 100)
        assert counter.live == 4000
        c = torch.ones(250)  # 1000 bytes
        assert counter.live == 5000
        del a, view, b
        gc.collect()
        assert counter.live == 1000
    del c
    gc.collect()
    assert counter.live == 0


def test_peaks_are_per_phase_and_split_by_when_the_storage_was_made():
    counter = LiveBytes()
    with counter:
        weight = torch.ones(100)
        counter.track(weight, "weights_other")
        with counter.in_phase("forward"):
            kept = torch.full((200,), 2.0)  # activation: made in forward, still live at the forward peak
            counter.enter_loss_region()
            logits = torch.full((300,), 3.0)
        with counter.in_phase("backward"):
            grad = torch.full((50,), 4.0)
            del logits
            gc.collect()
    forward, backward = counter.peaks["forward"], counter.peaks["backward"]
    assert forward.bytes == (100 + 200 + 300) * 4
    assert forward.by_category == {"weights_other": 400, ACTIVATIONS: 800, LOSS: 1200}
    assert backward.bytes == (100 + 200 + 300 + 50) * 4
    assert backward.by_category[TEMPORARIES] == 200
    del kept, grad


def test_moving_a_storage_to_another_category_corrects_the_peaks_it_was_live_at():
    counter = LiveBytes()
    with counter, counter.in_phase("backward"):
        grad = torch.full((100,), 2.0)  # first counted as a temporary
        assert counter.peaks["backward"].by_category == {TEMPORARIES: 400}
        counter.track(grad, "lora_grads")
    assert counter.peaks["backward"].by_category == {"lora_grads": 400}
    assert counter.totals() == {"lora_grads": 400}


def test_a_kernel_workspace_counts_for_the_moment_of_its_call_only():
    def workspace(func, args, kwargs, out):
        return 10_000 if "mm" in getattr(func, "__name__", "") else 0

    counter = LiveBytes(workspace=workspace)
    a, b = torch.ones(10, 10), torch.ones(10, 10)
    with counter, counter.in_phase("forward"):
        c = a @ b
        d = c + 1
    peak = counter.peaks["forward"]
    assert peak.bytes == 400 + 10_000  # c and the workspace of the matmul that made it
    assert peak.by_category[WORKSPACE] == 10_000
    assert counter.live == 800  # c and d, the workspace gone
    del c, d


def test_cuda_rounding_makes_every_block_a_multiple_of_512_bytes():
    assert [round_size(n) for n in (1, 511, 512, 513, 4000)] == [512, 512, 512, 1024, 4096]
    counter = LiveBytes(round_size=round_size)
    with counter:
        small = torch.ones(3)
        big = torch.ones(1000)
    assert counter.live == 512 + 4096
    assert counter.peaks["setup"].by_class == {"small": 512 + 4096}
    del small, big


def test_storages_of_several_megabytes_fall_in_the_allocator_size_classes():
    counter = LiveBytes(round_size=round_size)
    with counter:
        mid = torch.empty(3 << 20, dtype=torch.uint8)  # 3 MiB: from the 20 MiB segments
        large = torch.empty((11 << 20) + 1, dtype=torch.uint8)  # over 10 MiB: its own segment, 2 MiB rounded
    classes = counter.peaks["setup"].by_class
    assert classes["mid"] == 3 << 20
    assert classes["large"] == round_size((11 << 20) + 1)
    assert classes["large_excess"] == (12 << 20) - round_size((11 << 20) + 1)
    del mid, large
