"""From maps to per-image scores: which metric runs on which set, and how each metric is called.

Every function returns {metric name: scores [n]} (float64 numpy, NaN where a score is undefined), one score per image,
so that results.md, the bootstrap and scores.csv all read the same numbers. The metrics themselves live in
`cdam_pl.metrics`; this module only decides their inputs.

  map metrics (every image a method has a map for):
    compactness_v1, compactness_symmetric   the map of target 0 (the top-1 class; composites: the left item)
    class_sensitivity                       Pearson correlation of the maps of targets 0 and 1 (lower = better)
    pointing_game                           any-pixel token masks; relevance_mass, relevance_rank: half-pixel masks;
                                            per localised target, averaged over the targets of the image
    focus                                   mosaics: the target class's map against its two tiles
  forward metrics (the faithfulness subset of single items, target = the top-1 class):
    deletion_token, insertion_token, deletion_pixel, insertion_pixel   AUC of the target's softmax probability
    road_morf, road_lerf                    mean target probability over the ROAD fractions
    road_fidelity                           road_lerf - road_morf: the area between the least- and the most-relevant-
                                            first curve, the paper's fidelity (LIF - MIF) with ROAD's imputation
    random_logit                            SSIM of the target's map and a random other class's map (lower = better)
  randomisation (same subset): rand_<stage>_spearman, rand_<stage>_ssim between the map of the trained model and of
    the model randomised down to <stage> (lower = the map depends on the weights, as it should)
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from cdam_pl.evaluate.data import EvalSet
from cdam_pl.metrics.compactness import compactness_symmetric, compactness_v1
from cdam_pl.metrics.deletion import DELETION_MODES
from cdam_pl.metrics.faithfulness import (
    PERTURBATION_KINDS,
    ROAD_FRACTIONS,
    ROAD_ORDERS,
    curve_auc,
    perturbation_curves,
    road_curves,
)
from cdam_pl.metrics.localisation import focus, pointing_game, relevance_mass_accuracy, relevance_rank_accuracy
from cdam_pl.metrics.sanity import random_other_classes, randomised_cascade, spearman, ssim
from cdam_pl.metrics.sensitivity import map_correlation, pearson_from_sums

# metric -> True when higher is better (the tables' arrows; the paired differences read CDAM minus the other method)
HIGHER_IS_BETTER = {
    "compactness_v1": True, "compactness_symmetric": True, "class_sensitivity": False, "focus": True,
    "pointing_game": True, "relevance_mass": True, "relevance_rank": True,
    "deletion_token": False, "insertion_token": True, "deletion_pixel": False, "insertion_pixel": True,
    "road_morf": False, "road_lerf": True, "road_fidelity": True, "random_logit": False,
}
PERTURBATIONS = tuple((kind, mode) for mode in DELETION_MODES for kind in PERTURBATION_KINDS)

Explainer = Callable[..., Tensor]  # (backbone, head, images, targets [B, K]) -> maps [B, K, gh, gw]


def higher_is_better(metric: str) -> bool:
    """Randomisation scores (rand_*): lower = the map changed with the weights."""
    return HIGHER_IS_BETTER.get(metric, False)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def map_scores(s: EvalSet, idx: Tensor, maps: Tensor) -> dict[str, np.ndarray]:
    """Map-only metrics of the images `idx` of set `s`, from their maps [n, K, gh, gw]."""
    out = {"compactness_v1": _np(compactness_v1(maps[:, 0])),
           "compactness_symmetric": _np(compactness_symmetric(maps[:, 0]))}
    if maps.shape[1] >= 2:
        out["class_sensitivity"] = _np(map_correlation(maps[:, 0], maps[:, 1]))
    if s.tiles is not None:
        out["focus"] = _np(focus(maps[:, 0], s.tiles[idx]))
    if s.masks is not None:
        localised = s.extra.get("localised_targets", (0,))
        per = {"pointing_game": [], "relevance_mass": [], "relevance_rank": []}
        for k in localised:
            per["pointing_game"].append(_np(pointing_game(maps[:, k], s.masks_any[idx, k])))
            per["relevance_mass"].append(_np(relevance_mass_accuracy(maps[:, k], s.masks[idx, k])))
            per["relevance_rank"].append(_np(relevance_rank_accuracy(maps[:, k], s.masks[idx, k])))
        for name, rows in per.items():
            out[name] = _nanmean_rows(np.stack(rows))
    return out


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN where every entry is NaN (no warning)."""
    ok = ~np.isnan(x)
    total = np.where(ok, x, 0.0).sum(0)
    count = ok.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def forward_scores(model, images: Tensor, target: Tensor, maps: Tensor, *, steps: int, seed: int,
                   batch_size: int, explain: Explainer) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Perturbation, ROAD and Random Logit scores of maps [n, gh, gw] for `target` [n] on images [n, 3, H, W]
    (on the model's device); -> (scores, seconds per image of each metric group)."""
    bb, head = model.backbone, model.head
    n = images.shape[0]
    out: dict[str, list[np.ndarray]] = {}
    seconds: dict[str, float] = {}
    dev = images.device

    def timed(group: str, fn: Callable[[slice], dict[str, Tensor]]) -> None:
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            sl = slice(i, i + batch_size)
            for name, v in fn(sl).items():
                out.setdefault(name, []).append(_np(v))
        _sync(dev)
        seconds[group] = (time.perf_counter() - t0) / max(n, 1)

    for kind, mode in PERTURBATIONS:
        timed(f"{kind}_{mode}", lambda sl, kind=kind, mode=mode: {f"{kind}_{mode}": curve_auc(perturbation_curves(
            bb, head, images[sl], target[sl], maps[sl].to(dev), kind=kind, mode=mode, steps=steps, seed=seed))})
    for order in ROAD_ORDERS:
        timed(f"road_{order}", lambda sl, order=order: {f"road_{order}": road_curves(
            bb, head, images[sl], target[sl], maps[sl].to(dev), order=order, fractions=ROAD_FRACTIONS,
            seed=seed).mean(1)})
    # Random Logit as `random_logit` defines it, with the target's map already known: only the other class is
    # explained. The other classes are drawn once for all n images (not per batch, which would repeat one draw).
    other = random_other_classes(target, _num_classes(model, images), seed)
    timed("random_logit", lambda sl: {"random_logit": ssim(maps[sl].to(dev), explain(
        bb, head, images[sl], other[sl, None])[:, 0])})
    return {k: np.concatenate(v) for k, v in out.items()}, seconds


def derived_scores(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The forward scores with the ones computed from others added: road_fidelity = road_lerf - road_morf per image
    (the fractions are evenly spaced, so the difference of the two curves' means is the area between them, in units
    of the fraction range)."""
    out = dict(scores)
    if "road_lerf" in scores and "road_morf" in scores:
        out["road_fidelity"] = scores["road_lerf"] - scores["road_morf"]
    return out


def randomisation_scores(model, images: Tensor, target: Tensor, maps: Tensor, *, blocks: int, seed: int,
                         batch_size: int, explainers: dict[str, Explainer]
                         ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Cascading model randomisation: for every stage (head, then the last blocks, top down), each method's map of
    `target` [n] on the randomised model against its map on the trained one (`maps[name]` [n, gh, gw]).
    -> ({method: {metric: [n]}}, seconds per image of each method, all stages together)."""
    n = images.shape[0]
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in explainers}
    seconds = dict.fromkeys(explainers, 0.0)
    for stage, bb, head in randomised_cascade(model.backbone, model.head, blocks=blocks, seed=seed):
        for name, explain in explainers.items():
            t0 = time.perf_counter()
            rand = torch.cat([explain(bb, head, images[i:i + batch_size], target[i:i + batch_size, None])[:, 0].cpu()
                              for i in range(0, n, batch_size)])  # [n, gh, gw]
            _sync(images.device)
            seconds[name] += (time.perf_counter() - t0) / max(n, 1)
            out[name][f"rand_{stage}_spearman"] = _np(spearman(maps[name], rand))
            out[name][f"rand_{stage}_ssim"] = _np(ssim(maps[name], rand))
    return out, seconds


def _num_classes(model, images: Tensor) -> int:
    with torch.no_grad():
        return int(model.head(model.backbone(images[:1])).shape[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pooled_sums(a: Tensor, b: Tensor) -> np.ndarray:
    """Per image of maps a, b [n, gh, gw]: its token count and sums of a, b, a^2, b^2, ab (float64) [n, 6], what
    the pooled correlation of any set of those images is computed from (`pooled_from_sums`)."""
    a, b = a.detach().reshape(a.shape[0], -1).double(), b.detach().reshape(b.shape[0], -1).double()
    count = torch.full((a.shape[0],), float(a.shape[1]), dtype=torch.float64)
    return torch.stack([count, a.sum(1), b.sum(1), (a * a).sum(1), (b * b).sum(1), (a * b).sum(1)], 1).numpy()


def pooled_from_sums(sums: np.ndarray) -> np.ndarray:
    """The pooled Pearson correlation from `pooled_sums` added up over images [..., 6] -> [...] (NaN: constant)."""
    return pearson_from_sums(*torch.from_numpy(np.asarray(sums, dtype=np.float64)).unbind(-1)).numpy()
