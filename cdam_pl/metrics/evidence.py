"""Masked evidence share: where object masks are known, the share of a map's positive evidence inside its target's
object (higher = better).

    share(s, m) = sum_i max(s_i, 0) * m_i / sum_i max(s_i, 0)

m_i is the fraction of token i's pixels inside the mask. A map without positive evidence has no share.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cdam_pl.errors import CdamError
from cdam_pl.metrics._base import MeanMetricBase, flat_maps

__all__ = ["MaskedEvidenceShare"]


def _evidence_share_update(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Share of positive evidence inside the masks, per map, and whether the map has any positive evidence."""
    pos = flat_maps(maps).clamp_min(0)  # [M, N]
    gh, gw = maps.shape[-2:]
    m = masks.detach().float().reshape(-1, 1, *masks.shape[-2:])  # [M, 1, H, W]
    if m.shape[0] != pos.shape[0]:
        raise CdamError(f"masks {tuple(masks.shape)} do not match maps {tuple(maps.shape)}: need one mask per map")
    if m.shape[-2:] != (gh, gw):
        if m.shape[-2] % gh or m.shape[-1] % gw:
            raise CdamError(f"mask size {tuple(m.shape[-2:])} is not a multiple of the token grid {(gh, gw)}")
        m = F.adaptive_avg_pool2d(m, (gh, gw))  # fraction of each token's pixels inside the object
    total = pos.sum(1)
    inside = (pos * m.reshape(m.shape[0], -1)).sum(1)
    has = total > 0
    return torch.where(has, inside / total.clamp_min(torch.finfo(total.dtype).tiny), torch.zeros_like(total)), has


class MaskedEvidenceShare(MeanMetricBase):
    """Mean share of a map's positive evidence that lies inside its target's object mask (higher = better).

    update(maps [B, K, gh, gw], masks [B, K, H, W]) with H, W multiples of (gh, gw) (pixel masks are pooled to
    each token's fraction inside the object) or equal to them. Maps without positive evidence have no share and
    are left out (`skipped` counts them).
    """

    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("skipped", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        share, has = _evidence_share_update(maps, masks)
        self.accumulate(share[has])
        self.skipped += (~has).sum()
