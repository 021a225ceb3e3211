"""Explanation-quality metrics on hand-made maps and curves with answers worked out by hand, deletion curves
against explicit removal on a tiny ViT, and state merging (what DDP sync does) against one metric over all data."""
import pytest
import torch
from torch import nn

from cdam_pl.errors import CdamError
from cdam_pl.metrics import (
    ClassSensitivity,
    Compactness,
    DeletionFidelity,
    MaskedEvidenceShare,
    deletion_curves,
    deletion_order,
    fidelity_from_curves,
)
from tests.conftest import tiny_backbone

MAPS = torch.tensor([
    [[0.0, 0.0], [0.0, 1.0]],  # 3 of 4 below 0.05 * max|s|
    [[1.0, -1.0], [0.04, 0.06]],  # only 0.04; the sign does not matter
    [[0.0, 0.0], [0.0, 0.0]],  # nothing stands out: counts as 1
])


def test_compactness_hand_made_maps():
    m = Compactness()
    m.update(MAPS[:2, None])  # [B, K=1, gh, gw]
    assert m.compute().item() == pytest.approx((0.75 + 0.25) / 2)
    m.update(MAPS[2])
    assert m.compute().item() == pytest.approx((0.75 + 0.25 + 1.0) / 3)
    m.reset()
    m.update(MAPS[1])
    assert m.compute().item() == pytest.approx(0.25)
    assert Compactness(rel=0.5)(MAPS[1]).item() == pytest.approx(0.5)  # 0.04 and 0.06 are below 0.5
    with pytest.raises(CdamError, match="rel must be in"):
        Compactness(rel=5)


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
    maps = torch.randn(6, 2, 3, 4, generator=g)
    masks = (torch.rand(6, 2, 3, 4, generator=g) > 0.5).float()
    curves = torch.randn(6, 2, 2, 5, generator=g)
    cases = [(Compactness, (maps,)), (ClassSensitivity, (maps,)), (MaskedEvidenceShare, (maps, masks)),
             (lambda: DeletionFidelity(steps=4), (curves,))]
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
