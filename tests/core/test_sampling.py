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
