"""Minibatches for the ranks of a data-parallel run: disjoint shards from one seed.

Every rank shuffles the n examples with the same seed, so all agree on the permutation, and
takes its own contiguous part of it (sizes differing by at most one). A rank then draws its
batches from its shard alone: with sampling="uniform", the course's recipe, each step's k
indices i_1..i_k ~ Uniform(shard) with replacement; with "epoch", shuffled passes over the
shard. Each rank's batch is its part of the global batch of k x ranks examples.

Every rank runs the same number of steps per epoch (its collective calls must pair with the
others'): the smallest shard's size // k. Epoch e's batches depend on (seed, rank, e) only,
so a run resumed at epoch e draws exactly what the run that never stopped drew.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from graphc.tools.data import epoch_indices, sample_indices

__all__ = ["ShardedSampler", "SAMPLINGS"]

SAMPLINGS = ("epoch", "uniform")


class ShardedSampler:
    def __init__(self, n: int, batch_size: int, *, rank: int = 0, ranks: int = 1, seed: int = 0,
                 sampling: str = "uniform"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if not 0 <= rank < ranks:
            raise ValueError(f"rank {rank} is not one of the {ranks} ranks")
        if n < ranks * batch_size:
            raise ValueError(f"{n} examples cannot give each of {ranks} ranks a batch of {batch_size}")
        self.batch_size, self.rank, self.ranks, self.seed, self.sampling = batch_size, rank, ranks, seed, sampling
        order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,))).permutation(n)
        self.shard = np.array_split(order, ranks)[rank]
        self.steps_per_epoch = (n // ranks) // batch_size   # the smallest shard has n // ranks examples

    def epoch(self, index: int) -> Iterator[np.ndarray]:
        """The batches (indices into the whole dataset) of epoch `index` (0-based) on this rank."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, self.rank, index)))
        n, k = len(self.shard), self.batch_size
        if self.sampling == "uniform":
            local = (sample_indices(rng, n, k) for _ in range(self.steps_per_epoch))
        else:
            local = epoch_indices(rng, n, k, drop_last=True)
        for _, batch in zip(range(self.steps_per_epoch), local):
            yield self.shard[batch]
