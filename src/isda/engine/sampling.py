"""Seeding: every RNG at once, and per-sample seeds so that augmentation depends on neither the number of
workers, of processes, nor where training resumed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class SeededSamples(Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is augmented with RNGs seeded from
    (seed, e, i), whichever worker or process loads it; the caller's RNG states are left untouched.
    ``repeats``: an epoch holds every image that many times, each copy augmented with its own seed.
    An index is ``i`` (of the epoch set by :meth:`set_epoch`) or ``(epoch, i)``: a loader whose workers outlive an
    epoch passes the epoch with each index, since their copies of this object never see ``set_epoch``."""

    def __init__(self, dataset: Dataset, seed: int, repeats: int = 1) -> None:
        self.dataset, self.seed, self.epoch, self.repeats = dataset, seed, 0, repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            try:
                return self.dataset[index % len(self.dataset)]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` for epoch after epoch, without end: each epoch's order is ``sampler``'s for
    that epoch, its last batch may be short, and the first epoch skips ``skip`` batches (a resumed run).

    One loader iterator then serves the whole run, so its workers start once: a loader made per epoch starts them
    anew every epoch, which on a small dataset (an epoch every few steps) costs more than the steps."""

    def __init__(self, sampler: DistributedSampler, batch_size: int, start_epoch: int = 0, skip: int = 0) -> None:
        self.sampler, self.batch_size, self.start_epoch, self.skip = sampler, batch_size, start_epoch, skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, skip = self.start_epoch, self.skip
        while True:
            self.sampler.set_epoch(epoch)
            indices = list(self.sampler)
            for start in range(skip * self.batch_size, len(indices), self.batch_size):
                yield [(epoch, i) for i in indices[start:start + self.batch_size]]
            epoch, skip = epoch + 1, 0


def run_batches(samples: SeededSamples, sampler: DistributedSampler, batch_size: int, collate_fn: Callable,
                num_workers: int, seed: int, start_epoch: int = 0, skip: int = 0, pin_memory: bool = False) -> Iterator:
    """The training batches of a whole run from ``start_epoch`` (after ``skip`` of its batches), in one iterator."""
    loader = DataLoader(samples, batch_sampler=EpochBatches(sampler, batch_size, start_epoch, skip),
                        collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed))
    return iter(loader)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
