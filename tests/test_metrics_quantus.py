"""Every metric Quantus 0.6 implements, against Quantus itself on small random inputs: a depth-2 ViT at 32 px with
patch 8 (a 4 x 4 token grid) and a linear head.

Quantus scores pixels, we score tokens: maps and masks go to Quantus upsampled to pixels by nearest neighbour, where
the two definitions coincide (sums scale by the patch area, the top-K pixels are the top tokens' pixels, rank
correlations of repeated values equal those of the tokens). Quantus's own normalisation and abs are switched off
(normalise=False, abs=False), its perturbation replaces pixels by a blur of the image as ours does, and its curves
are read where ours have the same points. Token removal, which Quantus cannot express, is compared through a model
that drops the tokens of the patches Quantus marks (NaN): Quantus then does the ranking and the stepping.
"""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.v2.functional import gaussian_blur

from cdam_pl.explain.cdam import CDAM
from cdam_pl.metrics import (
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
from tests.conftest import tiny_backbone

quantus = pytest.importorskip("quantus", reason="quantus (the dev extra) is the reference these tests compare with")
from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

PATCH, SIZE, B = 8, 32, 3
GRID = SIZE // PATCH  # 4 x 4 tokens
QUIET = dict(disable_warnings=True, display_progressbar=False)


class Net(nn.Module):
    """Backbone + head as one torch model for Quantus."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


def model(classes=5, seed=0):
    bb = tiny_backbone("p8", img_size=(SIZE, SIZE))
    torch.manual_seed(seed)
    return bb, nn.Linear(bb.embed_dim, classes)


def random_images(n=B, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, SIZE, SIZE, generator=g)


def to_pixels(grids: torch.Tensor) -> np.ndarray:
    """Token grids [B, gh, gw] -> pixel maps [B, 1, H, W], nearest neighbour."""
    return grids.double().repeat_interleave(PATCH, -2).repeat_interleave(PATCH, -1)[:, None].numpy()


def call(metric, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(batch_size=B, **kwargs)


# --- localisation ---------------------------------------------------------------------------------------------------
def test_localisation_equals_quantus_on_upsampled_maps():
    bb, head = model()
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(B, GRID, GRID, generator=g)  # distinct scores: no ties
    masks = torch.rand(B, GRID, GRID, generator=g) > 0.6
    masks[:, 0, 0] = True  # never empty
    tiles = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]])
    x, y = random_images().numpy(), np.array([0, 1, 2])
    common = dict(model=Net(bb, head).eval(), x_batch=x, y_batch=y, a_batch=to_pixels(maps))
    off = dict(normalise=False, abs=False, **QUIET)
    s = to_pixels(masks).astype(float)
    ref = {
        "focus": call(quantus.Focus(**off), custom_batch=[tuple(t) for t in tiles.tolist()], **common),
        "pointing": call(quantus.PointingGame(**off), s_batch=s, **common),
        "rank": call(quantus.RelevanceRankAccuracy(**off), s_batch=s, **common),
        # Arras et al.'s mass accuracy counts positive relevance only; Quantus sums what it is given
        "mass": call(quantus.RelevanceMassAccuracy(**off), s_batch=s,
                     **{**common, "a_batch": to_pixels(maps.clamp_min(0))}),
    }
    ours = {"focus": focus(maps, tiles), "pointing": pointing_game(maps, masks),
            "rank": relevance_rank_accuracy(maps, masks), "mass": relevance_mass_accuracy(maps, masks)}
    for name in ref:
        np.testing.assert_allclose(ours[name].numpy(), np.asarray(ref[name], dtype=float), atol=1e-5, err_msg=name)
    assert 0 < np.mean(ref["pointing"]) < 1 or np.mean(ref["rank"]) not in (0, 1)  # not a degenerate draw


# --- pixel flipping / region perturbation -----------------------------------------------------------------------------
def replace_from(source: np.ndarray):
    """A Quantus batch perturbation: the features at `indices` take the values of `source` [B, F]."""
    def perturb(arr, indices, **kwargs):
        out = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        out[rows, indices] = source[rows, indices]
        return out
    return perturb


class GreyNet(Net):
    """Grey images [B, 1, H, W] repeated to 3 channels."""

    def forward(self, x):
        return super().forward(x.expand(-1, 3, -1, -1))


class TokenDroppingNet(Net):
    """Reference for token removal: patches Quantus marked with NaN are cut from the token sequence after the
    position embedding, image by image, written out here independently of `patch_logits`."""

    def forward(self, x):
        bb, out = self.backbone, []
        for img in x:
            gone = img.isnan().any(0).view(GRID, PATCH, GRID, PATCH).any(3).any(1).flatten()  # [N]
            tok = bb.embed(torch.nan_to_num(img)[None])
            p = bb.num_prefix_tokens
            t = tok[:, [i for i in range(tok.shape[1]) if i < p or not gone[i - p]]]
            for blk in bb.model.blocks:
                t = blk(t)
            out.append(self.head(bb.model.norm(t)[:, 0]))
        return torch.cat(out)


def test_pixel_deletion_equals_quantus_pixel_flipping_and_region_perturbation():
    bb, head = model()
    images = random_images()
    targets = torch.tensor([4, 0, 2])
    maps = torch.randn(B, GRID, GRID, generator=torch.Generator().manual_seed(2))
    n = GRID * GRID
    ours = perturbation_curves(bb, head, images, targets, maps, kind="deletion", mode="pixel", steps=n).numpy()
    blurred = gaussian_blur(images, kernel_size=[25, 25], sigma=[PATCH / 2] * 2).reshape(B, -1).numpy()  # sigma 4
    common = dict(model=Net(bb, head).eval(), x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=to_pixels(maps))
    # PixelFlipping needs features_in_step to divide H * W: grey images (a model that repeats the channel)
    grey = images[:, :1]
    flat = perturbation_curves(bb, head, grey.expand(-1, 3, -1, -1), targets, maps, mode="pixel", steps=n).numpy()
    flipping = quantus.PixelFlipping(features_in_step=PATCH * PATCH, normalise=False, abs=False,
                                     perturb_func=replace_from(blurred[:, :SIZE * SIZE]), **QUIET)
    curves = np.asarray(call(flipping, **{**common, "model": GreyNet(bb, head).eval(), "x_batch": grey.numpy()}))
    np.testing.assert_allclose(flat[:, 1:], curves, atol=1e-5)  # [B, N]: after each token, without the intact image
    region = quantus.RegionPerturbation(patch_size=PATCH, regions_evaluation=n, order="morf", normalise=False,
                                        abs=False, perturb_func=replace_from(blurred), **QUIET)
    drops = np.asarray(call(region, **common))  # [B, N]: p(x) - p(x perturbed)
    np.testing.assert_allclose(ours[:, :1] - ours[:, 1:], drops, atol=1e-5)


def test_token_deletion_equals_quantus_region_perturbation_with_token_removal():
    bb, head = model()
    images = random_images(seed=3)
    targets = torch.tensor([1, 1, 3])
    maps = torch.randn(B, GRID, GRID, generator=torch.Generator().manual_seed(4))
    n = GRID * GRID
    ours = perturbation_curves(bb, head, images, targets, maps, kind="deletion", mode="token", steps=n).numpy()
    nan = np.full((B, 3 * SIZE * SIZE), np.nan)
    region = quantus.RegionPerturbation(patch_size=PATCH, regions_evaluation=n, order="morf", normalise=False,
                                        abs=False, perturb_func=replace_from(nan), **QUIET)
    drops = np.asarray(call(region, model=TokenDroppingNet(bb, head).eval(), x_batch=images.numpy(),
                            y_batch=targets.numpy(), a_batch=to_pixels(maps)))  # [B, N]
    np.testing.assert_allclose(ours[:, :1] - ours[:, 1:], drops, atol=1e-5)


# --- ROAD -------------------------------------------------------------------------------------------------------------
def test_noisy_linear_imputation_equals_quantus_at_noise_0():
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 13, 17, generator=g, dtype=torch.float64)
    removed = torch.rand(2, 13, 17, generator=g) < torch.tensor([0.3, 0.8])[:, None, None]
    removed[0, :3, :3] = removed[1, -1, :] = True  # a corner and a whole border row
    ours = noisy_linear_imputation(images, removed, noise=0.0)
    for i in range(2):
        ref = quantus_imputation(images[i].numpy(), removed[i].flatten().nonzero()[:, 0].numpy(), noise=0.0)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-10)


class RecordingGreyNet(GreyNet):
    """Quantus's ROAD ranks and imputes the pixels of single-channel inputs only: grey images, repeated to 3
    channels; records the softmax of every batch Quantus predicts."""

    def __init__(self, backbone, head):
        super().__init__(backbone, head)
        self.seen = []

    def forward(self, x):
        logits = super().forward(x)
        self.seen.append(logits.softmax(-1).detach())
        return logits


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_equals_quantus_road(order):
    bb, head = model(classes=2)  # two classes: Quantus's accuracy (argmax = target) is p > 1/2
    grey = random_images(channels=1, seed=6)
    targets = torch.tensor([0, 1, 1])
    maps = torch.randn(B, GRID, GRID, generator=torch.Generator().manual_seed(7))
    fractions = [k / 16 for k in (2, 5, 8, 11, 14)]  # whole tokens: ties inside a token cannot matter
    ours = road_curves(bb, head, grey.expand(-1, 3, -1, -1), targets, maps, order=order, fractions=fractions,
                       noise=0.0)  # [B, S]
    net = RecordingGreyNet(bb, head).eval()
    road = quantus.ROAD(percentages=[100 * f for f in fractions], noise=0.0, normalise=False, abs=False, **QUIET)
    scores = call(road, model=net, x_batch=grey.numpy(), y_batch=targets.numpy(),
                  a_batch=to_pixels(maps if order == "morf" else -maps))  # Quantus removes the top pixels only
    probs = torch.stack([p[torch.arange(B), targets] for p in net.seen], 1)  # [B, S]: what Quantus's model saw
    np.testing.assert_allclose(ours.numpy(), probs.numpy(), atol=1e-5)
    np.testing.assert_allclose((ours > 0.5).double().mean(0).numpy(), [scores[100 * f] for f in fractions])


# --- randomisation ----------------------------------------------------------------------------------------------------
def cdam_pixels(model, inputs, targets, **kwargs):
    """Quantus explain_func: CDAM of the model's head, upsampled to pixels."""
    maps = CDAM(model.backbone, model.head).class_maps(torch.as_tensor(inputs),
                                                         torch.as_tensor(targets)[:, None])[:, 0]
    return to_pixels(maps.detach())


def test_model_randomisation_equals_quantus_mprt_at_block_boundaries():
    bb, head = model()
    images, targets = random_images(seed=8), torch.tensor([0, 3, 4])
    seed = 11
    mprt = quantus.MPRT(seed=seed, layer_order="top_down", normalise=False, abs=False, **QUIET)
    ref = call(mprt, model=Net(bb, head).eval(), x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=None,
               explain_func=cdam_pixels)
    original = CDAM(bb, head).class_maps(images, targets[:, None])[:, 0]
    quantus_stage = {"head": "head", "head+block-1": "backbone.model.blocks.1.norm1",
                     "head+block-1+block-2": "backbone.model.blocks.0.norm1"}  # the last module of each stage
    for name, b, h in randomised_cascade(bb, head, blocks=2, seed=seed):
        randomised = CDAM(b, h).class_maps(images, targets[:, None])[:, 0]
        np.testing.assert_allclose(spearman(original, randomised).numpy(), ref[quantus_stage[name]], atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(ref["original"], 1.0, atol=1e-6)


def grid_ssim(a, b, batched=True, **kwargs):
    """skimage's 2-D SSIM on the token grid (window 3), each map divided by its max |s|, data range over both."""
    out = []
    for x, y in zip(a, b):
        x, y = (m.reshape(SIZE, SIZE)[::PATCH, ::PATCH] for m in (x, y))
        x, y = x / np.abs(x).max(), y / np.abs(y).max()
        rng = max(x.max(), y.max()) - min(x.min(), y.min())
        out.append(structural_similarity(x, y, win_size=3, data_range=rng))
    return out


def test_random_logit_equals_quantus_with_ssim_on_the_token_grid():
    bb, head = model(classes=6)
    images, targets = random_images(seed=9), torch.tensor([5, 0, 2])
    seed = 13
    metric = quantus.RandomLogit(num_classes=6, seed=seed, similarity_func=grid_ssim, normalise=False, abs=False,
                                 **QUIET)
    ref = call(metric, model=Net(bb, head).eval(), x_batch=images.numpy(), y_batch=targets.numpy(), a_batch=None,
               explain_func=cdam_pixels)
    cdam = CDAM(bb, head)
    ours = random_logit(cdam.class_maps, images, targets, 6, seed=seed)
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref, dtype=float), atol=1e-5)
