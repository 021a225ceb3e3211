"""Class-balanced, seeded index sets: `stratified_subset` (n samples keeping class proportions) and
`stratified_split` (train / validation indices), plus the checks of their count and fraction arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cdam_pl.errors import ConfigError, DataError

__all__ = ["check_count", "check_val_split", "stratified_subset", "stratified_split"]


def check_count(name: str, n: Any) -> int:
    """`n` as an int if it is a positive integer, else a `ConfigError` naming `name`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def check_val_split(val_split: Any) -> float:
    """`val_split` as a float if it is a fraction strictly between 0 and 1, else a `ConfigError`."""
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 < val_split < 1:
        raise ConfigError(f"val_split must be a fraction between 0 and 1, got {val_split!r}")
    return float(val_split)


def _allocate(counts: np.ndarray, n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer per-class allocation summing to `n`, close to proportional, within [lo, hi]."""
    quota = n * counts / counts.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), lo, hi)
    order = np.arange(len(counts))
    while alloc.sum() < n:  # give to the class furthest below its quota
        gap = np.where(alloc < hi, quota - alloc, -np.inf)
        alloc[np.lexsort((order, -gap))[0]] += 1
    while alloc.sum() > n:  # take from the class furthest above its quota
        gap = np.where(alloc > lo, alloc - quota, -np.inf)
        alloc[np.lexsort((order, -gap))[0]] -= 1
    return alloc


def stratified_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Sorted indices of `n` samples keeping class proportions; deterministic for `seed`.

    Every class gets at least one sample when `n >= number of classes`. `n >= len(targets)`
    returns all indices.
    """
    n = check_count("subset size", n)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if n >= len(t):
        return list(range(len(t)))
    labels, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    lo = np.full(len(labels), 1 if n >= len(labels) else 0, dtype=np.int64)
    alloc = _allocate(counts, n, lo, counts)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for k in range(len(labels)):
        members = np.flatnonzero(inverse == k)
        chosen.append(rng.permutation(members)[: alloc[k]])
    return sorted(int(i) for i in np.concatenate(chosen))


def stratified_split(
    targets: Sequence[int], val_split: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded stratified `(train_indices, val_indices)`; every class keeps >= 1 training sample.

    `val_split` is a fraction in (0, 1); classes with a single sample go to train only.
    """
    check_val_split(val_split)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    labels, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    hi = counts - 1
    n_val = min(int(round(val_split * len(t))), int(hi.sum()))
    if n_val < 1:
        raise DataError(
            f"too few images ({len(t)}) to split off a validation set with val_split={val_split}; "
            "add images or give a separate val_dir"
        )
    lo = np.where(hi >= 1, 1, 0) if n_val >= int((hi >= 1).sum()) else np.zeros_like(hi)
    alloc = _allocate(counts, n_val, lo, hi)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(t), dtype=bool)
    for k in range(len(labels)):
        members = np.flatnonzero(inverse == k)
        val[rng.permutation(members)[: alloc[k]]] = True
    return np.flatnonzero(~val).tolist(), np.flatnonzero(val).tolist()
