"""Per-image scores -> means with seeded percentile-bootstrap 95% intervals, and paired differences.

    mean, [lo, hi] = mean(x), percentiles (2.5, 97.5) of mean(x[resample_b]) over b = 1..n_boot

where each resample draws len(x) images with replacement from a generator seeded by `seed`, so the same scores
always give the same interval. A paired difference resamples images, not scores: the same images for both methods,
so what the images share (their difficulty) cancels. Undefined scores (NaN: a map without positive relevance, an
empty mask) are left out, and a pair counts only where both scores are defined; the number of images behind every
figure is returned with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap interval and the number of images behind it (n = 0: no defined score)."""

    mean: float
    lo: float
    hi: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}] ({self.n})"


def resamples(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Bootstrap index sets [n_boot, n]: each row draws n indices from range(n) with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(int(n_boot), int(n)))


def _interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    if stats.size == 0:  # no resample had a defined value (a pooled correlation with a constant map)
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(scores, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Estimate:
    """Mean of the defined scores with its percentile-bootstrap interval."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    means = x[resamples(x.size, n_boot, seed)].mean(1)
    return Estimate(float(x.mean()), *_interval(means, level), int(x.size))


def paired_difference(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> Estimate:
    """Mean of a - b over the images where both are defined, with the paired-bootstrap interval of that mean.

    a and b hold one score per image, aligned (same image at the same position)."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must be aligned, got {a.shape} and {b.shape}")
    both = ~(np.isnan(a) | np.isnan(b))
    return bootstrap_mean(a[both] - b[both], n_boot, seed, level)


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], n: int, n_boot: int = N_BOOT, seed: int = 0,
                        level: float = LEVEL) -> Estimate:
    """A statistic of n images (e.g. a correlation pooled over their tokens) with its interval: `statistic(idx)`
    gets the indices of the images to use, first range(n), then each bootstrap resample."""
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(statistic(np.arange(n)))
    stats = np.array([statistic(idx) for idx in resamples(n, n_boot, seed)], dtype=np.float64)
    return Estimate(value, *_interval(stats[~np.isnan(stats)], level), n)


def bootstrap_of_sums(per_image, statistic: Callable[[np.ndarray], np.ndarray], n_boot: int = N_BOOT,
                      seed: int = 0, level: float = LEVEL) -> Estimate:
    """`bootstrap_statistic` for a statistic of sums over images (a pooled correlation: each image's token count and
    sums of a, b, a^2, b^2, ab): per_image [n, k]; statistic(sums [..., k]) -> [...]. The same resamples, each one's
    sums added up from the rows it draws, all at once instead of one pass over every token per resample."""
    x = np.asarray(per_image, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(statistic(x.sum(0)))
    idx = resamples(n, n_boot, seed)
    chunk = max(1, (1 << 24) // max(x.size, 1))  # resamples per step: ~16M numbers gathered at a time
    stats = np.concatenate([np.asarray(statistic(x[idx[i:i + chunk]].sum(1)), dtype=np.float64).reshape(-1)
                            for i in range(0, len(idx), chunk)])
    return Estimate(value, *_interval(stats[~np.isnan(stats)], level), n)


def align(ids_a: list[str], a, ids_b: list[str], b) -> tuple[np.ndarray, np.ndarray]:
    """Scores of two methods on the images both were scored on, in one order: (a', b')."""
    pos = {k: i for i, k in enumerate(ids_b)}
    common = [(i, pos[k]) for i, k in enumerate(ids_a) if k in pos]
    ia = np.array([i for i, _ in common], dtype=np.int64)
    ib = np.array([j for _, j in common], dtype=np.int64)
    return np.asarray(a, dtype=np.float64)[ia], np.asarray(b, dtype=np.float64)[ib]
