"""Resumable randomness: a data order that can restart mid-epoch, and the random generators' states.

A run resumed from a checkpoint continues exactly like one that never stopped only if it sees the
same batches in the same order and draws the same random numbers (dropout). :class:`ResumableSampler`
gives a seeded, epoch-dependent order that can start at any position; :func:`resume_dataloader`
positions a ``DataLoader`` built on it; :func:`capture_rng_state` and :func:`restore_rng_state` save
and restore the torch, CUDA (this process's device only), Python and NumPy generators in a form
``torch.load(weights_only=True)`` accepts. :class:`LengthGroupedBatchSampler` batches samples of
similar length together on top of such an order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DistributedSampler, Sampler
from typing_extensions import override


class ResumableSampler(DistributedSampler):
    """A seeded shuffle whose order depends only on ``(seed, epoch)``, and which can start mid-epoch.

    Lightning calls ``set_epoch`` at the start of every epoch. Under DDP each rank takes its own
    share (ranks are found from the process group when not given), and Lightning leaves the sampler
    in place because it is a ``DistributedSampler``. :meth:`resume` makes the next iteration begin
    at a given position of a given epoch; :meth:`state_dict` / :meth:`load_state_dict` carry that
    position for code that saves it itself.

    Args:
        dataset: The dataset (only its length is used).
        seed: Seed of the order; the order of epoch ``e`` is the permutation seeded with ``seed + e``.
        shuffle: False keeps the dataset order (still resumable).
        num_replicas: Number of ranks; by default the process group's size, or 1 without one.
        rank: This rank; by default the process group's rank, or 0.
        drop_last: Drop the tail that does not divide evenly across ranks (else pad by repeating).
    """

    def __init__(
        self,
        dataset: Sized,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialized else 1
        if rank is None:
            rank = dist.get_rank() if initialized else 0
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0
        """Samples of this rank's share to skip at the next iteration (then back to 0)."""

    def resume(self, epoch: int, start: int) -> None:
        """Make the next iteration yield epoch ``epoch`` from its ``start``-th sample (of this rank)."""
        if epoch < 0 or start < 0:
            raise ValueError(f"resume position must not be negative; got epoch={epoch}, start={start}")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = min(self.start, len(indices)), 0
        return iter(indices[start:])

    def state_dict(self) -> dict[str, int]:
        """Where the next iteration starts: ``epoch``, ``start``, and the ``seed`` of the order."""
        return {"epoch": self.epoch, "start": self.start, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"the saved data order used seed {state['seed']} but this sampler uses seed {self.seed}: "
                "resume with the seed of the run that saved it"
            )
        self.resume(int(state["epoch"]), int(state.get("start", 0)))


def _resumable_parts(loader: Any) -> tuple[Any, int] | None:
    """``(object with resume(), samples per batch)`` of a loader built on a resumable order, else None."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if callable(getattr(batch_sampler, "resume", None)):
        return batch_sampler, 1  # a batch sampler that resumes by batches itself
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else None
    sampler = sampler if sampler is not None else getattr(loader, "sampler", None)
    if not isinstance(sampler, ResumableSampler):
        return None
    if batch_sampler is None:
        return sampler, 1  # batch_size=None: every sample is a batch
    if type(batch_sampler) is BatchSampler:
        return sampler, batch_sampler.batch_size
    return None  # a batch sampler that regroups samples: skipping samples would change its batches


def is_resumable(loader: Any) -> bool:
    """Whether :func:`resume_dataloader` can position ``loader`` exactly."""
    return _resumable_parts(loader) is not None


def resume_dataloader(loader: Any, epoch: int, batches: int) -> bool:
    """Make ``loader``'s next iteration start at batch ``batches`` of epoch ``epoch``; False if it cannot.

    Works for a ``DataLoader`` whose sampler is a :class:`ResumableSampler` with plain batching, and
    for one whose batch sampler has its own ``resume(epoch, batches)``.
    """
    parts = _resumable_parts(loader)
    if parts is None:
        return False
    target, per_batch = parts
    target.resume(epoch, batches * per_batch)
    return True


_cuda: Any = torch.cuda
"""Where the CUDA generators are reached (``torch.cuda``); tests put a stand-in with other devices here."""


def capture_rng_state() -> dict[str, Any]:
    """The states of the torch CPU generator, this process's CUDA device's generator, Python's and NumPy's.

    Only the current CUDA device's generator is saved (``torch.cuda.get_rng_state()`` with its default
    ``"cuda"``, torch ``cuda/random.py``): it is the one this process draws from, and the one a resumed
    process puts it back into, whatever devices the two see and whatever index theirs has.
    """
    version, internal, gauss = random.getstate()
    cuda_ready = _cuda.is_available() and _cuda.is_initialized()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": _cuda.get_rng_state() if cuda_ready else None,
        "python": [version, list(internal), gauss],
    }
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state["numpy"] = [
        kind,
        torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    ]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned; the CUDA state goes to this process's device.

    States saved before only the current device was kept (a list of every visible device's) give
    this device the entry of its own index, when there is one.
    """
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # every device the saving process saw, by index
        index = _cuda.current_device() if cuda and _cuda.is_available() else len(cuda)
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None and _cuda.is_available():
        _cuda.set_rng_state(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


class LengthGroupedBatchSampler(BatchSampler):
    """Batches of similar-length samples, in random order.

    Takes the indices ``sampler`` yields (shuffled; under DDP Lightning passes each rank its
    ``DistributedSampler`` here), cuts them into groups of ``mega_batch_factor`` batches, sorts each
    group by length and cuts it into batches; then shuffles the order of all batches.
    """

    def __init__(
        self,
        sampler: Sampler[int],
        batch_size: int,
        drop_last: bool,
        lengths: Sequence[int] = (),
        seed: int = 0,
        mega_batch_factor: int = 50,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = lengths
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self._epoch = 0

    @override
    def __iter__(self) -> Iterator[list[int]]:
        indices = list(self.sampler)
        group = self.batch_size * self.mega_batch_factor
        batches: list[list[int]] = []
        for start in range(0, len(indices), group):
            ordered = sorted(indices[start : start + group], key=lambda i: self.lengths[i], reverse=True)
            batches += [ordered[j : j + self.batch_size] for j in range(0, len(ordered), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        generator = torch.Generator().manual_seed(self.seed + self._epoch)
        self._epoch += 1
        for k in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[k]

    @override
    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
