"""Which samples each rank reads in each epoch (ffcv, torch and folder backends; dali: see dali_loader).

Epoch order: train is a permutation of 0..N-1 drawn from (seed, epoch) alone, the same on every
rank; other splits are in pack order. Rank r of W takes every W-th sample of that order,
starting at r: disjoint parts whose union is the epoch.

The remainder, precisely:
- drop_last=True (train default): the order is first cut to W * (N // W) samples, so every rank
  gets N // W samples; then each rank drops its last partial batch. All ranks run the same number
  of steps (what DDP needs). Per epoch, N % W + W * ((N // W) % B) samples are not seen; with
  shuffling they are different samples each epoch.
- drop_last=False (val default): nothing is dropped or padded. Every sample is seen exactly once
  per epoch across ranks; ranks get N // W or N // W + 1 samples, so their last batches (and
  possibly their batch counts, by one) differ. Metrics summed across ranks are exact.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*values: int) -> int:
    """A 31-bit seed from a tuple of non-negative ints (stable across runs and machines)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0] & 0x7FFFFFFF)


def epoch_order(num_samples: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)]).permutation(num_samples).astype(np.int64)


def rank_indices(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    if drop_last:
        order = order[: len(order) // world_size * world_size]
    return order[rank::world_size]


def epoch_indices(num_samples: int, shuffle: bool, seed: int, epoch: int, rank: int,
                  world_size: int, drop_last: bool) -> np.ndarray:
    """The pack indices rank `rank` reads in `epoch`, in reading order."""
    return rank_indices(epoch_order(num_samples, shuffle, seed, epoch), rank, world_size, drop_last)


def split_batches(indices: np.ndarray, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    n = len(indices) // batch_size * batch_size if drop_last else len(indices)
    return [indices[i:i + batch_size] for i in range(0, n, batch_size)]


def num_batches(num_samples: int, batch_size: int, rank: int, world_size: int, drop_last: bool) -> int:
    if drop_last:
        return (num_samples // world_size) // batch_size
    per_rank = len(range(rank, num_samples, world_size))
    return -(-per_rank // batch_size)
