"""Compactness (sparsity) of a map: the fraction of its token scores that are negligible next to its largest one.
Higher = more compact (sparser evidence). Two rules exist (Brocki, Binda, Chung, TMLR 2024; see docs/method.md); name
the rule next to every figure:

    v1 (the paper's figures; the authors' notebook, `get_ratio`), with the SIGNED maximum:
        compactness_v1(s) = |{i : |s_i| < rel * max_j s_j}| / N          (a map with max_j s_j <= 0 scores 0)
    symmetric (the authors' later packages), with the largest magnitude:
        compactness_symmetric(s) = |{i : |s_i| <= rel * max_j |s_j|}| / N   (an all-zero map scores 1)

N tokens, rel = 0.05. The two agree on unsigned maps (AM, RP) and differ on signed ones (CDAM, TAM): a map whose
evidence is mostly negative has a small signed maximum, so v1 counts few of its scores as negligible. The paper
applies v1 to the map of the predicted class only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from cdam_pl.errors import CdamError
from cdam_pl.metrics._base import MeanMetricBase, flat_maps

__all__ = ["COMPACTNESS_RULES", "compactness_v1", "compactness_symmetric", "CompactnessV1", "CompactnessSymmetric"]

COMPACTNESS_RULES = ("compactness_v1", "compactness_symmetric")


def _check_rel(rel: float, name: str) -> float:
    if not 0 < rel < 1:
        raise CdamError(f"{name} rel must be in (0, 1), got {rel}")
    return float(rel)


def _v1_update(maps: Tensor, rel: float) -> Tensor:
    """[..., gh, gw] -> [M]: fraction of |s| < rel * max(s); 0 where max(s) <= 0."""
    s = flat_maps(maps)  # [M, N]
    top = s.amax(1, keepdim=True)
    frac = (s.abs() < rel * top).float().mean(1)
    return torch.where(top[:, 0] > 0, frac, torch.zeros_like(frac))


def _symmetric_update(maps: Tensor, rel: float) -> Tensor:
    """[..., gh, gw] -> [M]: fraction of |s| <= rel * max|s| (an all-zero map: every score, 1)."""
    a = flat_maps(maps).abs()  # [M, N]
    return (a <= rel * a.amax(1, keepdim=True)).float().mean(1)


def compactness_v1(maps: Tensor, rel: float = 0.05) -> Tensor:
    """The paper's v1 rule: fraction of scores with |s| < rel * max(s), signed maximum, per map.

    maps [B, gh, gw] -> [B] (any [..., gh, gw] -> [...]). A map whose maximum is <= 0 scores 0. Give it the map of
    the predicted class to reproduce the paper's figures.
    """
    return _v1_update(maps, _check_rel(rel, "compactness_v1")).view(maps.shape[:-2])


def compactness_symmetric(maps: Tensor, rel: float = 0.05) -> Tensor:
    """The symmetric rule: fraction of scores with |s| <= rel * max|s| per map.

    maps [B, gh, gw] -> [B] (any [..., gh, gw] -> [...]). An all-zero map scores 1 (nothing stands out).
    """
    return _symmetric_update(maps, _check_rel(rel, "compactness_symmetric")).view(maps.shape[:-2])


class _CompactnessMetric(MeanMetricBase):
    higher_is_better = True
    _rule: Callable[[Tensor, float], Tensor]

    def __init__(self, rel: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.rel = _check_rel(rel, type(self).__name__)

    def update(self, maps: Tensor) -> None:
        """maps [B, gh, gw] (any [..., gh, gw]: every leading index is one map)."""
        self.accumulate(type(self)._rule(maps, self.rel))


class CompactnessV1(_CompactnessMetric):
    """Mean v1 compactness, |s| < rel * max(s) with the signed maximum (0 for a map with max <= 0); the paper's
    rule, meant for the predicted class's maps. Higher = more compact."""

    _rule = staticmethod(_v1_update)


class CompactnessSymmetric(_CompactnessMetric):
    """Mean symmetric compactness, |s| <= rel * max|s| (1 for an all-zero map). Higher = more compact."""

    _rule = staticmethod(_symmetric_update)
