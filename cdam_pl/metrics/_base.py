"""Shared machinery of the explanation-quality metrics: token grids as rows, and the mean-over-maps Metric base."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from cdam_pl.errors import CdamError


def flat_maps(maps: Tensor) -> Tensor:
    """[..., gh, gw] -> [M, gh*gw] float (one row per map)."""
    if maps.ndim < 2:
        raise CdamError(f"maps must be token grids [..., gh, gw], got shape {tuple(maps.shape)}")
    return maps.detach().reshape(-1, maps.shape[-2] * maps.shape[-1]).float()


class MeanMetricBase(Metric):
    """A Metric whose value is the mean of one score per map over everything seen: mean = total / count.

    `total` and `count` are float64 sums (dist_reduce_fx="sum"), so DDP sync adds up the per-rank totals and
    compute() divides once; with nothing seen, compute() is NaN. Subclasses turn their inputs into per-map scores
    and pass them to `accumulate`.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def accumulate(self, scores: Tensor) -> None:
        """Add per-map scores (any shape, one element per map) to the running sum and count."""
        self.total += scores.sum().double()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float() if self.count > 0 else torch.tensor(float("nan"))


class DefinedMeanMetricBase(MeanMetricBase):
    """A mean over the maps whose score is defined: NaN scores (e.g. an empty object mask, a map without positive
    relevance) are left out of the mean and counted in `skipped` (synced like the other states)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("skipped", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def accumulate(self, scores: Tensor) -> None:
        defined = ~scores.isnan()
        super().accumulate(scores[defined])
        self.skipped += (~defined).sum()
