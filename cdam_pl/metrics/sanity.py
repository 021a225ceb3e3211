"""Sanity checks (randomisation tests): a map that explains the model must change when the model or the target does.

Model parameter randomisation (Adebayo, Gilmer, Muelly, Goodfellow, Hardt, Kim, "Sanity Checks for Saliency Maps",
NeurIPS 2018), cascading, top down: re-initialise the head, then also the last block, then the block before it, and
compare each stage's map with the trained model's map; a faithful method's maps lose their similarity (lower =
better). Random logit (Sixt, Granz, Landgraf, "When Explanations Lie", ICML 2020): compare the map of the target
with the map of a random other class of the same image (lower = more class-sensitive).

Similarities, one per pair of maps:
    spearman(a, b) = Pearson correlation of the ranks of the token scores (ties share their mean rank)
    ssim(a, b)     = mean over windows of (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b
                     + C2)) (Wang et al. 2004), each map divided by its largest |s| first, C1 = (0.01 L)^2,
                     C2 = (0.03 L)^2, L = max - min over both maps, uniform w x w windows inside the grid, sample
                     (co)variances

Against Quantus 0.6 (the tests compare): its MPRT randomises one module at a time (every module with
`reset_parameters`, each after `torch.manual_seed(seed + 1)`); our stages are its states after the last module of
the head and of each block, re-initialised the same way, so the scores coincide there. Quantus compares pixel maps
(with abs=True and a batch-wide max normalisation by default); we compare token maps, signed (Spearman is
invariant to the per-map scaling). Its RandomLogit draws the other class like `random_other_classes` but computes
SSIM on the flattened map with skimage's 7-wide 1-D window and a batch-wide normalisation; we compute the 2-D SSIM
on the token grid (skimage's `structural_similarity` with the window of `ssim_window`), each map normalised by its
own max |s| (Quantus's `normalise_by_max` per map), so a score does not depend on the other images of its batch.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdam_pl.errors import CdamError
from cdam_pl.metrics._base import MeanMetricBase, flat_maps
from cdam_pl.metrics.sensitivity import map_correlation

__all__ = ["RANDOMISATION_SIMILARITIES", "randomised_cascade", "spearman", "ssim", "ssim_window",
           "random_other_classes", "random_logit", "ModelRandomisation", "RandomLogit"]

RANDOMISATION_SIMILARITIES = ("spearman", "ssim")
SSIM_K1, SSIM_K2, SSIM_MAX_WINDOW = 0.01, 0.03, 7  # skimage's constants and default window


def _resettable(module: nn.Module | None) -> list[nn.Module]:
    return [] if module is None else [m for m in module.modules() if hasattr(m, "reset_parameters")]


def _reinitialise(modules: list[nn.Module], seed: int) -> None:
    """Each module's own init (`reset_parameters`) after torch.manual_seed(seed + 1), as Quantus does; inside a
    forked RNG, so the caller's global (and CUDA) random state is untouched."""
    for m in modules:
        cuda = sorted({p.device.index or 0 for p in m.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed + 1)
            m.reset_parameters()


def randomised_cascade(backbone: nn.Module, head: nn.Module, *, blocks: int = 2,
                       seed: int = 0) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """Cascading model randomisation, top down and cumulative (Adebayo et al. 2018): yields (stage, backbone copy,
    head copy) for "head", "head+block-1", ..., "head+block-1+...+block-`blocks`" (block-1 = the last block, with
    the final norm and anything else after the blocks). Each yield is a fresh deep copy of backbone and head
    together (so a timm classifier's head inside its backbone stays shared); the originals are untouched. Every
    module with `reset_parameters` in a stage is re-initialised with its own init after torch.manual_seed(seed + 1)
    (Quantus's MPRT at the same seed; the global RNG is left as it was).
    """
    if head is None or not _resettable(head):
        raise CdamError("randomised_cascade needs a head with layers to re-initialise (modules with "
                        "reset_parameters, e.g. nn.Linear): the first stage re-initialises it")
    model_blocks = list(backbone.model.blocks)
    if not 1 <= int(blocks) <= len(model_blocks):
        raise CdamError(f"randomised_cascade blocks must be in 1..{len(model_blocks)} (the backbone's depth), "
                        f"got {blocks}")
    children = [name for name, _ in backbone.model.named_children()]
    after = children[children.index("blocks") + 1:]  # norm, fc_norm, ...: randomised with the last block

    def stage(b: nn.Module, h: nn.Module, k: int) -> list[nn.Module]:
        """The modules stage k re-initialises in the copies b, h: the head (k = 0) or block -k (k >= 1)."""
        if k == 0:
            return _resettable(h)
        mods = _resettable(b.model.blocks[-k]) + [m for n in after if k == 1 for m in _resettable(getattr(b.model, n))]
        done = {id(m) for m in _resettable(h)}  # a classifier's own head sits after its blocks
        return [m for m in mods if id(m) not in done]

    name = "head"
    for k in range(int(blocks) + 1):
        if k:
            name += f"+block-{k}"
        b, h = copy.deepcopy((backbone, head))
        for j in range(k + 1):
            _reinitialise(stage(b, h, j), seed)
        yield name, b, h


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (1-based, ties share their mean rank, as scipy.stats.rankdata) along the last dim."""
    s = x.sort(-1).values.contiguous()
    less = torch.searchsorted(s, x.contiguous(), right=False)
    less_equal = torch.searchsorted(s, x.contiguous(), right=True)
    return (less + less_equal + 1).double() / 2


def _pair(maps_a: Tensor, maps_b: Tensor, name: str) -> None:
    if not isinstance(maps_a, Tensor) or not isinstance(maps_b, Tensor) or maps_a.shape != maps_b.shape \
            or maps_a.ndim != 3:
        shapes = [tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__ for m in (maps_a, maps_b)]
        raise CdamError(f"{name} needs two sets of maps of one shape [B, gh, gw], got {shapes[0]} and {shapes[1]}")


def spearman(maps_a: Tensor, maps_b: Tensor) -> Tensor:
    """Spearman rank correlation of the token scores of paired maps: [B, gh, gw] x [B, gh, gw] -> [B].

    Pearson correlation of the average ranks (scipy.stats.spearmanr); identical maps give 1, a constant map against
    a different one 0 (scipy: NaN)."""
    _pair(maps_a, maps_b, "spearman")
    ranks = [_ranks(flat_maps(m).double()).view(m.shape) for m in (maps_a, maps_b)]  # [B, gh, gw] each
    return map_correlation(*ranks).float()


def _by_max(m: Tensor) -> Tensor:
    """Each map [B, gh, gw] divided by its largest |s| (an all-zero map stays zero)."""
    top = m.abs().amax((1, 2), keepdim=True)
    return m / torch.where(top > 0, top, torch.ones_like(top))


def ssim_window(gh: int, gw: int) -> int:
    """The SSIM window for a gh x gw grid: the largest odd size <= min(gh, gw), at most skimage's 7 (3 on 4 x 4)."""
    side = min(int(gh), int(gw))
    if side < 3:
        raise CdamError(f"SSIM needs a token grid of at least 3 x 3, got {gh} x {gw}")
    return min(SSIM_MAX_WINDOW, side if side % 2 else side - 1)


def ssim(maps_a: Tensor, maps_b: Tensor, window: int | None = None) -> Tensor:
    """Structural similarity of paired maps on the token grid: [B, gh, gw] x [B, gh, gw] -> [B] in [-1, 1].

    Each map is divided by its largest |s| (an all-zero map stays zero); then skimage's `structural_similarity`
    with a uniform `window` x `window` window (default `ssim_window`), sample covariances, K1 = 0.01, K2 = 0.03,
    data range = max - min over both maps (Quantus's convention), averaged over the windows inside the grid. Two
    identical constant maps give 1.
    """
    _pair(maps_a, maps_b, "ssim")
    gh, gw = maps_a.shape[-2:]
    w = ssim_window(gh, gw) if window is None else int(window)
    if w < 2 or w % 2 == 0 or w > min(gh, gw):
        raise CdamError(f"SSIM window must be odd, >= 3 and fit the {gh} x {gw} grid, got {window}")
    a, b = (_by_max(m.detach().double())[:, None] for m in (maps_a, maps_b))  # [B, 1, gh, gw]
    both = torch.cat([a, b], 1).flatten(1)
    data_range = both.amax(1) - both.amin(1)  # [B]
    c1 = ((SSIM_K1 * data_range) ** 2)[:, None, None, None]
    c2 = ((SSIM_K2 * data_range) ** 2)[:, None, None, None]
    mean = lambda t: F.avg_pool2d(t, w, stride=1)  # noqa: E731  windows inside the grid only
    ua, ub = mean(a), mean(b)
    cov = w * w / (w * w - 1)  # sample covariance
    va, vb, vab = cov * (mean(a * a) - ua * ua), cov * (mean(b * b) - ub * ub), cov * (mean(a * b) - ua * ub)
    s = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return torch.where(data_range > 0, s.mean((1, 2, 3)), torch.ones_like(data_range)).float()


def random_other_classes(targets: Tensor, num_classes: int, seed: int = 0) -> Tensor:
    """For each target, a random other class (seeded): [B] -> [B]. Quantus's RandomLogit draw, without touching
    numpy's global RNG: index i = RandomState(seed).randint(0, C - 1) into the classes other than the target."""
    if int(num_classes) < 2:
        raise CdamError(f"a random other class needs at least 2 classes, got {num_classes}")
    t = targets.reshape(-1).long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise CdamError(f"target class index out of range: there are {num_classes} classes")
    pick = torch.from_numpy(np.random.RandomState(seed).randint(0, int(num_classes) - 1, t.shape[0])).to(t.device)
    return pick + (pick >= t).long()


def random_logit(explain: Callable[[Tensor, Tensor], Tensor], images: Tensor, targets: Tensor, num_classes: int,
                 *, seed: int = 0) -> Tensor:
    """Random-logit test (Sixt et al. 2020): SSIM between the map of the target and the map of a random other class
    (`random_other_classes`, seeded) of the same image: -> [B]; lower = more class-sensitive.

    explain(images [B, 3, H, W], targets [B, 2]) -> maps [B, 2, gh, gw], the registry's method signature: it is
    called once, with each image's target and other class as its two targets, so an explainer that takes many
    targets from one pass (CDAM) runs the images once rather than twice."""
    t = targets.reshape(-1).to(images.device)
    b = images.shape[0]
    if t.shape[0] != b:
        raise CdamError(f"targets must be [B={b}] class indices, got {tuple(targets.shape)}")
    maps = explain(images, torch.stack([t, random_other_classes(t, num_classes, seed)], 1))  # [B, 2, gh, gw]
    if not isinstance(maps, Tensor) or maps.ndim != 4 or tuple(maps.shape[:2]) != (b, 2):
        raise CdamError(f"explain must return maps [B={b}, 2, gh, gw] (the target's, then the other class's), got "
                        f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}")
    return ssim(maps[:, 0], maps[:, 1])


class ModelRandomisation(MeanMetricBase):
    """Mean similarity between the trained model's maps and a randomised model's maps (one Metric per stage of
    `randomised_cascade`): update(maps [B, gh, gw], randomised_maps [B, gh, gw]). Lower = better."""

    higher_is_better = False

    def __init__(self, similarity: str = "spearman", **kwargs):
        if similarity not in RANDOMISATION_SIMILARITIES:
            raise CdamError(f"unknown similarity {similarity!r}; choose one of {', '.join(RANDOMISATION_SIMILARITIES)}")
        super().__init__(**kwargs)
        self.similarity = similarity

    def update(self, maps: Tensor, randomised_maps: Tensor) -> None:
        fn = spearman if self.similarity == "spearman" else ssim
        self.accumulate(fn(maps, randomised_maps))


class RandomLogit(MeanMetricBase):
    """Mean random-logit SSIM (Sixt et al. 2020): update(explain, images [B, 3, H, W], targets [B]) as
    `random_logit` (explain: images, targets [B, 2] -> maps [B, 2, gh, gw]). Lower = more class-sensitive."""

    higher_is_better = False

    def __init__(self, num_classes: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.seed = int(num_classes), int(seed)

    def update(self, explain: Callable[[Tensor, Tensor], Tensor], images: Tensor, targets: Tensor) -> None:
        self.accumulate(random_logit(explain, images, targets, self.num_classes, seed=self.seed))
