"""Batched, resumable loading of a `FeatureCache`: one DataLoader batch is one gather of sorted rows.

`BatchedFeatureDataset` cuts a seeded per-epoch permutation into batches (each rank of a distributed run gets every
world_size-th batch); `FeatureLoader` is the DataLoader over it that advances the epoch on every `iter()` and
saves/restores its position for Lightning, so a run resumed mid-epoch continues with the next batch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cdam_pl.errors import ConfigError, DataError

__all__ = ["BatchedFeatureDataset", "FeatureLoader"]


class FeatureRows(Protocol):
    """What the loader reads: N rows of features and labels (a `FeatureCache`)."""

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def features(self, indices: np.ndarray) -> torch.Tensor: ...


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchedFeatureDataset(IterableDataset):
    """Yields whole batches `(features, labels)` of a `FeatureCache`; one pass is one epoch.

    See `FeatureCache.loader` for the batch order.
    """

    def __init__(self, cache: FeatureRows, batch_size: int, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 *, rank: int | None = None, world_size: int | None = None):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.cache, self.batch_size, self.shuffle = cache, batch_size, shuffle
        self.seed, self.drop_last = seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # batches of this epoch to skip (a resumed epoch; see FeatureLoader.load_state_dict)

    def _rank_world(self) -> tuple[int, int]:
        rank, world = _dist_rank_world()
        rank = rank if self.rank is None else self.rank
        world = world if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is outside world_size {world}")
        return rank, world

    def _num_batches(self) -> int:
        n = len(self.cache)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        nb, (_, world) = self._num_batches(), self._rank_world()
        return nb // world if self.drop_last else math.ceil(nb / world)

    def batch_indices(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of sample indices for `epoch` (default: the current one), each sorted."""
        epoch = self.epoch if epoch is None else epoch
        n, bs, nb = len(self.cache), self.batch_size, self._num_batches()
        if self.shuffle:
            order = np.random.default_rng([int(self.seed) & 0xFFFFFFFFFFFF, int(epoch)]).permutation(n)
        else:
            order = np.arange(n, dtype=np.int64)
        rank, world = self._rank_world()
        ids = [(rank + world * i) % nb for i in range(len(self))] if nb else []
        return [np.sort(order[b * bs : (b + 1) * bs]) for b in ids]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batch_indices()[self.start :]
        info = get_worker_info()
        if info is not None:  # each worker yields its share; DataLoader interleaves them back in order
            batches = batches[info.id :: info.num_workers]
        labels = self.cache.labels
        for idx in batches:
            yield self.cache.features(idx), torch.from_numpy(labels[idx])


class FeatureLoader(DataLoader):
    """`DataLoader(BatchedFeatureDataset, batch_size=None)` that sets the dataset's epoch on every `iter()`.

    Stateful for Lightning (`state_dict` / `load_state_dict`): a run resumed from a mid-epoch checkpoint continues
    with the batch after the last one trained on, so it sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, dataset: BatchedFeatureDataset, epoch_seed_fn: Callable[[], int] | None = None,
                 num_workers: int = 0, **kwargs):
        if kwargs.pop("persistent_workers", False):
            raise ConfigError("FeatureLoader cannot use persistent workers: they would not see the new epoch")
        kwargs.pop("batch_size", None)
        super().__init__(dataset, batch_size=None, num_workers=num_workers, **kwargs)
        self.epoch_seed_fn = epoch_seed_fn
        self._next_epoch = 0
        self._consumed = 0  # batches of the current epoch handed out so far (skipped ones included)
        self._resume: tuple[int, int] | None = None  # (epoch, batches) from load_state_dict, used by the next iter()

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` epoch `epoch` (the counter continues from there)."""
        self._next_epoch = int(epoch)

    # Lightning saves these with every checkpoint and, when it resumes mid-epoch, loads them before the first
    # iter(): the resumed epoch then starts at the first batch not yet trained on instead of replaying the epoch.
    def state_dict(self) -> dict[str, int]:
        """`{"epoch", "batches"}`: the current epoch and how many of its batches this loader has handed out."""
        return {"epoch": int(self.dataset.epoch), "batches": int(self._consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next `iter()` skip the first `state["batches"]` batches, if it is epoch `state["epoch"]`."""
        try:
            epoch, batches = int(state["epoch"]), int(state["batches"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"feature loader state {state!r} is not {{'epoch': int, 'batches': int}}") from None
        self._resume = (epoch, max(0, batches))

    def __iter__(self):
        return self._epoch()

    def _epoch(self):
        """One epoch's batches. The epoch (and the batches to skip) are fixed when the first batch is asked for,
        not at `iter()`: Lightning calls `iter()` before it restores a checkpoint's loop progress."""
        if self.epoch_seed_fn is not None:
            epoch = int(self.epoch_seed_fn())
        else:
            epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        skip = 0
        if self._resume is not None:
            (resume_epoch, batches), self._resume = self._resume, None
            skip = batches if resume_epoch == epoch else 0
        self.dataset.epoch, self.dataset.start = epoch, skip
        self._consumed = skip
        for batch in DataLoader.__iter__(self):
            self._consumed += 1
            yield batch
