"""Faithfulness: does the model's output follow what the map ranks as important? Perturb the input in the map's order
and record the softmax probability p of the target class.

Deletion and insertion (Petsiuk, Das, Saenko, "RISE", BMVC 2018): with the N patches ranked by the map (highest
first), step s of S removes (deletion) or reveals (insertion) the c_s = round(s N / S) top-ranked patches:

    deletion(s)  = p(x without its c_s top patches)          lower area = better
    insertion(s) = p(x with only its c_s top patches)         higher area = better
    AUC = integral_0^1 curve(x) dx ~= sum_{s=1}^{S} (curve_s + curve_{s-1}) / (2 S)

mode "token" removes patch tokens after the position embedding (the ViT-native variant; insertion starts from the
prefix tokens alone); mode "pixel" replaces a patch's pixels by a Gaussian blur of the image (deletion) or starts
from the blurred image and restores patches (insertion).

ROAD (Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022): remove the top (MoRF) or bottom (LeRF) fraction of pixels, ranked by the map upsampled to
pixels (nearest neighbour: a token's score on each of its pixels), by noisy linear imputation: every removed pixel
becomes the weighted mean of its 8 neighbours (1/6 direct, 1/12 diagonal; neighbours outside the image dropped),
removed ones included, i.e. one sparse linear system per image, plus Gaussian noise (std `noise`).

Against Quantus 0.6 (the tests compare): Quantus perturbs pixels (PixelFlipping: `features_in_step` values at a
time; RegionPerturbation: square regions; ROAD: pixels) and its curves start after the first perturbation; its ROAD
records whether the top class is still the target (accuracy), not p. We rank tokens, include step 0 (the intact
input) and batch every step of every image. With the map upsampled to pixels by nearest neighbour and one token per
step, PixelFlipping (`features_in_step` = patch^2, on single-channel images: its step must divide H * W) and
RegionPerturbation (`patch_size` = the ViT patch; it reports p(x) - curve) with blur replacement give our pixel-mode
deletion curve; our token mode is the same with a model that drops the tokens of replaced patches. Our imputation
equals Quantus's `noisy_linear_imputation` (solved for every image, fraction and channel at once); Quantus's ROAD
ranks and imputes single-channel images only (its pixel indices run over channels x pixels otherwise), on which it
sees the probabilities we return.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdam_pl.errors import CdamError
from cdam_pl.explain._vit import as_targets, check_range
from cdam_pl.metrics._base import MeanMetricBase
from cdam_pl.metrics.deletion import (
    DELETION_MAX_ELEMENTS,
    DELETION_MODES,
    deletion_order,
    gaussian_blur,
    keep_after_removal,
    patch_logits,
)

__all__ = [
    "PERTURBATION_KINDS", "ROAD_ORDERS", "ROAD_FRACTIONS", "perturbation_curves", "curve_auc",
    "noisy_linear_imputation", "road_curves", "DeletionAUC", "InsertionAUC", "ROAD",
]

PERTURBATION_KINDS = ("deletion", "insertion")
ROAD_ORDERS = ("morf", "lerf")
ROAD_FRACTIONS = tuple(round(0.05 + 0.1 * i, 2) for i in range(10))  # 0.05, 0.15, ..., 0.95
# Rong et al.'s imputation weights of the 8 neighbours: (dy, dx) -> weight.
# Most unknowns one sparse LU takes (larger batches are solved in groups of images): bounds its fill-in, ~O(n log n).
IMPUTATION_MAX_UNKNOWNS = 2**20
NEIGHBOUR_WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6,
                     (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def _inputs(backbone: nn.Module, images: Tensor, targets: Tensor, maps: Tensor) -> tuple[int, int, Tensor]:
    """Validate one map and one target per image: -> (gh, gw, targets [B] on the images' device)."""
    gh, gw = backbone.check_images(images)
    b = images.shape[0]
    t = as_targets(targets, b, images.device)
    if t.shape[1] != 1:
        raise CdamError(f"targets must be one class index per image, [B={b}], got {tuple(targets.shape)}")
    if not isinstance(maps, Tensor) or tuple(maps.shape) != (b, gh, gw):
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise CdamError(f"maps must be [B={b}, {gh}, {gw}] (one token grid per image), got {shape}")
    return gh, gw, t[:, 0]


def _target_probs(logits: Tensor, targets: Tensor, steps: int) -> Tensor:
    """Step-major logits [S * B, C] -> softmax probability of each image's target, [B, S]."""
    check_range(targets, logits.shape[1])
    b = targets.shape[0]
    p = logits.float().softmax(-1).gather(1, targets.repeat(steps)[:, None])[:, 0]
    return p.view(steps, b).T


def perturbation_curves(
    backbone: nn.Module,
    head: nn.Module | None,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    *,
    kind: str = "deletion",
    mode: str = "token",
    steps: int = 20,
    seed: int = 0,
    blur_sigma: float | None = None,
    max_elements: int = DELETION_MAX_ELEMENTS,
) -> Tensor:
    """Deletion or insertion curve of the target's softmax probability (Petsiuk et al. 2018): -> [B, steps+1].

    images [B, 3, H, W]; targets [B] class indices; maps [B, gh, gw], one per image. Step s removes ("deletion") or
    keeps only ("insertion") the round(s N / steps) highest-ranked patches (ties broken by `deletion_order`'s seeded
    permutation). mode "token": tokens removed after the position embedding; mode "pixel": patches replaced by a
    Gaussian blur of the image (sigma `blur_sigma`, default half a patch). Every step of every image goes through
    one batched `patch_logits` call on the images' device.
    """
    if kind not in PERTURBATION_KINDS:
        raise CdamError(f"unknown perturbation kind {kind!r}; choose one of {', '.join(PERTURBATION_KINDS)}")
    if mode not in DELETION_MODES:
        raise CdamError(f"unknown perturbation mode {mode!r}; choose one of {', '.join(DELETION_MODES)}")
    if int(steps) < 1:
        raise CdamError(f"perturbation curves need steps >= 1, got {steps}")
    gh, gw, t = _inputs(backbone, images, targets, maps)
    b, n = images.shape[0], gh * gw
    order = deletion_order(maps, seed).to(images.device)  # [B, N], highest first
    counts = [round(s * n / int(steps)) for s in range(int(steps) + 1)]
    keep = keep_after_removal(order, counts)  # [S*B, N]: the top c_s removed
    if kind == "insertion":
        keep = ~keep  # only the top c_s present
    fill = None
    if mode == "pixel":
        with torch.no_grad():
            fill = gaussian_blur(images.detach(), float(blur_sigma) if blur_sigma else backbone.patch_size / 2)
    rows = torch.arange(b, device=images.device).repeat(len(counts))
    logits = patch_logits(backbone, head, images, keep, rows, mode=mode, fill=fill, max_elements=max_elements)
    return _target_probs(logits, t, len(counts))


def curve_auc(curves: Tensor) -> Tensor:
    """Trapezoid area under curves sampled at equally spaced x in [0, 1]: [..., S+1] -> [...]."""
    if curves.ndim < 1 or curves.shape[-1] < 2:
        raise CdamError(f"curve_auc needs curves [..., S+1] with at least 2 points, got {tuple(curves.shape)}")
    steps = curves.shape[-1] - 1
    return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2 * steps)


@lru_cache(maxsize=16)
def _dissection_rank(height: int, width: int, leaf: int = 16) -> np.ndarray:
    """Nested-dissection rank of every pixel of an H x W grid (raster index -> rank): split the longer side by a
    middle line, order the two halves recursively, then the line. A line separates 8-connected pixels too, so the
    rank restricted to any subset is a dissection ordering of that subset's stencil: the sparse LU of the imputation
    system then fills in O(n log n) instead of COLAMD's larger fill on grids."""
    parts: list[np.ndarray] = []

    def visit(y0: int, y1: int, x0: int, x1: int) -> None:
        h, w = y1 - y0, x1 - x0
        if h <= 0 or w <= 0:
            return
        if h * w <= leaf:
            parts.append((np.arange(y0, y1)[:, None] * width + np.arange(x0, x1)).ravel())
        elif h >= w:
            m = y0 + h // 2
            visit(y0, m, x0, x1)
            visit(m + 1, y1, x0, x1)
            parts.append(m * width + np.arange(x0, x1))
        else:
            m = x0 + w // 2
            visit(y0, y1, x0, m)
            visit(y0, y1, m + 1, x1)
            parts.append(np.arange(y0, y1) * width + m)

    visit(0, height, 0, width)
    rank = np.empty(height * width, np.int64)
    rank[np.concatenate(parts)] = np.arange(height * width)
    return rank


def noisy_linear_imputation(images: Tensor, removed: Tensor, noise: float = 0.01,
                            generator: torch.Generator | None = None) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022): images [M, C, H, W], removed [M, H, W] bool -> images
    with every removed pixel replaced by the weighted mean of its in-image neighbours (1/6 direct, 1/12 diagonal;
    removed neighbours are unknowns too) plus `noise` * N(0, 1) from `generator` (CPU, seeded 0 when None).

    The equations of the M images and C channels form a block-diagonal sparse system with C right-hand sides,
    built with dense convolutions on the images' device and solved by sparse LU (scipy's SuperLU, in float64,
    nested-dissection order, no pivoting: the system is a symmetric diagonally dominant M-matrix), for groups of
    images of at most IMPUTATION_MAX_UNKNOWNS removed pixels at a time. Equals
    `quantus.functions.perturb_func.noisy_linear_imputation` at noise 0 (same equations, image by image).
    """
    if images.ndim != 4 or removed.shape != (images.shape[0], *images.shape[2:]):
        raise CdamError(f"noisy_linear_imputation needs images [M, C, H, W] and removed [M, H, W], got "
                        f"{tuple(images.shape)} and {tuple(removed.shape)}")
    rem = removed.to(device=images.device, dtype=torch.bool)
    if rem.flatten(1).all(1).any():
        raise CdamError("noisy linear imputation needs at least one kept pixel per image; remove a fraction < 1")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    out = images.detach().clone()
    counts = rem.flatten(1).sum(1).tolist()
    # the noise of every removed pixel, drawn at once (the same numbers however the images are grouped)
    noises = (float(noise) * torch.randn(sum(counts), out.shape[1], generator=g, dtype=torch.float64)).split(counts)
    start = 0
    while start < len(counts):  # groups of whole images, at most IMPUTATION_MAX_UNKNOWNS unknowns (one image at least)
        stop, total = start + 1, counts[start]
        while stop < len(counts) and total + counts[stop] <= IMPUTATION_MAX_UNKNOWNS:
            total += counts[stop]
            stop += 1
        if total:
            _impute(out[start:stop], rem[start:stop], torch.cat(noises[start:stop]))
        start = stop
    return out


def _impute(out: Tensor, rem: Tensor, noise: Tensor) -> None:
    """Linear imputation of the pixels `rem` [M, H, W] of `out` [M, C, H, W] plus `noise` [V, C], in place: one
    sparse LU."""
    m, c, h, w = out.shape
    dev = out.device
    n_var = int(rem.sum())
    x = out.double()
    kernel = torch.zeros(3, 3, dtype=torch.float64, device=dev)
    for (dy, dx), wt in NEIGHBOUR_WEIGHTS.items():
        kernel[dy + 1, dx + 1] = wt
    # right-hand side: minus the weighted sum of kept neighbours; diagonal: minus the weights of in-image neighbours
    kept_sum = F.conv2d((x * ~rem[:, None]).reshape(m * c, 1, h, w), kernel[None, None], padding=1)
    rhs = -kept_sum.view(m, c, h, w).permute(0, 2, 3, 1)[rem]  # [V, C], variables in raster order of (m, y, x)
    in_image = F.conv2d(torch.ones(1, 1, h, w, dtype=torch.float64, device=dev), kernel[None, None], padding=1)
    diag = -in_image[0, 0].expand(m, h, w)[rem]  # [V]
    var = torch.where(rem, rem.flatten().cumsum(0).view(m, h, w) - 1, -1)  # [M, H, W]: variable index or -1
    padded = F.pad(var, (1, 1, 1, 1), value=-1)
    rows, cols, vals = [torch.arange(n_var, device=dev)], [torch.arange(n_var, device=dev)], [diag]
    for (dy, dx), wt in NEIGHBOUR_WEIGHTS.items():
        if (dy, dx) < (0, 0):
            continue  # symmetric: each pair of removed neighbours is entered from one side, both ways
        other = padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]  # the neighbour's variable index, or -1
        pair = rem & (other >= 0)
        i, j = var[pair], other[pair]
        rows += [i, j]
        cols += [j, i]
        vals += [torch.full((2 * i.shape[0],), wt, dtype=torch.float64, device=dev)]
    # nested-dissection order: images one after another, each pixel by its rank on the grid
    pix = rem.flatten(1).nonzero()  # [V, 2]: (image, raster index), in variable order
    key = pix[:, 0].cpu().numpy() * (h * w) + _dissection_rank(h, w)[pix[:, 1].cpu().numpy()]
    perm = np.argsort(key, kind="stable")  # new position -> variable
    inv = np.empty_like(perm)
    inv[perm] = np.arange(n_var)  # variable -> new position
    r_np, c_np = (inv[torch.cat(t).cpu().numpy()] for t in (rows, cols))
    a = scipy.sparse.csc_matrix((torch.cat(vals).cpu().numpy(), (r_np, c_np)), shape=(n_var, n_var))
    lu = scipy.sparse.linalg.splu(a, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    sol = lu.solve(rhs.cpu().numpy()[perm])[inv]  # [V, C] in variable order
    values = torch.from_numpy(sol) + noise
    out.permute(0, 2, 3, 1)[rem] = values.to(device=dev, dtype=out.dtype)


def road_curves(
    backbone: nn.Module,
    head: nn.Module | None,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    *,
    order: str = "morf",
    fractions: Sequence[float] = ROAD_FRACTIONS,
    noise: float = 0.01,
    seed: int = 0,
    max_elements: int = DELETION_MAX_ELEMENTS,
) -> Tensor:
    """ROAD curves (Rong et al. 2022): softmax probability of the target after noisy linear imputation of the top
    ("morf", most relevant first) or bottom ("lerf") fraction of pixels, for each of `fractions`: -> [B, S].

    images [B, 3, H, W]; targets [B]; maps [B, gh, gw], upsampled to pixels by nearest neighbour and ranked with
    `deletion_order` (ties, e.g. the pixels of one token, broken by its seeded permutation); round(f H W) pixels
    are removed for fraction f. The noise is drawn from a CPU generator seeded `seed`. MoRF: lower = better;
    LeRF: higher = better.
    """
    if order not in ROAD_ORDERS:
        raise CdamError(f"unknown ROAD order {order!r}; choose one of {', '.join(ROAD_ORDERS)}")
    gh, gw, t = _inputs(backbone, images, targets, maps)
    (h, w), patch = images.shape[-2:], backbone.patch_size
    counts = [round(float(f) * h * w) for f in fractions]
    if not counts or not all(0 < f < 1 for f in fractions) or max(counts) >= h * w:
        raise CdamError(f"ROAD fractions must be in (0, 1) and leave a pixel, got {tuple(fractions)}")
    pixel_maps = maps.detach().repeat_interleave(patch, -2).repeat_interleave(patch, -1)  # [B, H, W]
    ranked = deletion_order(pixel_maps, seed).to(images.device)  # [B, H*W], highest first
    if order == "lerf":
        ranked = ranked.flip(-1)
    removed = ~keep_after_removal(ranked, counts)  # [S*B, H*W], fraction-major
    imputed = noisy_linear_imputation(images.repeat(len(counts), 1, 1, 1), removed.view(-1, h, w), noise,
                                      torch.Generator().manual_seed(seed))
    every = torch.ones(imputed.shape[0], gh * gw, dtype=torch.bool, device=images.device)
    logits = patch_logits(backbone, head, imputed, every, max_elements=max_elements)
    return _target_probs(logits, t, len(counts))


class _CurveMetric(MeanMetricBase):
    """Mean of one number per curve, and the mean curve (`mean_curves()`, for plots)."""

    def __init__(self, points: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("curve_sum", torch.zeros(points, dtype=torch.float64), dist_reduce_fx="sum")

    def add_curves(self, curves: Tensor, scores: Tensor) -> None:
        self.accumulate(scores)
        self.curve_sum += curves.detach().double().sum(0).to(self.curve_sum.device)

    def mean_curves(self) -> Tensor:
        return (self.curve_sum / self.count.clamp_min(1)).float()


class _PerturbationAUC(_CurveMetric):
    kind = "deletion"

    def __init__(self, mode: str = "token", steps: int = 20, seed: int = 0, blur_sigma: float | None = None,
                 **kwargs):
        if mode not in DELETION_MODES:
            raise CdamError(f"unknown perturbation mode {mode!r}; choose one of {', '.join(DELETION_MODES)}")
        super().__init__(int(steps) + 1, **kwargs)
        self.mode, self.steps, self.seed, self.blur_sigma = mode, int(steps), int(seed), blur_sigma

    def update(self, backbone: nn.Module, head: nn.Module | None, images: Tensor, targets: Tensor,
               maps: Tensor) -> None:
        curves = perturbation_curves(backbone, head, images, targets, maps, kind=self.kind, mode=self.mode,
                                     steps=self.steps, seed=self.seed, blur_sigma=self.blur_sigma)
        self.add_curves(curves, curve_auc(curves))


class DeletionAUC(_PerturbationAUC):
    """Mean area under the deletion curve of the target probability (Petsiuk et al. 2018); lower = better.
    update(backbone, head, images [B, 3, H, W], targets [B], maps [B, gh, gw])."""

    higher_is_better = False
    kind = "deletion"


class InsertionAUC(_PerturbationAUC):
    """Mean area under the insertion curve of the target probability (Petsiuk et al. 2018); higher = better.
    update(backbone, head, images [B, 3, H, W], targets [B], maps [B, gh, gw])."""

    higher_is_better = True
    kind = "insertion"


class ROAD(_CurveMetric):
    """Mean ROAD curve area (Rong et al. 2022): the mean over `fractions` of the target probability after noisy
    linear imputation, per image, averaged over images; MoRF: lower = better, LeRF: higher = better.
    update(backbone, head, images [B, 3, H, W], targets [B], maps [B, gh, gw])."""

    higher_is_better = None  # depends on the order: MoRF lower, LeRF higher

    def __init__(self, order: str = "morf", fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = 0.01,
                 seed: int = 0, **kwargs):
        if order not in ROAD_ORDERS:
            raise CdamError(f"unknown ROAD order {order!r}; choose one of {', '.join(ROAD_ORDERS)}")
        super().__init__(len(fractions), **kwargs)
        self.order, self.fractions, self.noise, self.seed = order, tuple(fractions), float(noise), int(seed)

    def update(self, backbone: nn.Module, head: nn.Module | None, images: Tensor, targets: Tensor,
               maps: Tensor) -> None:
        curves = road_curves(backbone, head, images, targets, maps, order=self.order, fractions=self.fractions,
                             noise=self.noise, seed=self.seed)
        self.add_curves(curves, curves.mean(-1))
