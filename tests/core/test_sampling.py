"""The resumable sampler, resuming a data loader mid-epoch, and random-generator state in a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_paged.core.sampling import (
    ResumableSampler,
    capture_rng_state,
    restore_rng_state,
    resume_dataloader,
)


def test_resumable_sampler_order_depends_on_seed_and_epoch_only():
    data = list(range(11))
    sampler = ResumableSampler(data, seed=5)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == sorted(epoch1) == data and epoch0 != epoch1
    fresh = ResumableSampler(data, seed=5)
    fresh.resume(1, 4)
    assert list(fresh) == epoch1[4:]
    assert list(fresh) == epoch1  # the start applies to one iteration only
    other = ResumableSampler(data, seed=6)
    other.load_state_dict({"epoch": 1, "start": 0, "seed": 6})
    assert list(other) != epoch1
    with pytest.raises(ValueError, match="seed 5 but this sampler uses seed 6"):
        other.load_state_dict(fresh.state_dict())
    ranks = [list(ResumableSampler(data, seed=5, num_replicas=2, rank=r, drop_last=True)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and not set(ranks[0]) & set(ranks[1])


def test_resume_dataloader_continues_with_the_remaining_batches():
    data = list(range(10))
    straight = DataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=1))
    straight.sampler.set_epoch(2)
    expected = [b.tolist() for b in straight]
    resumed = DataLoader(data, batch_size=3, sampler=ResumableSampler(data, seed=1))
    assert resume_dataloader(resumed, epoch=2, batches=2)
    assert [b.tolist() for b in resumed] == expected[2:]
    unbatched = DataLoader(data, batch_size=None, sampler=ResumableSampler(data, seed=1))
    assert resume_dataloader(unbatched, epoch=0, batches=7) and len(list(unbatched)) == 3
    assert not resume_dataloader(DataLoader(data, batch_size=3, shuffle=True), epoch=0, batches=1)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    drawn = (torch.rand(3), random.random(), np.random.rand())
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (
        torch.equal(torch.rand(3), drawn[0]) and random.random() == drawn[1] and np.random.rand() == drawn[2]
    )


def test_cuda_state_of_a_process_that_saw_more_devices_resumes_on_the_one_it_sees(tmp_path, monkeypatch):
    from lightning_paged.core import sampling
    from lightning_paged.testing import FakeCudaGenerators

    # written by the rank on device 3 of a node with 4 visible GPUs
    written = FakeCudaGenerators(devices=4, current=3)
    monkeypatch.setattr(sampling, "_cuda", written)
    state = capture_rng_state()
    dropout = written.draw()  # what the next step of the uninterrupted run draws on its device
    torch.save(state, tmp_path / "rng.pt")
    assert isinstance(state["cuda"], torch.Tensor)  # one generator: this process's device

    # resumed where one GPU is visible (CUDA_VISIBLE_DEVICES=3: it is device 0 there)
    resumed = FakeCudaGenerators(devices=1, current=0)
    monkeypatch.setattr(sampling, "_cuda", resumed)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(resumed.draw(), dropout)

    # on a machine where CUDA is not initialised the CPU state still comes back, the CUDA one is kept aside
    monkeypatch.setattr(sampling, "_cuda", FakeCudaGenerators(devices=0))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert capture_rng_state()["cuda"] is None


def test_cuda_states_saved_for_every_device_restore_this_device_entry_only(monkeypatch):
    from lightning_paged.core import sampling
    from lightning_paged.testing import FakeCudaGenerators

    four = FakeCudaGenerators(devices=4, current=1)
    old_format = {**capture_rng_state(), "cuda": four.get_rng_state_all()}
    expected = four.draw()
    for visible in (2, 1):  # fewer devices than were saved: no IndexError
        fake = FakeCudaGenerators(devices=visible, current=min(1, visible - 1))
        monkeypatch.setattr(sampling, "_cuda", fake)
        restore_rng_state(old_format)
        if fake.current == 1:
            assert torch.equal(fake.draw(), expected)
