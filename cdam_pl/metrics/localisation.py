"""Localisation: does a map put its evidence where the target object is? Maps are token grids [B, gh, gw], masks
bool token grids [B, gh, gw] (True = the token belongs to the target's object); one score per map, higher = better.

    focus(s, tiles)   = sum_{i in target tiles} max(s_i, 0) / sum_i max(s_i, 0)            (Arias-Duart et al. 2022)
    pointing_game(s, m) = 1 if a token with the largest score lies in m, else 0             (Zhang et al. 2018)
    relevance_mass_accuracy(s, m) = sum_{i in m} max(s_i, 0) / sum_i max(s_i, 0)           (Arras et al. 2022)
    relevance_rank_accuracy(s, m) = |{top-K tokens by s} & m| / K,  K = |m|                 (Arras et al. 2022)

Against Quantus 0.6 (the tests compare with it): Quantus scores pixels; we score tokens, the unit a ViT explains.
With maps and masks upsampled to pixels by nearest neighbour the two coincide (each sum scales by the patch area,
the top-K pixels are the top-K/patch-area tokens), which is how the tests compare. Quantus normalises maps by their
maximum (scale-free here) and its RelevanceMassAccuracy sums signed relevance; we take positive relevance only, as
Arras et al. define it (CLEVR-XAI: "we only consider positive relevance"). Undefined scores are NaN (an empty mask;
a map without positive relevance for focus and mass accuracy, where Quantus's Focus returns 0 via a 1e-9 guard), and
the Metrics leave them out of the mean (`skipped` counts them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from cdam_pl.errors import CdamError
from cdam_pl.metrics._base import DefinedMeanMetricBase, flat_maps
from cdam_pl.metrics.deletion import deletion_order

__all__ = [
    "quadrant_masks", "focus", "pointing_game", "relevance_mass_accuracy", "relevance_rank_accuracy",
    "Focus", "PointingGame", "RelevanceMassAccuracy", "RelevanceRankAccuracy",
]


def _check_maps(maps: Tensor, name: str) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise CdamError(f"{name} needs maps as token grids [B, gh, gw], got {shape}")


def _flat_masks(maps: Tensor, masks: Tensor, name: str) -> Tensor:
    """Masks [B, gh, gw] (bool; other dtypes: nonzero = inside) -> [B, N] bool on the maps' device."""
    _check_maps(maps, name)
    if not isinstance(masks, Tensor) or tuple(masks.shape) != tuple(maps.shape):
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise CdamError(f"{name} needs one mask per map on the token grid, {tuple(maps.shape)}, got {shape}")
    return masks.detach().to(maps.device).reshape(maps.shape[0], -1) != 0


def _positive_share(s: Tensor, inside: Tensor) -> Tensor:
    """Share of positive relevance inside, per row: [M, N] x [M, N] bool -> [M]; NaN where nothing is positive."""
    pos = s.clamp_min(0)
    total = pos.sum(1)
    share = (pos * inside).sum(1) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, share, torch.full_like(share, float("nan")))


def _nan_where_empty(scores: Tensor, inside: Tensor) -> Tensor:
    return torch.where(inside.any(1), scores, torch.full_like(scores, float("nan")))


def quadrant_masks(target_tiles: Tensor, grid: tuple[int, int], device: torch.device | str | None = None) -> Tensor:
    """[B, 4] tile flags (top-left, top-right, bottom-left, bottom-right; Quantus's order) -> [B, gh, gw] bool."""
    gh, gw = grid
    if gh % 2 or gw % 2:
        raise CdamError(f"focus needs a 2 x 2 mosaic on an even token grid, got {gh} x {gw} tokens; build the mosaic "
                        "from four images of the same size, each a multiple of the patch size")
    if not isinstance(target_tiles, Tensor) or tuple(target_tiles.shape[1:]) != (4,):
        shape = tuple(target_tiles.shape) if isinstance(target_tiles, Tensor) else type(target_tiles).__name__
        raise CdamError(f"focus needs target_tiles [B, 4] (top-left, top-right, bottom-left, bottom-right), "
                        f"got {shape}")
    tiles = (target_tiles.to(device) != 0).view(-1, 2, 1, 2, 1)  # [B, row, 1, col, 1]
    return tiles.expand(-1, 2, gh // 2, 2, gw // 2).reshape(-1, gh, gw)


def focus(maps: Tensor, target_tiles: Tensor) -> Tensor:
    """Focus (Arias-Duart et al., "Focus! Rating XAI Methods and Finding Biases", FUZZ-IEEE 2022): on a 2 x 2 mosaic
    of images, the share of the map's positive relevance that falls on the tiles showing the target class.

    maps [B, gh, gw] (the mosaic's token grid, gh and gw even); target_tiles [B, 4] flags in Quantus's order
    (top-left, top-right, bottom-left, bottom-right) -> [B] in [0, 1]; NaN for a map without positive relevance.
    """
    _check_maps(maps, "focus")
    inside = quadrant_masks(target_tiles, maps.shape[-2:], maps.device).flatten(1)  # [B, N]
    if inside.shape[0] != maps.shape[0]:
        raise CdamError(f"focus needs one row of target_tiles per map: {inside.shape[0]} for {maps.shape[0]} maps")
    return _positive_share(flat_maps(maps), inside)


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", IJCV 2018): 1 if a token
    with the map's largest score lies inside the object mask, else 0 (a tie counts as a hit if any tied token is
    inside, as in Quantus). maps, masks [B, gh, gw] -> [B]; NaN for an empty mask."""
    inside = _flat_masks(maps, masks, "pointing_game")
    s = flat_maps(maps)
    top = s == s.amax(1, keepdim=True)
    return _nan_where_empty((top & inside).any(1).float(), inside)


def relevance_mass_accuracy(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance mass accuracy (Arras, Osman, Samek, "CLEVR-XAI", Information Fusion 2022): the share of the map's
    positive relevance inside the object mask. maps, masks [B, gh, gw] -> [B] in [0, 1]; NaN for an empty mask or a
    map without positive relevance."""
    inside = _flat_masks(maps, masks, "relevance_mass_accuracy")
    return _nan_where_empty(_positive_share(flat_maps(maps), inside), inside)


def relevance_rank_accuracy(maps: Tensor, masks: Tensor, seed: int = 0) -> Tensor:
    """Relevance rank accuracy (Arras, Osman, Samek, "CLEVR-XAI", Information Fusion 2022): with K = the number of
    tokens in the object mask, the fraction of the K highest-scoring tokens that lie inside it.

    maps, masks [B, gh, gw] -> [B] in [0, 1]; NaN for an empty mask. Ties are broken by `deletion_order`'s seeded
    permutation (Quantus leaves them to numpy's unstable argsort)."""
    inside = _flat_masks(maps, masks, "relevance_rank_accuracy")
    order = deletion_order(maps, seed).to(maps.device)  # [B, N], highest first
    k = inside.sum(1, keepdim=True)  # [B, 1]
    ranked = inside.gather(1, order)  # is the r-th highest token inside?
    first_k = torch.arange(order.shape[1], device=maps.device) < k
    hits = (ranked & first_k).sum(1).float()
    return _nan_where_empty(hits / k[:, 0].clamp_min(1), inside)


class Focus(DefinedMeanMetricBase):
    """Mean Focus over mosaics: update(maps [B, gh, gw], target_tiles [B, 4]). Higher = better (0.5 = chance for
    two target tiles of four)."""

    higher_is_better = True

    def update(self, maps: Tensor, target_tiles: Tensor) -> None:
        self.accumulate(focus(maps, target_tiles))


class PointingGame(DefinedMeanMetricBase):
    """Hit rate of the pointing game: update(maps [B, gh, gw], masks [B, gh, gw]). Higher = better."""

    higher_is_better = True

    def update(self, maps: Tensor, masks: Tensor) -> None:
        self.accumulate(pointing_game(maps, masks))


class RelevanceMassAccuracy(DefinedMeanMetricBase):
    """Mean relevance mass accuracy: update(maps [B, gh, gw], masks [B, gh, gw]). Higher = better."""

    higher_is_better = True

    def update(self, maps: Tensor, masks: Tensor) -> None:
        self.accumulate(relevance_mass_accuracy(maps, masks))


class RelevanceRankAccuracy(DefinedMeanMetricBase):
    """Mean relevance rank accuracy: update(maps [B, gh, gw], masks [B, gh, gw]). Higher = better."""

    higher_is_better = True

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = int(seed)

    def update(self, maps: Tensor, masks: Tensor) -> None:
        self.accumulate(relevance_rank_accuracy(maps, masks, self.seed))
