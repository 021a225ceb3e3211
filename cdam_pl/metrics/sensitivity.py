"""Class sensitivity: the maps of two classes of one image should differ, measured by their Pearson correlation
over tokens (lower = more class-sensitive; a class-agnostic method scores 1).

    r(a, b) = sum_i (a_i - mean(a)) (b_i - mean(b)) / sqrt(sum_i (a_i - mean(a))^2 * sum_i (b_i - mean(b))^2)

Identical maps give 1 (also when constant); a constant map against a different one gives 0 (no linear relation
to measure).

Pooled correlation between two methods (the form of the paper's first version's table, e.g. TAM-CDAM 0.44): one
Pearson correlation over all token scores of all images pooled together, not a mean of per-image correlations.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from cdam_pl.errors import CdamError
from cdam_pl.metrics._base import MeanMetricBase, flat_maps

__all__ = ["map_correlation", "ClassSensitivity", "pooled_correlation", "PooledCorrelation"]


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of [M, N] maps. Identical maps give 1 (also when constant); a constant map
    against a different one gives 0 (no linear relation to measure)."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    r = (a * b).sum(1) / den.clamp_min(torch.finfo(a.dtype).tiny)
    r = torch.where(den > 0, r, torch.zeros_like(r))
    return torch.where((a == b).all(1), torch.ones_like(r), r).clamp(-1.0, 1.0)


def _correlation_update(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of paired maps [..., gh, gw] x [..., gh, gw] -> [M] (one per pair)."""
    return _pearson(flat_maps(a), flat_maps(b))


def map_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation over tokens of paired maps: [B, gh, gw] x [B, gh, gw] -> [B] (any [..., gh, gw]).

    Class sensitivity: the maps of two classes of one image should differ (lower = more class-sensitive).
    Identical maps give 1, a constant map against a different one 0.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise CdamError(f"map_correlation needs two maps of one shape [..., gh, gw], got {tuple(a.shape)} "
                        f"and {tuple(b.shape)}")
    return _correlation_update(a, b).view(a.shape[:-2])


class ClassSensitivity(MeanMetricBase):
    """Mean Pearson correlation between the maps of two targets of the same image, by default index 0 (top-1)
    and index 1 (top-2). Lower = more class-sensitive; a class-agnostic method scores 1."""

    higher_is_better = False

    def __init__(self, pair: tuple[int, int] = (0, 1), **kwargs):
        super().__init__(**kwargs)
        self.pair = (int(pair[0]), int(pair[1]))

    def update(self, maps: Tensor) -> None:
        """maps [B, K, gh, gw] with K > max(pair)."""
        if maps.ndim != 4 or maps.shape[1] <= max(self.pair):
            raise CdamError(f"ClassSensitivity needs maps [B, K>={max(self.pair) + 1}, gh, gw], "
                            f"got {tuple(maps.shape)}")
        self.accumulate(_correlation_update(maps[:, self.pair[0]], maps[:, self.pair[1]]))


def pooled_correlation(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Pearson correlation over every token score of every map pooled together (not a per-image mean): two methods'
    maps of the same images and targets, [..., gh, gw] each -> scalar. Identical inputs give 1, a constant one 0."""
    if maps_a.shape != maps_b.shape or maps_a.ndim < 2:
        raise CdamError(f"pooled_correlation needs two sets of maps of one shape [..., gh, gw], got "
                        f"{tuple(maps_a.shape)} and {tuple(maps_b.shape)}")
    return _pearson(maps_a.detach().reshape(1, -1).double(), maps_b.detach().reshape(1, -1).double())[0].float()


def pearson_from_sums(n: Tensor, sa: Tensor, sb: Tensor, saa: Tensor, sbb: Tensor, sab: Tensor) -> Tensor:
    """Pearson correlation of n paired values from their sums (of a, b, a^2, b^2, ab), elementwise over any
    broadcastable shapes (float64 advised); NaN where n = 0 or one side is constant."""
    cov = sab - sa * sb / n
    den = ((saa - sa ** 2 / n) * (sbb - sb ** 2 / n)).sqrt()
    ok = (n > 0) & (den > 0)
    return torch.where(ok, (cov / torch.where(ok, den, torch.ones_like(den))).clamp(-1.0, 1.0),
                       torch.full_like(cov, float("nan")))


class PooledCorrelation(Metric):
    """Pearson correlation of two methods' token scores, pooled over everything seen: update(maps_a, maps_b) with
    paired maps [..., gh, gw]. The states are float64 sums (n, sums, sums of squares and products), so DDP sync
    adds them up and compute() equals `pooled_correlation` of all maps concatenated. NaN when nothing was seen or
    one side is constant."""

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("n", "sa", "sb", "saa", "sbb", "sab"):
            self.add_state(name, torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, maps_a: Tensor, maps_b: Tensor) -> None:
        if maps_a.shape != maps_b.shape or maps_a.ndim < 2:
            raise CdamError(f"PooledCorrelation needs paired maps of one shape [..., gh, gw], got "
                            f"{tuple(maps_a.shape)} and {tuple(maps_b.shape)}")
        a, b = maps_a.detach().reshape(-1).double(), maps_b.detach().reshape(-1).double()
        self.n += a.numel()
        self.sa += a.sum()
        self.sb += b.sum()
        self.saa += (a * a).sum()
        self.sbb += (b * b).sum()
        self.sab += (a * b).sum()

    def compute(self) -> Tensor:
        return pearson_from_sums(self.n, self.sa, self.sb, self.saa, self.sbb, self.sab).float()
