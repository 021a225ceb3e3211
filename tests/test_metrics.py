"""Explanation-quality metrics on hand-made maps and curves with answers worked out by hand, deletion and
insertion curves and ROAD against explicit perturbation on a tiny ViT, the sanity checks against scipy / skimage,
and state merging (what DDP sync does) against one metric over all data. Comparisons with Quantus:
tests/test_metrics_quantus.py."""
import copy

import numpy as np
import pytest
import scipy.stats
import torch
from skimage.metrics import structural_similarity
from torch import nn

from cdam_pl.errors import CdamError
from cdam_pl.explain.cdam import CDAM
from cdam_pl.metrics import (
    ROAD,
    ClassSensitivity,
    CompactnessSymmetric,
    CompactnessV1,
    DeletionAUC,
    DeletionFidelity,
    Focus,
    InsertionAUC,
    MaskedEvidenceShare,
    ModelRandomisation,
    PointingGame,
    PooledCorrelation,
    RandomLogit,
    RelevanceMassAccuracy,
    RelevanceRankAccuracy,
    compactness_symmetric,
    compactness_v1,
    curve_auc,
    deletion_curves,
    deletion_order,
    faithfulness,
    fidelity_from_curves,
    focus,
    gaussian_blur,
    noisy_linear_imputation,
    perturbation_curves,
    pointing_game,
    pooled_correlation,
    random_logit,
    random_other_classes,
    randomised_cascade,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road_curves,
    spearman,
    ssim,
    ssim_window,
)
from tests.conftest import tiny_backbone

# (map, v1, symmetric) worked out by hand with rel = 0.05
COMPACTNESS_CASES = [
    ([[0.0, 0.0], [0.0, 1.0]], 0.75, 0.75),  # unsigned: the rules agree
    ([[1.0, -1.0], [0.04, 0.06]], 0.25, 0.25),  # 0.04 only; the sign of -1 does not matter
    ([[0.1, -2.0], [-0.004, 0.0]], 0.5, 0.75),  # signed max 0.1: 0.005 vs max|s| 2: 0.1 (and 0.1 <= 0.1 counts)
    ([[1.0, 0.05], [0.0, 0.0]], 0.5, 0.75),  # on the threshold: v1 is strict, symmetric is not
    ([[-1.0, -2.0], [-3.0, 0.0]], 0.0, 0.25),  # max(s) <= 0: v1 scores 0
    ([[0.0, 0.0], [0.0, 0.0]], 0.0, 1.0),  # all zero: v1 0 (max <= 0), symmetric 1 (nothing stands out)
]


def test_compactness_rules_hand_made_maps():
    maps = torch.tensor([c[0] for c in COMPACTNESS_CASES])
    v1, sym = [c[1] for c in COMPACTNESS_CASES], [c[2] for c in COMPACTNESS_CASES]
    assert compactness_v1(maps).tolist() == pytest.approx(v1)
    assert compactness_symmetric(maps).tolist() == pytest.approx(sym)
    assert compactness_v1(maps.view(2, 3, 2, 2)).shape == (2, 3)  # any leading shape
    m = CompactnessV1()
    m.update(maps[:2])
    m.update(maps[2:])
    assert m.compute().item() == pytest.approx(np.mean(v1))
    assert CompactnessSymmetric()(maps).item() == pytest.approx(np.mean(sym))
    assert CompactnessSymmetric(rel=0.5)(maps[1:2]).item() == pytest.approx(0.5)  # 0.04 and 0.06 <= 0.5
    assert CompactnessV1(rel=0.5)(maps[2:3]).item() == pytest.approx(0.5)  # |s| < 0.05: -0.004 and 0, not 0.1
    with pytest.raises(CdamError, match="rel must be in"):
        CompactnessV1(rel=5)
    with pytest.raises(CdamError, match="rel must be in"):
        compactness_symmetric(maps, rel=0)


def test_class_sensitivity_hand_made_correlations():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 3.0], [2.0, 4.0]])  # centred: a=(-1.5,-.5,.5,1.5), b=(-1.5,.5,-.5,1.5): r = 4/5
    maps = torch.stack([torch.stack([a, b]), torch.stack([a, a]), torch.stack([a, -a])])  # [3, 2, 2, 2]
    m = ClassSensitivity()
    m.update(maps[:1])
    assert m.compute().item() == pytest.approx(0.8)
    m.update(maps[1:])
    assert m.compute().item() == pytest.approx((0.8 + 1.0 - 1.0) / 3)
    const = torch.ones(2, 2)
    same = ClassSensitivity()(torch.stack([const, const])[None])  # identical constant maps (e.g. AM): 1
    other = ClassSensitivity()(torch.stack([const, a])[None])  # a constant map has no linear relation: 0
    assert same.item() == 1.0 and other.item() == 0.0
    with pytest.raises(CdamError, match="K>=2"):
        ClassSensitivity()(a[None, None])


def test_pooled_correlation_pools_tokens_of_all_images():
    a = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]]).view(2, 2, 2)
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]]).view(2, 2, 2)
    # per image both correlations are 1; pooled: cov 10, variances 210 and 10 (sums of squared deviations)
    assert pooled_correlation(a, b).item() == pytest.approx(10 / np.sqrt(210 * 10))
    m = PooledCorrelation()
    m.update(a[:1], b[:1])
    m.update(a[1:], b[1:])
    assert m.compute().item() == pytest.approx(10 / np.sqrt(2100), rel=1e-6)
    assert pooled_correlation(a, a).item() == 1.0
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(PooledCorrelation().compute())
    with pytest.raises(CdamError, match="one shape"):
        pooled_correlation(a, b[:1])


def test_localisation_hand_made_maps():
    maps = torch.tensor([[[4.0, 1.5, 0.0, -2.0],
                          [1.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 2.0, 0.0],
                          [-5.0, 0.0, 0.0, 0.5]]])  # positive relevance: 4 + 1.5 + 1 + 1 + 2 + 0.5 = 10
    # Focus: target tiles top-left (4 + 1.5 + 1 + 1 = 7.5) and bottom-right (2 + 0.5) -> 10 / 10; top-left only: 0.75
    assert focus(maps, torch.tensor([[1, 0, 0, 1]])).item() == pytest.approx(1.0)
    assert focus(maps, torch.tensor([[True, False, False, False]])).item() == pytest.approx(0.75)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 2:, 2:] = True  # the bottom-right quadrant: 4 tokens, positive relevance 2.5
    assert pointing_game(maps, mask).item() == 0.0 and pointing_game(maps, ~mask).item() == 1.0
    assert relevance_mass_accuracy(maps, mask).item() == pytest.approx(0.25)
    # K = 4: the top-4 tokens are 4, 2 (at (2, 2), inside), 1.5 and one of the two tied 1s (both outside) -> 1 / 4
    assert relevance_rank_accuracy(maps, mask).item() == pytest.approx(0.25)
    ties = torch.zeros(1, 2, 2)
    ties[0, 1, 1] = ties[0, 0, 0] = 1.0  # two maxima: a hit if either is inside
    inside = torch.tensor([[[False, False], [False, True]]])
    assert pointing_game(ties, inside).item() == 1.0
    assert relevance_rank_accuracy(ties, inside, seed=0).item() in (0.0, 1.0)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    for fn in (pointing_game, relevance_mass_accuracy, relevance_rank_accuracy):
        assert torch.isnan(fn(maps, empty)).all()  # an empty mask has no score
    assert torch.isnan(relevance_mass_accuracy(-maps.abs(), mask)).all()  # nor a map without positive relevance
    both = torch.cat([maps, maps])
    m = RelevanceMassAccuracy()
    m.update(both, torch.cat([mask, empty]))
    assert m.compute().item() == pytest.approx(0.25) and m.skipped.item() == 1
    assert Focus()(both, torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0]])).item() == pytest.approx(0.875)
    assert PointingGame()(both, torch.cat([mask, ~mask])).item() == pytest.approx(0.5)
    assert RelevanceRankAccuracy()(maps, mask).item() == pytest.approx(0.25)
    with pytest.raises(CdamError, match="even token grid"):
        focus(torch.zeros(1, 3, 4), torch.tensor([[1, 0, 0, 0]]))
    with pytest.raises(CdamError, match="target_tiles"):
        focus(maps, torch.tensor([1, 0, 0, 0]))
    with pytest.raises(CdamError, match="one mask per map"):
        pointing_game(maps, mask[:, :2])


def test_masked_evidence_share_hand_made_maps():
    maps = torch.tensor([[[[1.0, 2.0], [0.0, -5.0]]]])  # positive evidence 1 + 2 = 3
    left = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # left column, at token resolution: holds 1 of 3
    m = MaskedEvidenceShare()
    m.update(maps, left)
    assert m.compute().item() == pytest.approx(1 / 3)
    # a pixel mask at 2x resolution covering the left column and half of the top-right token: (1 + 0.5 * 2) / 3
    px = torch.zeros(1, 1, 4, 4)
    px[..., :, :2] = 1
    px[..., :2, 2] = 1
    assert MaskedEvidenceShare()(maps, px).item() == pytest.approx(2 / 3)
    # a map without positive evidence has no share: skipped, not counted as 0
    m.update(-maps.abs(), left)
    assert m.compute().item() == pytest.approx(1 / 3) and m.skipped.item() == 1
    with pytest.raises(CdamError, match="not a multiple"):
        MaskedEvidenceShare()(maps, torch.zeros(1, 1, 3, 3))


def test_fidelity_is_the_area_between_lif_and_mif():
    x = torch.linspace(0, 1, 5)
    curves = torch.stack([1 - x, torch.ones(5)])[None, None]  # MIF falls linearly, LIF stays: area 1/2
    assert fidelity_from_curves(curves).item() == pytest.approx(0.5)
    flipped = curves.flip(2)  # a map that ranks backwards has negative fidelity
    m = DeletionFidelity(steps=4)
    m.update(torch.cat([curves, flipped], 1))  # [1, 2, 2, 5]
    assert m.compute().item() == pytest.approx(0.0)
    m.reset()
    m.update(curves)
    m.update(2 * curves)
    assert m.compute().item() == pytest.approx(0.75)
    assert torch.allclose(m.mean_curves(), 1.5 * curves[0, 0])
    with pytest.raises(CdamError, match=r"\[\.\.\., 2, 5\]"):
        m.update(torch.zeros(1, 2, 7))


def test_merged_states_equal_one_metric_over_all_data():
    """DDP sync reduces each state with its dist_reduce_fx; merge_state applies the same reductions."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(6, 2, 4, 4, generator=g)
    masks = (torch.rand(6, 2, 4, 4, generator=g) > 0.5).float()
    curves = torch.randn(6, 2, 2, 5, generator=g)
    flat, bool_masks = maps.flatten(0, 1), masks.flatten(0, 1) > 0
    tiles = (torch.rand(12, 4, generator=g) > 0.5)
    cases = [(CompactnessV1, (maps,)), (CompactnessSymmetric, (maps,)), (ClassSensitivity, (maps,)),
             (MaskedEvidenceShare, (maps, masks)), (lambda: DeletionFidelity(steps=4), (curves,)),
             (Focus, (flat, tiles)), (PointingGame, (flat, bool_masks)), (RelevanceMassAccuracy, (flat, bool_masks)),
             (RelevanceRankAccuracy, (flat, bool_masks)), (PooledCorrelation, (maps[:, 0], maps[:, 1])),
             (ModelRandomisation, (maps[:, 0], maps[:, 1])),
             (lambda: ModelRandomisation("ssim"), (maps[:, 0], maps[:, 1]))]
    for make, args in cases:
        whole, rank0, rank1 = make(), make(), make()
        whole.update(*args)
        rank0.update(*(a[:2] for a in args))
        rank1.update(*(a[2:] for a in args))
        rank0.merge_state(rank1)
        assert rank0.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)


def test_deletion_order_ranks_high_scores_first_and_breaks_ties_randomly():
    m = torch.tensor([[0.1, -2.0, 3.0, 0.5]]).view(1, 2, 2)
    assert deletion_order(m).tolist() == [[2, 3, 0, 1]]
    flat = torch.zeros(1, 4, 4)
    o0, o1 = deletion_order(flat, seed=0)[0], deletion_order(flat, seed=1)[0]
    assert sorted(o0.tolist()) == list(range(16)) and not torch.equal(o0, torch.arange(16))
    assert not torch.equal(o0, o1)


def explicit_logit(bb, head, image, target, removed):
    """Target logit with the patch tokens in `removed` cut out of the sequence after the position embedding."""
    tok = bb.embed(image[None])
    p, n = bb.num_prefix_tokens, tok.shape[1] - bb.num_prefix_tokens
    keep = [i for i in range(p + n) if i < p or (i - p) not in removed]
    x = tok[:, keep]
    for blk in bb.model.blocks:
        x = blk(x)
    return head(bb.model.norm(x)[:, 0])[0, target].item()


@pytest.mark.parametrize("key", ["p16", "p14reg"])
def test_token_deletion_curves_equal_explicit_removal(key):
    bb = tiny_backbone(key).double()
    torch.manual_seed(0)
    head = nn.Linear(bb.embed_dim, 3).double()
    images = torch.randn(2, 3, *bb.img_size, dtype=torch.float64)
    gh, gw = bb.grid_size(*bb.img_size)
    n = gh * gw
    targets = torch.tensor([[0, 2], [1, 1]])
    maps = torch.randn(2, 2, gh, gw, dtype=torch.float64)
    steps = 4
    curves = deletion_curves(bb, head, images, targets, maps, steps=steps, mode="token")
    assert curves.shape == (2, 2, 2, steps + 1)
    with torch.no_grad():
        for b in range(2):
            for k in range(2):
                rank = torch.argsort(maps[b, k].flatten(), descending=True).tolist()
                for s in range(steps + 1):
                    c = round(s * n / steps)
                    mif = explicit_logit(bb, head, images[b], targets[b, k], set(rank[:c]))
                    lif = explicit_logit(bb, head, images[b], targets[b, k], set(rank[::-1][:c]))
                    assert curves[b, k, 0, s].item() == pytest.approx(mif, rel=1e-5, abs=1e-6)
                    assert curves[b, k, 1, s].item() == pytest.approx(lif, rel=1e-5, abs=1e-6)


def test_pixel_deletion_replaces_the_ranked_patches():
    bb = tiny_backbone("p16").double()
    torch.manual_seed(0)
    head = nn.Linear(bb.embed_dim, 3).double()
    images = torch.randn(1, 3, *bb.img_size, dtype=torch.float64)  # 32 x 48: 2 x 3 tokens of 16 px
    maps = torch.arange(6, dtype=torch.float64).view(1, 1, 2, 3)  # token 5 (bottom right) is the most important
    targets = torch.tensor([[1]])
    curves = deletion_curves(bb, head, images, targets, maps, steps=6, mode="pixel", replace="mean")
    x = images.clone()
    x[..., 16:, 32:] = images.mean((2, 3), keepdim=True).expand_as(images)[..., 16:, 32:]  # MIF step 1
    with torch.no_grad():
        assert curves[0, 0, 0, 1].item() == pytest.approx(head(bb(x))[0, 1].item(), rel=1e-6)
        assert curves[0, 0, 0, 0].item() == pytest.approx(head(bb(images))[0, 1].item(), rel=1e-6)
    # every patch replaced by zero: the MIF and LIF curves end at the logit of the all-zero image
    z = deletion_curves(bb, head, images, targets, maps, steps=6, mode="pixel", replace="zero")
    with torch.no_grad():
        end = head(bb(torch.zeros_like(images)))[0, 1].item()
    assert z[0, 0, :, -1].tolist() == pytest.approx([end, end])
    blur = deletion_curves(bb, head, images, targets, maps, steps=6, mode="pixel", replace="blur")
    assert blur[0, 0, 0, 0] == curves[0, 0, 0, 0] and blur[0, 0, 0, -1] != curves[0, 0, 0, -1]
    with pytest.raises(CdamError, match="unknown replacement"):
        deletion_curves(bb, head, images, targets, maps, mode="pixel", replace="noise")
    with pytest.raises(CdamError, match=r"maps must be \[B=1, K=1, 2, 3\]"):
        deletion_curves(bb, head, images, targets, maps[:, :, :1])


# --- faithfulness: deletion / insertion of the target probability, ROAD ----------------------------------------------
def tiny_model(key="p16", classes=3, seed=0):
    bb = tiny_backbone(key).double()
    torch.manual_seed(seed)
    return bb, nn.Linear(bb.embed_dim, classes).double()


def explicit_prob(bb, head, image, target, kept):
    """Softmax probability of the target with only the patch tokens in `kept` left after the position embedding."""
    tok = bb.embed(image[None])
    p, n = bb.num_prefix_tokens, tok.shape[1] - bb.num_prefix_tokens
    x = tok[:, [i for i in range(p + n) if i < p or (i - p) in kept]]
    for blk in bb.model.blocks:
        x = blk(x)
    return head(bb.model.norm(x)[:, 0]).softmax(-1)[0, target].item()


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
def test_token_perturbation_curves_equal_explicit_removal(kind):
    bb, head = tiny_model()
    images = torch.randn(2, 3, *bb.img_size, dtype=torch.float64)
    targets = torch.tensor([2, 0])
    maps = torch.randn(2, 2, 3, dtype=torch.float64)
    steps, n = 4, 6
    curves = perturbation_curves(bb, head, images, targets, maps, kind=kind, steps=steps)
    assert curves.shape == (2, steps + 1)
    with torch.no_grad():
        for b in range(2):
            rank = torch.argsort(maps[b].flatten(), descending=True).tolist()
            for s in range(steps + 1):
                top = set(rank[:round(s * n / steps)])
                kept = set(range(n)) - top if kind == "deletion" else top
                ref = explicit_prob(bb, head, images[b], targets[b], kept)
                assert curves[b, s].item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    auc = DeletionAUC(steps=steps) if kind == "deletion" else InsertionAUC(steps=steps)
    auc.update(bb, head, images, targets, maps)
    assert auc.compute().item() == pytest.approx(curve_auc(curves).mean().item(), rel=1e-6)
    assert torch.allclose(auc.mean_curves(), curves.mean(0).float(), atol=1e-6)


def test_pixel_insertion_restores_the_top_patches_of_the_blurred_image():
    bb, head = tiny_model()
    images = torch.randn(1, 3, *bb.img_size, dtype=torch.float64)  # 32 x 48: 2 x 3 patches of 16 px
    maps = torch.arange(6, dtype=torch.float64).view(1, 2, 3)  # the bottom-right patch ranks first
    curves = perturbation_curves(bb, head, images, torch.tensor([1]), maps, kind="insertion", mode="pixel", steps=6)
    blurred = gaussian_blur(images, 8.0)  # half a patch
    x = blurred.clone()
    x[..., 16:, 32:] = images[..., 16:, 32:]  # step 1: the top patch restored
    with torch.no_grad():
        prob = lambda z: head(bb(z)).softmax(-1)[0, 1].item()  # noqa: E731
        assert curves[0].tolist()[:2] == pytest.approx([prob(blurred), prob(x)], rel=1e-6)
        assert curves[0, -1].item() == pytest.approx(prob(images), rel=1e-6)
    deletion = perturbation_curves(bb, head, images, torch.tensor([1]), maps, mode="pixel", steps=6)
    assert deletion[0, 0].item() == pytest.approx(prob(images)) and deletion[0, -1].item() == pytest.approx(
        prob(blurred))
    with pytest.raises(CdamError, match="unknown perturbation kind"):
        perturbation_curves(bb, head, images, torch.tensor([1]), maps, kind="both")
    with pytest.raises(CdamError, match=r"maps must be \[B=1, 2, 3\]"):
        perturbation_curves(bb, head, images, torch.tensor([1]), maps[None])
    with pytest.raises(CdamError, match="one class index per image"):
        perturbation_curves(bb, head, images, torch.tensor([[1, 2]]), maps)


def test_curve_auc_is_the_trapezoid_area_on_0_1():
    x = torch.linspace(0, 1, 5)
    assert curve_auc(torch.stack([1 - x, torch.ones(5), x ** 2])).tolist() == pytest.approx([0.5, 1.0, 0.34375])
    with pytest.raises(CdamError, match="at least 2 points"):
        curve_auc(torch.ones(3, 1))


def test_noisy_linear_imputation_solves_the_neighbour_mean_equations(monkeypatch):
    g = torch.Generator().manual_seed(0)
    removed = torch.zeros(3, 9, 11, dtype=torch.bool)
    removed[0, 4, 5] = True  # one pixel: the weighted mean of its 8 known neighbours
    removed[1, 2:7, 3:9] = True  # an inner block: a linear ramp is reproduced exactly
    removed[2, :, :4] = True  # a region on the border, neighbours outside the image dropped
    removed[2, 0, 10] = True  # a corner pixel
    images = torch.randn(3, 2, 9, 11, generator=g, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(9.0), torch.arange(11.0), indexing="ij")
    images[1] = torch.stack([2 * yy - 3 * xx + 1, -yy]).double()
    out = noisy_linear_imputation(images, removed, noise=0.0)
    w = torch.tensor([[1, 2, 1], [2, 0, 2], [1, 2, 1]], dtype=torch.float64) / 12
    assert out[0, :, 4, 5].tolist() == pytest.approx((images[0, :, 3:6, 4:7] * w).sum((1, 2)).tolist())
    torch.testing.assert_close(out[1], images[1])
    # every removed pixel of image 2 is the weighted mean of its in-image neighbours (the imputed values included)
    pad = torch.nn.functional.pad(out[2], (1, 1, 1, 1))
    wsum = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.ones(1, 1, 9, 11), (1, 1, 1, 1)).double(),
                                      w[None, None])[0, 0]
    mean = torch.nn.functional.conv2d(pad[:, None], w[None, None])[:, 0] / wsum
    torch.testing.assert_close(out[2][:, removed[2]], mean[:, removed[2]])
    assert torch.equal(out[:, :, ~removed[0]][0], images[0][:, ~removed[0]])  # kept pixels untouched
    noisy = noisy_linear_imputation(images, removed, noise=0.5, generator=torch.Generator().manual_seed(3))
    again = noisy_linear_imputation(images, removed, noise=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)
    diff = (noisy - out).permute(0, 2, 3, 1)[removed]
    assert 0.35 < diff.std().item() < 0.65 and torch.equal((noisy - out).permute(0, 2, 3, 1)[~removed],
                                                           torch.zeros_like(diff[:0].new_zeros((~removed).sum(), 2)))
    with pytest.raises(CdamError, match="at least one kept pixel"):
        noisy_linear_imputation(images, torch.ones(3, 9, 11, dtype=torch.bool))
    # solved in groups of images (one per image here): the same numbers and the same noise
    monkeypatch.setattr(faithfulness, "IMPUTATION_MAX_UNKNOWNS", 10)
    grouped = noisy_linear_imputation(images, removed, noise=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(grouped, noisy)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_curves_equal_explicit_imputation_and_forward(order):
    bb, head = tiny_model()
    images = torch.randn(2, 3, *bb.img_size, dtype=torch.float64)
    targets = torch.tensor([1, 2])
    maps = torch.randn(2, 2, 3, dtype=torch.float64)
    fractions = (0.25, 0.5, 0.9)
    curves = road_curves(bb, head, images, targets, maps, order=order, fractions=fractions, noise=0.0)
    assert curves.shape == (2, 3)
    h, w = bb.img_size
    with torch.no_grad():
        for b in range(2):
            pix = maps[b].repeat_interleave(16, 0).repeat_interleave(16, 1).flatten()  # nearest neighbour
            for j, f in enumerate(fractions):
                c = round(f * h * w)
                rank = deletion_order(pix.view(1, h, w))[0]
                removed = torch.zeros(h * w, dtype=torch.bool)
                removed[(rank if order == "morf" else rank.flip(0))[:c]] = True
                # whole tokens first: the top tokens' pixels are removed before any pixel of a lower token
                tok_rank = torch.argsort(maps[b].flatten(), descending=order == "morf")
                full = [t for t in tok_rank.tolist()][:c // 256]
                tok_of = (torch.arange(h)[:, None] // 16 * 3 + torch.arange(w) // 16).flatten()
                assert removed[torch.isin(tok_of, torch.tensor(full, dtype=torch.long))].all()
                x = noisy_linear_imputation(images[b:b + 1], removed.view(1, h, w), noise=0.0)
                ref = head(bb(x)).softmax(-1)[0, targets[b]].item()
                assert curves[b, j].item() == pytest.approx(ref, rel=1e-5, abs=1e-7)
    road = ROAD(order=order, fractions=fractions, noise=0.0)
    road.update(bb, head, images, targets, maps)
    assert road.compute().item() == pytest.approx(curves.mean().item(), rel=1e-6)
    with pytest.raises(CdamError, match="ROAD fractions"):
        road_curves(bb, head, images, targets, maps, fractions=(0.5, 1.0))


# --- sanity checks --------------------------------------------------------------------------------------------------
def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 5, generator=g).round(decimals=0)  # many ties
    b = torch.randn(4, 3, 5, generator=g)
    b[1] = a[1] ** 3  # a monotone map of a: 1
    got = spearman(a, b)
    ref = [scipy.stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a.numpy(), b.numpy())]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert got[1].item() == pytest.approx(1.0)
    with pytest.raises(CdamError, match="one shape"):
        spearman(a, b[:, :2])


@pytest.mark.parametrize("shape", [(4, 4), (5, 9), (14, 14)])
def test_ssim_equals_skimage_on_max_normalised_maps(shape):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(3, *shape, generator=g, dtype=torch.float64)
    b[2] = 7 * a[2]  # the same map on another scale: 1 after normalisation
    win = ssim_window(*shape)
    assert win == {(4, 4): 3, (5, 9): 5, (14, 14): 7}[shape]
    got = ssim(a, b)
    for i in range(3):
        x, y = (m[i].numpy() / np.abs(m[i].numpy()).max() for m in (a, b))
        rng = max(x.max(), y.max()) - min(x.min(), y.min())
        assert got[i].item() == pytest.approx(structural_similarity(x, y, win_size=win, data_range=rng), abs=1e-6)
    assert got[2].item() == pytest.approx(1.0)
    const = torch.ones(1, *shape)
    assert ssim(const, const).item() == 1.0
    with pytest.raises(CdamError, match="at least 3 x 3"):
        ssim(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(CdamError, match="window must be odd"):
        ssim(a, b, window=4)


def test_random_other_classes_never_pick_the_target():
    t = torch.tensor([0, 1, 2, 2, 1, 0] * 5)
    other = random_other_classes(t, 3, seed=3)
    assert (other != t).all() and other.min() >= 0 and other.max() <= 2
    assert torch.equal(other, random_other_classes(t, 3, seed=3))
    state = np.random.get_state()[1].copy()
    random_other_classes(t, 3)
    assert np.array_equal(state, np.random.get_state()[1])  # numpy's global RNG untouched
    with pytest.raises(CdamError, match="at least 2 classes"):
        random_other_classes(t, 1)


def test_randomised_cascade_reinitialises_top_down_on_copies():
    bb, head = tiny_model()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    head_before = head.weight.clone()
    rng = torch.get_rng_state()
    stages = list(randomised_cascade(bb, head, blocks=2, seed=5))
    assert [s[0] for s in stages] == ["head", "head+block-1", "head+block-1+block-2"]
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG untouched
    assert all(torch.equal(v, before[k]) for k, v in bb.state_dict().items()) and torch.equal(head.weight,
                                                                                              head_before)

    for name, b, h in stages:
        assert not torch.equal(h.weight, head.weight)
        diff = {k for k, v in b.model.state_dict().items() if not torch.equal(v, before["model." + k])}
        last = {k for k in diff if k.startswith("blocks.1.") or k.startswith("norm.")}
        first = {k for k in diff if k.startswith("blocks.0.")}
        assert diff == last | first  # patch embedding, tokens and position embedding never change
        assert bool(last) == ("block-1" in name) and bool(first) == ("block-2" in name)
    again = list(randomised_cascade(bb, head, blocks=2, seed=5))
    assert torch.equal(again[2][1].model.blocks[0].mlp.fc1.weight, stages[2][1].model.blocks[0].mlp.fc1.weight)
    with pytest.raises(CdamError, match="blocks must be in 1..2"):
        next(randomised_cascade(bb, head, blocks=3))
    with pytest.raises(CdamError, match="needs a head with layers to re-initialise"):
        next(randomised_cascade(bb, nn.Identity()))


def test_random_logit_compares_the_target_map_with_another_class():
    bb = tiny_backbone("p8", img_size=(32, 32)).double()  # patch 8: a 4 x 4 grid
    head = nn.Linear(bb.embed_dim, 4).double()
    cdam = CDAM(bb, head)

    calls = []

    def explain(images, targets):  # both classes of each image in one call
        calls.append(targets.shape)
        return cdam.class_maps(images, targets)

    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    got = random_logit(explain, images, targets, 4, seed=2)
    assert calls == [(3, 2)]
    other = random_other_classes(targets, 4, seed=2)
    ref = ssim(cdam.class_maps(images, targets[:, None])[:, 0], cdam.class_maps(images, other[:, None])[:, 0])
    torch.testing.assert_close(got, ref)
    with pytest.raises(CdamError, match=r"explain must return maps \[B=3, 2, gh, gw\].*got \(3, 4, 4\)$"):
        random_logit(lambda x, t: cdam.class_maps(x, t[:, :1])[:, 0], images, targets, 4)
    metric = RandomLogit(num_classes=4, seed=2)
    metric.update(explain, images, targets)
    assert metric.compute().item() == pytest.approx(ref.mean().item(), rel=1e-6)
    assert copy.deepcopy(metric).num_classes == 4
