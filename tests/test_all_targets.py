"""Maps of many targets at once (every class of a 1,000-class head, more concepts than feature dimensions) against
the literal definition in float64: hooks on blocks[-1].norm1, full autograd, one target per backward (vmapped over
the targets in `naive_cdam_many`, and spot checks with `naive_cdam` itself). Covers the engine's two ways of
backpropagating (the targets' own gradients when K <= F, the F feature coordinates when K > F), forward-mode head
Jacobians (MLP and batch-norm heads), q/k norms and norms inside the block, 1 and 5 prefix tokens, non-square grids,
pooled features, Smooth and Integrated CDAM and chunking over images."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cdam_pl.explain import CDAM, concept_vectors
from cdam_pl.explain.reference import naive_cdam, naive_cdam_many
from cdam_pl.heads import build_head
from tests.conftest import tiny_backbone
from tests.test_cdam import RTOL, _noisy, rel_err

C = 1000  # classes of the wide heads: more than the tiny models' 64 feature dimensions


def images_for(bb, b=3, seed=0):
    return torch.randn(b, 3, *bb.img_size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def wide_head(kind, f, c=C):
    torch.manual_seed(3)
    if kind == "linear":
        return nn.Linear(f, c).double().eval()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(f, 48), nn.GELU(), nn.Dropout(0.5), nn.Linear(48, c)).double().eval()
    head = build_head("linear", f, c, dropout=0.1, batchnorm=True).double()  # the project's linear-probe head
    bn = head[0]
    bn.running_mean.normal_(generator=torch.Generator().manual_seed(1))
    bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))
    return head.eval()


def per_image_targets(b, k, c=C, seed=5):
    """A different order (and, for k < c, a different subset) of the classes for every image: [B, K]."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)])


@pytest.mark.parametrize("key", ["p16", "p8", "p14reg"])
def test_every_class_of_a_1000_class_linear_head_matches_the_literal_definition(key):
    bb = tiny_backbone(key).double()
    head, images = wide_head("linear", bb.feature_dim), images_for(bb)
    maps = CDAM(bb, head).class_maps(images, list(range(C)))  # K = 1000 > F = 64: through the feature coordinates
    gh, gw = bb.grid_size(*images.shape[-2:])
    assert maps.shape == (3, C, gh, gw) and gh != gw
    ref = naive_cdam_many(bb, head, images)
    assert rel_err(maps.double(), ref) < RTOL
    for k in (0, 417, 999):  # the vmapped reference against one backward per target
        assert rel_err(ref[:, k], naive_cdam(bb, lambda e, k=k: head(e)[:, k], images)) < 1e-10
    # the same targets asked a few at a time take the other route (their own gradients): the same maps
    few = CDAM(bb, head).class_maps(images, [3, 500, 998])
    assert rel_err(few.double(), maps[:, [3, 500, 998]].double()) < 1e-10


@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
def test_nonlinear_and_batchnorm_heads_with_more_targets_than_features(kind):
    bb = tiny_backbone("p14reg").double()
    head, images = wide_head(kind, bb.feature_dim), images_for(bb)
    targets = per_image_targets(3, 300)  # K = 300 > F: forward-mode head Jacobian, per-image targets
    maps = CDAM(bb, head).class_maps(images, targets)
    ref = naive_cdam_many(bb, lambda e: head(e).gather(1, targets), images)
    assert rel_err(maps.double(), ref) < RTOL
    assert rel_err(CDAM(bb, head).class_maps(images, targets[:, :7]).double(), ref[:, :7]) < RTOL


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_more_concepts_than_feature_dimensions(similarity):
    bb = tiny_backbone("p16").double()
    head, images = wide_head("linear", bb.feature_dim, 5), images_for(bb)
    examples = torch.randn(100, 3, *bb.img_size, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    _, vecs = concept_vectors(bb, {f"c{i}": examples[i:i + 1] for i in range(100)})  # M = 100 > F = 64
    ex = CDAM(bb, head).explain(images, targets=[0, 4], concepts=vecs, similarity=similarity)

    def scores(e):
        if similarity == "dot":
            return e @ vecs.T
        return nn.functional.cosine_similarity(e[:, None], vecs[None], dim=-1)

    ref = naive_cdam_many(bb, lambda e: torch.cat([head(e)[:, [0, 4]], scores(e)], 1), images)
    assert ex.maps.shape == (3, 102, 2, 3)
    assert rel_err(ex.maps.double(), ref) < RTOL


@pytest.mark.parametrize("k", [3, 200])
def test_query_key_norms_norms_inside_the_block_and_layer_scale(k):
    bb = tiny_backbone("p16", qk_norm=True, scale_attn_norm=True, scale_mlp_norm=True, init_values=0.5).double()
    attn = bb.model.blocks[-1].attn
    assert not isinstance(attn.k_norm, nn.Identity) and not isinstance(attn.norm, nn.Identity)
    head, images = wide_head("linear", bb.feature_dim), images_for(bb)
    targets = per_image_targets(3, k)
    maps = CDAM(bb, head).class_maps(images, targets)
    assert rel_err(maps.double(), naive_cdam_many(bb, lambda e: head(e).gather(1, targets), images)) < RTOL


@pytest.mark.parametrize("pool, k", [
    ("cls", 3),  # 2 K <= min(T, A): reverse passes
    ("cls", 40),  # T = 121 > A = 64: the one-token Jacobian itself
    ("cls", 300),
    ("avg", 30),  # K <= F, fewer than the 120 patch tokens: one backward per target
    ("avg", 300),  # K > F = 64 < 120 patch tokens: one backward per feature coordinate
])
def test_every_way_of_multiplying_on_a_large_grid(pool, k):
    bb = tiny_backbone("p8", img_size=(96, 80), pool=pool).double()  # 12 x 10 patch tokens
    head, images = wide_head("linear", bb.feature_dim), images_for(bb, b=2)
    targets = per_image_targets(2, k)
    maps = CDAM(bb, head).class_maps(images, targets)
    assert maps.shape == (2, k, 12, 10)
    assert rel_err(maps.double(), naive_cdam_many(bb, lambda e: head(e).gather(1, targets), images)) < RTOL


@pytest.mark.parametrize("pool", ["avg", "cls+avg"])
def test_pooled_features_with_more_targets_than_features(pool):
    bb = tiny_backbone("p14reg", pool=pool).double()
    head, images = wide_head("linear", bb.feature_dim, 300), images_for(bb, b=2)
    maps = CDAM(bb, head).class_maps(images, list(range(300)))  # K = 300 > F = 64 or 128
    assert rel_err(maps.double(), naive_cdam_many(bb, head, images)) < RTOL


def test_smooth_and_integrated_cdam_with_every_class():
    bb = tiny_backbone("p14reg").double()
    head, images = wide_head("mlp", bb.feature_dim, 200), images_for(bb)
    n, lam, everything = 3, 0.1, list(range(200))
    cdam = CDAM(bb, head, max_elements=50_000)  # small budget: chunks over samples and over images
    smooth = cdam.class_maps(images, everything, variant="smooth", n_samples=n, noise=lam,
                             generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    ref = sum(naive_cdam_many(bb, head, images, lambda z, i=i: _noisy(z, i, gen, lam)) for i in range(n)) / n
    assert rel_err(smooth.double(), ref) < RTOL
    m = 4
    integrated = cdam.class_maps(images, everything, variant="integrated", n_steps=m)
    ref = sum(naive_cdam_many(bb, head, images, lambda z, s=s / m: z * s) for s in range(1, m)) / (m - 1)
    assert rel_err(integrated.double(), ref) < RTOL


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_chunking_over_images_gives_the_same_maps(pool):
    bb = tiny_backbone("p8", pool=pool).double()
    head, images = wide_head("linear", bb.feature_dim, 150), images_for(bb, b=5)
    targets = per_image_targets(5, 150, 150)
    whole = CDAM(bb, head).class_maps(images, targets)
    one_by_one = CDAM(bb, head, max_elements=1).class_maps(images, targets)  # one image per chunk
    assert rel_err(one_by_one.double(), whole.double()) < 1e-12


def test_a_whole_timm_classifier_with_1000_classes():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(32, 48), patch_size=16, embed_dim=64, depth=2, num_heads=4,
                              num_classes=C, reg_tokens=2).double().eval()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cdam = CDAM.from_model(model)
    maps = cdam.class_maps(images, list(range(C)))
    assert rel_err(maps.double(), naive_cdam_many(cdam.backbone, model.head, images)) < RTOL
    assert not any(p.grad is not None for p in model.parameters())
