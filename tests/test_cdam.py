"""The CDAM engine against a naive reference: hooks on blocks[-1].norm1, full autograd through the whole model
(from the input image), one target per backward, S_i = sum_j T_ij dF/dT_ij. Float64, so the comparison is of the
mathematics, not of rounding."""
import gc
import tracemalloc

import pytest
import torch
from torch import nn

from cdam_pl.errors import CdamError
from cdam_pl.explain import CDAM, attention_maps, concept_vectors
from cdam_pl.explain.reference import naive_cdam
from tests.conftest import tiny_backbone

RTOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_head(kind, d, c=5):
    torch.manual_seed(3)
    if kind == "linear":
        return nn.Linear(d, c)
    return nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, c))


def setup(key, head_kind="linear", b=3):
    bb = tiny_backbone(key).double()
    head = make_head(head_kind, bb.embed_dim).double()
    h, w = bb.img_size
    images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return bb, head, images


@pytest.mark.parametrize("key", ["p16", "p8", "p14reg"])
@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
def test_class_maps_match_naive_reference_per_image_targets(key, head_kind):
    bb, head, images = setup(key, head_kind)
    targets = torch.tensor([[0, 4], [2, 2], [3, 1]])  # different targets per image, one batch
    maps = CDAM(bb, head).class_maps(images, targets)
    gh, gw = bb.grid_size(*images.shape[-2:])
    assert maps.shape == (3, 2, gh, gw) and gh != gw
    head.eval()
    for k in range(2):
        ref = naive_cdam(bb, lambda e: head(e).gather(1, targets[:, k:k + 1])[:, 0], images)
        assert rel_err(maps[:, k].double(), ref) < RTOL


def test_float32_maps_close_to_float64_reference():
    bb, head, images = setup("p16")
    ref = naive_cdam(bb, lambda e: head(e)[:, 1], images)
    maps = CDAM(bb.float(), head.float()).class_maps(images.float(), [1])
    assert maps.dtype == torch.float32
    assert rel_err(maps[:, 0].double(), ref) < 1e-4


def test_sign_is_kept_and_scores_are_not_normalised():
    bb, head, images = setup("p16")
    maps = CDAM(bb, head).class_maps(images, [0])
    assert (maps < 0).any() and (maps > 0).any()
    ref = naive_cdam(bb, lambda e: head(e)[:, 0], images)
    assert torch.allclose(maps[:, 0].double().abs().max(), ref.abs().max(), rtol=RTOL)


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("key", ["p16", "p14reg"])
def test_concept_maps_match_reference(similarity, key):
    bb, head, images = setup(key)
    ex_imgs = torch.randn(4, 3, *images.shape[-2:], dtype=torch.float64)
    names, vecs = concept_vectors(bb, {"a": ex_imgs[:2], "b": [ex_imgs[2], ex_imgs[3]]})
    assert names == ["a", "b"] and vecs.shape == (2, bb.embed_dim)
    with torch.no_grad():
        assert torch.allclose(vecs[0], bb(ex_imgs[:2]).mean(0))
    cmaps = CDAM(bb, head).concept_maps(images, vecs, similarity=similarity)
    for m in range(2):
        if similarity == "dot":
            fn = lambda e: e @ vecs[m]  # noqa: E731
        else:
            fn = lambda e: nn.functional.cosine_similarity(e, vecs[m][None], dim=-1)  # noqa: E731
        assert rel_err(cmaps[:, m].double(), naive_cdam(bb, fn, images)) < RTOL


def test_explain_one_forward_gives_classes_concepts_and_attention_consistently():
    bb, head, images = setup("p14reg")
    cdam = CDAM(bb, head)
    _, vecs = concept_vectors(bb, {"c": images[:1]})
    ex = cdam.explain(images, targets=lambda lg: lg.topk(2).indices, concepts=vecs, attention=True)
    with torch.no_grad():
        logits = head(bb(images))
    assert torch.allclose(ex.logits, logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(ex.targets, logits.topk(2).indices)
    assert torch.allclose(ex.class_maps, cdam.class_maps(images, ex.targets), rtol=1e-10, atol=1e-12)
    assert torch.allclose(ex.concept_maps, cdam.concept_maps(images, vecs), rtol=1e-10, atol=1e-12)
    assert ex.attention.shape == (3, bb.num_heads, 2, 3)


def _noisy(z, k, gen_state, sigma_lambda, scale=1.0):
    return z * scale + torch.randn(z.shape, generator=gen_state, dtype=z.dtype) * sigma_lambda * (
        z.flatten(1).max(1).values - z.flatten(1).min(1).values)[:, None, None]


@pytest.mark.parametrize("key", ["p16", "p14reg"])
def test_smooth_cdam_matches_reference_with_same_noise(key):
    bb, head, images = setup(key, "mlp")
    n = 5
    maps = CDAM(bb, head, max_elements=20_000).class_maps(  # tiny budget: exercises the chunking over samples
        images, [1, 2], variant="smooth", n_samples=n, noise=0.1, generator=torch.Generator().manual_seed(7))
    head.eval()
    for k, cls in enumerate([1, 2]):
        gen = torch.Generator().manual_seed(7)
        ref = sum(naive_cdam(bb, lambda e: head(e)[:, cls], images, lambda z: _noisy(z, i, gen, 0.1))
                  for i in range(n)) / n
        # each target re-draws from a fresh generator: the same noise for both targets, as in the engine
        assert rel_err(maps[:, k].double(), ref) < RTOL


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_integrated_cdam_matches_reference(noise):
    bb, head, images = setup("p8")
    m = 6
    maps = CDAM(bb, head).class_maps(images, [3], variant="integrated", n_steps=m, noise=noise,
                                     generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    ref = sum(naive_cdam(bb, lambda e: head(e)[:, 3], images,
                         (lambda z, s=k / m: _noisy(z, k, gen, noise, s)) if noise else (lambda z, s=k / m: z * s))
              for k in range(1, m)) / (m - 1)
    assert rel_err(maps[:, 0].double(), ref) < RTOL


def test_attention_maps_equal_explicit_softmax_of_last_block():
    bb, _, images = setup("p14reg")
    am = attention_maps(bb, images)
    blk = bb.model.blocks[-1]
    captured = {}
    h = blk.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))
    with torch.no_grad():
        bb(images)
    h.remove()
    a = blk.attn
    b, t, _ = captured["t"].shape
    qkv = a.qkv(captured["t"]).reshape(b, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    probs = ((qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)  # [B, h, T, T]
    ref = probs[:, :, 0, bb.num_prefix_tokens:].reshape(b, a.num_heads, 2, 3)
    assert torch.allclose(am, ref, atol=1e-12)
    assert torch.all(am >= 0) and torch.all(am.sum((-1, -2)) <= 1 + 1e-12)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_works_inside_no_grad_and_inference_mode(ctx):
    bb, head, images = setup("p16")
    expected = CDAM(bb, head).class_maps(images, [0, 1])
    with ctx():
        imgs = images.clone()  # an inference tensor under inference_mode
        got = CDAM(bb, head).class_maps(imgs, [0, 1])
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_leaves_flags_grads_and_hooks_as_found():
    bb, head, images = setup("p16", "mlp")
    head.train()
    flags = [(p, p.requires_grad) for p in list(bb.parameters()) + list(head.parameters())]
    CDAM(bb, head).explain(images, targets=[0, 1], attention=True, variant="smooth", n_samples=2)
    assert head.training and not bb.model.training
    assert all(p.requires_grad == rg and p.grad is None for p, rg in flags)
    for mod in bb.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks


def test_memory_stays_flat_over_many_calls():
    bb, head, _ = setup("p16")
    bb, head = bb.float(), head.float()
    images = torch.randn(2, 3, 32, 48)
    cdam = CDAM(bb, head)
    for _ in range(20):
        cdam.class_maps(images, [0, 1, 2])
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(1000):
        cdam.class_maps(images, [0, 1, 2])
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 200_000, f"python heap grew by {grown} bytes over 1000 calls"


def test_errors_are_clear():
    bb, head, images = setup("p16")
    cdam = CDAM(bb, head)
    with pytest.raises(CdamError, match="out of range: the head has 5 classes"):
        cdam.class_maps(images, [7])
    with pytest.raises(CdamError, match="not divisible by the patch size 16"):
        cdam.class_maps(images[..., :40], [0])
    with pytest.raises(CdamError, match="unknown CDAM variant"):
        cdam.class_maps(images, [0], variant="fancy")
    with pytest.raises(CdamError, match="concept vectors must be"):
        cdam.concept_maps(images, torch.zeros(2, 3, dtype=torch.float64))


def test_targets_created_under_inference_mode_are_accepted():
    bb, head, images = setup("p16")
    with torch.inference_mode():
        targets = head(bb(images)).topk(2).indices  # an inference tensor, as in Lightning's validation step
    got = CDAM(bb, head).class_maps(images, targets)
    assert torch.allclose(got, CDAM(bb, head).class_maps(images, targets.clone()), rtol=1e-12, atol=0)
