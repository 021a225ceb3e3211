"""Explanation-quality metrics: seconds per image, ours against Quantus 0.6 computing the same metric on the same
inputs in the same process.

    python bench/metrics_speed.py [--quick] [--device cpu|cuda]

Models (random weights: speed does not depend on their values), a 10-class linear head, random images and maps:
  - ViT-S/16 at 224 px = 196 tokens, the paper's size: compute-bound (full run only);
  - a depth-2, 64-d ViT/16 at 64 px = 16 tokens, the size the tests use: bound by per-call overhead.
Quantus is configured as in tests/test_metrics_quantus.py so that both compute the same numbers (maps upsampled to
pixels by nearest neighbour, normalise=False, abs=False, blur replacement, whole tokens per deletion step, grey
images for PixelFlipping and ROAD, the only inputs on which Quantus takes token-sized steps and imputes correctly);
each pair's largest difference is printed. MPRT: Quantus randomises and explains one module at a time, so the three
stages we compute (head, + last block, + the block before) are read from its full run; explanations are CDAM on
both sides. Goal: at least 10x faster. Where the model's forwards dominate (deletion curves, ROAD and random logit
on ViT-S) batching cannot reach it: a "floor" row times the forwards alone that any implementation of the metric
must run (no-grad forwards of backbone + head on the same number of images, in one batch), against the same Quantus
time: the lowest ratio an exact implementation can reach on this machine.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, cpu_threads, random_vit  # noqa: E402
from bench.common import main as bench_main  # noqa: E402
from cdam_pl.explain.cdam import CDAM  # noqa: E402
from cdam_pl.metrics import (  # noqa: E402
    focus,
    noisy_linear_imputation,
    perturbation_curves,
    pointing_game,
    random_logit,
    randomised_cascade,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road_curves,
    spearman,
)

GOAL = "<= 0.1x (10x faster)"
COMPUTE_BOUND = "(same forwards on both sides: compute-bound)"
LOCALISATION_MAPS = (64, 16)  # (full, quick): cheap on both sides, so a batch of maps, timed best of 10
MODELS = {  # label: (timm name, size, overrides, images (full, quick), full run only)
    "ViT-S/16 @224 px": ("vit_small_patch16_224", 224, {}, (2, 0), True),
    "depth-2 ViT/16 @64 px": ("vit_small_patch16_224", 64, dict(depth=2, embed_dim=64, num_heads=4), (4, 2), False),
}
STEPS = {"ViT-S/16 @224 px": 49, "depth-2 ViT/16 @64 px": 16}  # deletion steps: 4 tokens a step, 1 token a step
FRACTIONS = tuple(k / 16 for k in (1, 3, 5, 7, 9, 11, 13, 15))  # ROAD: whole tokens of a 4 x 4 grid and of 14 x 14


class Net(nn.Module):
    """Backbone + head as one torch model for Quantus; `grey`: single-channel inputs repeated to 3 channels; keeps
    the softmax of every batch it predicts in `seen`."""

    def __init__(self, backbone, head, grey=False):
        super().__init__()
        self.backbone, self.head, self.grey, self.seen = backbone, head, grey, []

    def forward(self, x):
        logits = self.head(self.backbone(x.expand(-1, 3, -1, -1) if self.grey else x))
        self.seen.append(logits.detach().softmax(-1))
        return logits


def timed(fn, reps: int, device: str):
    """(first result, best-of-`reps` wall seconds)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out, best = None, float("inf")
    for i in range(reps):
        t0 = time.perf_counter()
        res = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        out = res if i == 0 else out
    return out, best


def quantus_call(metric, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(**kwargs)


def cdam_explain(model, inputs, targets, **kwargs):
    """Quantus explain_func: CDAM of the model's head, upsampled to pixels."""
    t = torch.as_tensor(targets)[:, None]
    maps = CDAM(model.backbone, model.head).class_maps(torch.as_tensor(inputs), t)[:, 0]
    return pixels(maps.detach(), model.backbone.patch_size)


def pixels(maps: torch.Tensor, patch: int) -> np.ndarray:
    return maps.float().repeat_interleave(patch, -2).repeat_interleave(patch, -1)[:, None].cpu().numpy()


def replace_from(source: np.ndarray):
    def perturb(arr, indices, **kwargs):
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = source[rows, indices]
        return out
    return perturb


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    import quantus
    from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation
    from torchvision.transforms.v2.functional import gaussian_blur

    cpu_threads(device)
    quiet = dict(disable_warnings=True, display_progressbar=False)
    off = dict(normalise=False, abs=False, **quiet)
    rows: list[Row] = []
    for label, (name, size, overrides, counts, full_only) in MODELS.items():
        if quick and full_only:
            continue
        b = counts[1] if quick else counts[0]
        heavy = size >= 224
        rep = 1 if heavy or quick else 3
        g = torch.Generator().manual_seed(0)
        backbone = random_vit(name, size, device, **overrides)
        head = nn.Linear(backbone.embed_dim, 10).to(device).eval()
        patch = backbone.patch_size
        grid = size // patch
        n = grid * grid
        images = torch.randn(b, 3, size, size, generator=g).to(device)
        targets = torch.randint(0, 10, (b,), generator=g).to(device)
        maps = torch.randn(b, grid, grid, generator=g).to(device)
        x, y, a = images.cpu().numpy(), targets.cpu().numpy(), pixels(maps, patch)
        net = Net(backbone, head).eval()
        # warm-up (thread pools, kernels, allocator), paid here rather than by whichever side runs first
        perturbation_curves(backbone, head, images[:1], targets[:1], maps[:1], steps=2)
        CDAM(backbone, head).class_maps(images[:1], targets[:1, None])

        def pair(metric, baseline, ours_fn, quantus_fn, goal=GOAL, compare=None, reps=rep, per=b):
            """Time both (seconds per image), print their largest difference, add the row."""
            ours_out, t_ours = timed(ours_fn, reps, device)
            ref_out, t_ref = timed(quantus_fn, reps, device)
            diff = compare(ours_out, ref_out) if compare else float(
                np.nanmax(np.abs(ours_out.cpu().numpy() - np.asarray(ref_out, dtype=float))))
            print(f"{label}, {metric}: ours {t_ours / per:.4f} s/image, Quantus {t_ref / per:.4f} s/image, "
                  f"max |ours - Quantus| = {diff:.1e}", flush=True)
            rows.append(Row("metrics_speed", f"{metric}, {label}, {per} map(s), per map", t_ours / per,
                            f"Quantus {baseline}, same inputs", t_ref / per, goal))
            return t_ref / per

        def floor(metric, baseline, t_ref, n_images, what, per=b):
            """The no-grad forwards of n_images images alone (per map), against Quantus's time per map."""
            x_all = torch.randn(n_images, 3, size, size, generator=g).to(device)

            def forwards():
                with torch.no_grad():
                    return head(backbone(x_all))

            forwards()
            _, t = timed(forwards, rep, device)
            rows.append(Row("metrics_speed", f"floor of {metric}, {label}: {what}, per map", t / per,
                            f"Quantus {baseline}, same inputs", t_ref,
                            "(lowest ratio an exact implementation can reach)"))

        m = LOCALISATION_MAPS[1] if quick else LOCALISATION_MAPS[0]
        lm = torch.randn(m, grid, grid, generator=g).to(device)
        masks = torch.rand(m, grid, grid, generator=g).to(device) > 0.5
        masks[:, 0, 0] = True
        tiles = (torch.rand(m, 4, generator=g) > 0.5).to(device)
        loc = dict(model=net, x_batch=torch.randn(m, 3, size, size, generator=g).numpy(), y_batch=np.zeros(m, int),
                   a_batch=pixels(lm, patch), s_batch=pixels(masks.double(), patch), batch_size=m)
        cheap = dict(reps=10, per=m)
        pair("Focus", "Focus", lambda: focus(lm, tiles),
             lambda: quantus_call(quantus.Focus(**off), **{**loc, "s_batch": None},
                                  custom_batch=[tuple(t) for t in tiles.int().tolist()]), **cheap)
        pair("pointing game", "PointingGame", lambda: pointing_game(lm, masks),
             lambda: quantus_call(quantus.PointingGame(**off), **loc), **cheap)
        pair("relevance mass accuracy", "RelevanceMassAccuracy", lambda: relevance_mass_accuracy(lm, masks),
             lambda: quantus_call(quantus.RelevanceMassAccuracy(**off), **{**loc, "a_batch": pixels(lm.clamp_min(0),
                                                                                                      patch)}), **cheap)
        pair("relevance rank accuracy", "RelevanceRankAccuracy", lambda: relevance_rank_accuracy(lm, masks),
             lambda: quantus_call(quantus.RelevanceRankAccuracy(**off), **loc), **cheap)

        # deletion, pixel mode, whole tokens per step (Quantus: PixelFlipping on grey images, where its step may be
        # any multiple of patch^2 dividing H * W; its curve starts after the first step)
        grey = images[:, :1]
        grey_net = Net(backbone, head, grey=True).eval()
        steps = STEPS[label]
        sigma = patch / 2
        k = 2 * int(np.ceil(3 * sigma)) + 1
        blurred = gaussian_blur(grey, kernel_size=[k, k], sigma=[sigma, sigma]).reshape(b, -1).cpu().numpy()
        flipping = quantus.PixelFlipping(features_in_step=n // steps * patch * patch,
                                         perturb_func=replace_from(blurred), **off)
        t_ref = pair(f"deletion curve, pixels, {steps} steps", "PixelFlipping",
             lambda: perturbation_curves(backbone, head, grey.expand(-1, 3, -1, -1), targets, maps, mode="pixel",
                                         steps=steps),
             lambda: quantus_call(flipping, model=grey_net, x_batch=grey.cpu().numpy(), y_batch=y, a_batch=a,
                                  batch_size=b),
             goal=GOAL + (" " + COMPUTE_BOUND if heavy else ""),
             compare=lambda o, r: float(np.abs(o[:, 1:].cpu().numpy() - np.asarray(r)).max()))
        floor(f"deletion curve, pixels, {steps} steps", "PixelFlipping", t_ref, b * steps,
              f"{steps} forwards per map (one per step)")

        # ROAD, MoRF, 8 fractions (Quantus: grey images; the probabilities its model saw against ours)
        road = quantus.ROAD(percentages=[100 * f for f in FRACTIONS], noise=0.0, **off)

        def road_probs(_):  # what Quantus's model saw: the target's probability after each fraction, [B, S]
            return np.stack([p[torch.arange(b), targets].cpu().numpy() for p in grey_net.seen[-len(FRACTIONS):]], 1)

        t_ref = pair(f"ROAD, {len(FRACTIONS)} fractions", "ROAD",
             lambda: road_curves(backbone, head, grey.expand(-1, 3, -1, -1), targets, maps, fractions=FRACTIONS,
                                 noise=0.0),
             lambda: quantus_call(road, model=grey_net, x_batch=grey.cpu().numpy(), y_batch=y, a_batch=a,
                                  batch_size=b),
             compare=lambda o, r: float(np.abs(o.cpu().numpy() - road_probs(r)).max()))
        floor(f"ROAD, {len(FRACTIONS)} fractions", "ROAD", t_ref, b * len(FRACTIONS),
              f"{len(FRACTIONS)} forwards per map (one per fraction), imputation not counted")
        removed = torch.zeros(len(FRACTIONS), size * size, dtype=torch.bool)
        order = torch.argsort(torch.from_numpy(a[0].ravel()), descending=True)
        for i, f in enumerate(FRACTIONS):
            removed[i, order[:round(f * size * size)]] = True
        one = images[:1].cpu().double()
        pair(f"ROAD imputation alone, {len(FRACTIONS)} fractions x 3 channels", "noisy_linear_imputation",
             lambda: noisy_linear_imputation(one.expand(len(FRACTIONS), -1, -1, -1), removed.view(-1, size, size),
                                             noise=0.0),
             lambda: np.stack([quantus_imputation(one[0].numpy(), r.nonzero()[:, 0].numpy(), noise=0.0)
                               for r in removed]),
             compare=lambda o, r: float(np.abs(o.numpy() - r).max()), reps=1, per=1)

        # model randomisation: our 3 cascade stages against Quantus's MPRT (every module), Spearman, CDAM
        nm = 1 if heavy else b  # Quantus explains every one of ViT-S's 76 modules: one image
        im, tm = images[:nm], targets[:nm]

        def ours_mprt():
            orig = CDAM(backbone, head).class_maps(im, tm[:, None])[:, 0]
            return torch.stack([spearman(orig, CDAM(bb, h).class_maps(im, tm[:, None])[:, 0])
                                for _, bb, h in randomised_cascade(backbone, head, blocks=2, seed=0)], 1)

        stage_names = ["head", f"backbone.model.blocks.{len(backbone.model.blocks) - 1}.norm1",
                       f"backbone.model.blocks.{len(backbone.model.blocks) - 2}.norm1"]
        mprt = quantus.MPRT(seed=0, layer_order="top_down", **off)
        pair("model randomisation, 3 stages, Spearman", "MPRT (every module)", ours_mprt,
             lambda: quantus_call(mprt, model=net, x_batch=x[:nm], y_batch=y[:nm], a_batch=None,
                                  explain_func=cdam_explain, batch_size=nm),
             compare=lambda o, r: float(np.abs(o.cpu().numpy() - np.stack([r[s] for s in stage_names], 1)).max()),
             per=nm)

        # random logit: SSIM between the target's map and a random other class's map
        cdam = CDAM(backbone, head)
        rl = quantus.RandomLogit(num_classes=10, seed=0, similarity_func=token_ssim(grid, patch), **off)
        t_ref = pair("random logit, SSIM", "RandomLogit",
             lambda: random_logit(cdam.class_maps, images, targets, 10, seed=0),
             lambda: quantus_call(rl, model=net, x_batch=x, y_batch=y, a_batch=None, explain_func=cdam_explain,
                                  batch_size=b),
             goal=GOAL + (" " + COMPUTE_BOUND if heavy else ""))
        floor("random logit, SSIM", "RandomLogit", t_ref, b,
              "one forward per image (both maps need its activations; CDAM takes both classes from one pass)")
    return rows


def token_ssim(grid: int, patch: int):
    """Quantus similarity_func: skimage's SSIM on the token grid, each map divided by its max |s| (ours)."""
    from skimage.metrics import structural_similarity

    win = min(7, grid if grid % 2 else grid - 1)

    def similarity(a, b, batched=True, **kwargs):
        out = []
        for u, v in zip(a, b):
            u, v = (m.reshape(grid * patch, grid * patch)[::patch, ::patch] for m in (u, v))
            u, v = u / np.abs(u).max(), v / np.abs(v).max()
            out.append(structural_similarity(u, v, win_size=win, data_range=max(u.max(), v.max()) - min(u.min(),
                                                                                                     v.min())))
        return out
    return similarity


if __name__ == "__main__":
    bench_main(run, __doc__)
