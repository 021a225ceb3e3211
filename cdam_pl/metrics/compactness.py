"""Compactness (sparsity) of a map: the fraction of its token scores that are negligible next to its largest one.

    compactness(s) = |{i : |s_i| < rel * max_j |s_j|}| / N        (N tokens; an all-zero map scores 1)

Higher = more compact (sparser evidence). This is the symmetric rule on |s| (strict <), with the paper's rel = 0.05.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cdam_pl.errors import CdamError
from cdam_pl.metrics._base import MeanMetricBase, flat_maps

__all__ = ["compactness", "Compactness"]


def _check_rel(rel: float, name: str) -> None:
    if not 0 < rel < 1:
        raise CdamError(f"{name} rel must be in (0, 1), got {rel}")


def _compactness_update(maps: Tensor, rel: float) -> Tensor:
    """Per map, the fraction of scores with |s| < rel * max|s|; an all-zero map counts as 1 (nothing stands out).
    [..., gh, gw] -> [M] (M = number of maps)."""
    a = flat_maps(maps).abs()  # [M, N]
    top = a.max(1, keepdim=True).values
    frac = (a < rel * top).float().mean(1)
    return torch.where(top[:, 0] > 0, frac, torch.ones_like(frac))


def compactness(maps: Tensor, rel: float = 0.05) -> Tensor:
    """Fraction of scores with |s| < rel * max|s| per map: [B, K, gh, gw] -> [B, K] (any [..., gh, gw] -> [...]).

    Higher = more compact (sparser evidence); an all-zero map counts as 1.
    """
    _check_rel(rel, "compactness")
    return _compactness_update(maps, rel).view(maps.shape[:-2])


class Compactness(MeanMetricBase):
    """Mean fraction of near-zero scores per map, |s| < rel * max|s| (higher = more compact; the paper's 0.05)."""

    higher_is_better = True

    def __init__(self, rel: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        _check_rel(rel, "Compactness")
        self.rel = float(rel)

    def update(self, maps: Tensor) -> None:
        """maps [..., gh, gw]: every leading index is one map."""
        self.accumulate(_compactness_update(maps, self.rel))
