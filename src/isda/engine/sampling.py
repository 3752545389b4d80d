"""Seeding: every RNG at once, and per-sample seeds so that augmentation depends on neither the number of
workers, of processes, nor where training resumed."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


class SeededSamples(Dataset):
    """Wraps a dataset so that sample ``i`` of epoch ``e`` is augmented with RNGs seeded from
    (seed, e, i), whichever worker or process loads it; the caller's RNG states are left untouched.
    ``repeats``: an epoch holds every image that many times, each copy augmented with its own seed."""

    def __init__(self, dataset: Dataset, seed: int, repeats: int = 1) -> None:
        self.dataset, self.seed, self.epoch, self.repeats = dataset, seed, 0, repeats

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, index: int) -> Any:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
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


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
