"""`CDAM.from_model` on whole ViT classifiers (timm with its own head, transformers' ViTForImageClassification)
against the literal definition applied to the user's model itself: T hooked on the last layer's first norm, the
model's own forward from the pixels, full autograd, one target per backward, S_i = sum_j T_ij dF/dT_ij. Float64,
so the comparison is of the mathematics, not of rounding."""
import copy

import pytest
import torch
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from cdam_pl.backbone import FrozenViT
from cdam_pl.errors import CdamError
from cdam_pl.explain import CDAM, concept_vectors

RTOL = 1e-5
SIZE = (32, 48)  # patch 8: a 4 x 6 grid, not square
GRID = (4, 6)
POOLS = ["token", "avg", "max", "avgmax", "map"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb(model, seed=1):
    """Random offsets on every parameter (biases, layer scales, norms), so no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def timm_vit(global_pool="token", fc_norm=None, reg_tokens=0, img_size=SIZE, **kwargs):
    torch.manual_seed(0)
    kwargs = {"num_classes": 5, "embed_dim": 64, "depth": 2, "num_heads": 4, "init_values": 0.1, **kwargs}
    m = VisionTransformer(img_size=img_size, patch_size=8, global_pool=global_pool, fc_norm=fc_norm,
                          reg_tokens=reg_tokens, **kwargs)
    return perturb(m.double()).eval()


def images(b=3, size=SIZE, seed=0):
    return torch.randn(b, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def literal_cdam(forward, norm1, x, score, num_prefix, grid=GRID):
    """score(forward(x)) -> [B], one target per image; T = norm1's output; returns [B, gh, gw]."""
    store = {}
    hook = norm1.register_forward_hook(lambda mod, inp, out: store.__setitem__("t", out))
    try:
        with torch.enable_grad():
            f = score(forward(x.clone().requires_grad_(True)))  # the model's own forward, from the pixels
            (g,) = torch.autograd.grad(f.sum(), store["t"])  # w.r.t. T only: no parameter gets a .grad
    finally:
        hook.remove()
    return (store["t"] * g).sum(-1)[:, num_prefix:].reshape(-1, *grid).detach()


def timm_literal(m, x, score, grid=GRID):
    return literal_cdam(m, m.blocks[-1].norm1, x, score, m.num_prefix_tokens, grid)


def timm_features(m, x):
    """timm's pre-logits feature, through its public API."""
    return m.forward_head(m.forward_features(x), pre_logits=True)


def one_line_error(fn, *words):
    with pytest.raises(CdamError) as e:
        fn()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    for w in words:
        assert w in msg, msg
    return msg


# --- timm VisionTransformer with its own head ----------------------------------------------------------------------
@pytest.mark.parametrize("reg_tokens", [0, 4])
@pytest.mark.parametrize("fc_norm", [False, True])
@pytest.mark.parametrize("pool", POOLS)
def test_timm_class_maps_equal_literal_definition(pool, fc_norm, reg_tokens):
    m = timm_vit(pool, fc_norm, reg_tokens)
    x = images()
    targets = torch.tensor([[0, 4], [2, 2], [3, 1]])  # different targets per image, one batch
    cdam = CDAM.from_model(m)
    assert cdam.backbone.reads_cls_only == (pool == "token")
    assert cdam.head is m.head and cdam.backbone.model is m  # the user's model, not a copy
    ex = cdam.explain(x, targets=targets)
    with torch.no_grad():
        assert torch.allclose(ex.logits, m(x), rtol=1e-12, atol=1e-12)
        feats = timm_features(m, x)
    assert ex.embeddings.shape == (3, cdam.backbone.feature_dim)
    assert torch.allclose(ex.embeddings, feats, rtol=1e-12, atol=1e-12)
    assert ex.class_maps.shape == (3, 2, *GRID)
    for k in range(2):
        ref = timm_literal(m, x, lambda lg: lg.gather(1, targets[:, k:k + 1])[:, 0])
        assert rel_err(ex.class_maps[:, k].double(), ref) < RTOL


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("pool", ["token", "avg", "map"])
def test_timm_concept_maps_equal_literal_definition(pool, similarity):
    m = timm_vit(pool, reg_tokens=4)
    x, examples = images(), images(4, seed=5)
    cdam = CDAM.from_model(m)
    names, vecs = concept_vectors(cdam.backbone, {"a": examples[:2], "b": list(examples[2:])})
    with torch.no_grad():
        feats = timm_features(m, examples)
    assert names == ["a", "b"] and torch.allclose(vecs, torch.stack([feats[:2].mean(0), feats[2:].mean(0)]))
    cmaps = cdam.concept_maps(x, vecs, similarity=similarity)
    for j in range(2):
        if similarity == "dot":
            fn = lambda lg, v=vecs[j]: lg @ v  # noqa: E731
        else:
            fn = lambda lg, v=vecs[j]: nn.functional.cosine_similarity(lg, v[None], dim=-1)  # noqa: E731
        ref = literal_cdam(lambda im: timm_features(m, im), m.blocks[-1].norm1, x, fn, m.num_prefix_tokens)
        assert rel_err(cmaps[:, j].double(), ref) < RTOL


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_timm_model_without_cls_token(reg_tokens):
    m = timm_vit("avg", reg_tokens=reg_tokens, class_token=False)
    x = images()
    cdam = CDAM.from_model(m)
    assert not cdam.backbone.has_cls_token and cdam.backbone.num_prefix_tokens == reg_tokens
    maps = cdam.class_maps(x, [2])
    assert rel_err(maps[:, 0].double(), timm_literal(m, x, lambda lg: lg[:, 2])) < RTOL
    one_line_error(lambda: cdam.explain(x, targets=[2], attention=True), "no CLS token", "attention=False")


def test_timm_dynamic_size_and_fixed_size():
    m = timm_vit("avg", dynamic_img_size=True)
    x = images(2, size=(24, 40))  # not the size it was built for: the position embedding is resampled
    maps = CDAM.from_model(m).class_maps(x, [1])
    assert maps.shape == (2, 1, 3, 5)
    assert rel_err(maps[:, 0].double(), timm_literal(m, x, lambda lg: lg[:, 1], grid=(3, 5))) < RTOL
    fixed = CDAM.from_model(timm_vit("token"))
    one_line_error(lambda: fixed.class_maps(images(2, size=(48, 32)), [1]), "48x32", "32x48")


def test_trainable_model_in_train_mode_is_left_as_it_was():
    m = timm_vit("token", drop_rate=0.3, attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.2)
    m.patch_embed.requires_grad_(False)  # mixed flags: part frozen, the rest trainable
    m.train()
    m.blocks[0].eval()  # mixed modes
    frozen = FrozenViT(copy.deepcopy(m), {"pool": "cls", "img_size": list(SIZE)})
    frozen_head = copy.deepcopy(m.head)
    reference = copy.deepcopy(m).eval()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert any(flags.values()) and not all(flags.values()) and any(modes.values()) and not all(modes.values())

    x, gen = images(), lambda: torch.Generator().manual_seed(7)
    cdam = CDAM.from_model(m)
    _, vecs = concept_vectors(cdam.backbone, {"c": images(2, seed=3)})
    ex = cdam.explain(x, targets=[1, 3], concepts=vecs, attention=True)
    smooth = cdam.class_maps(x, [1], variant="smooth", n_samples=3, generator=gen())

    assert all(p.grad is None for p in m.parameters())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert all("forward" not in vars(mod) for mod in m.modules())
    assert type(m).forward is VisionTransformer.forward

    want = CDAM(frozen, frozen_head)
    _, frozen_vecs = concept_vectors(frozen, {"c": images(2, seed=3)})
    assert torch.allclose(vecs, frozen_vecs, rtol=1e-12, atol=1e-12)
    ref = want.explain(x, targets=[1, 3], concepts=vecs, attention=True)
    for got, exp in ((ex.class_maps, ref.class_maps), (ex.concept_maps, ref.concept_maps),
                     (ex.attention, ref.attention), (ex.logits, ref.logits),
                     (smooth, want.class_maps(x, [1], variant="smooth", n_samples=3, generator=gen()))):
        assert torch.allclose(got, exp, rtol=1e-10, atol=1e-12)
    for k, cls in enumerate([1, 3]):
        assert rel_err(ex.class_maps[:, k].double(), timm_literal(reference, x, lambda lg: lg[:, cls])) < RTOL


# --- Hugging Face ViTForImageClassification --------------------------------------------------------------------------
def hf_vit(**overrides):
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=100,
               image_size=list(SIZE), patch_size=8, num_labels=5, layer_norm_eps=1e-3, hidden_act="gelu",
               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    cfg.update(overrides)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**cfg))


def hf_last_norm(m):
    layers = m.vit.layers if hasattr(m.vit, "layers") else m.vit.encoder.layer  # transformers 5 | 4
    return layers[-1].layernorm_before


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_vit_maps_equal_literal_definition_on_the_hf_model(qkv_bias):
    m = perturb(hf_vit(qkv_bias=qkv_bias).double())
    m.train()  # trainable, in train mode: only read by the conversion
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x, targets = images(), torch.tensor([[0, 4], [2, 2], [3, 1]])
    cdam = CDAM.from_model(m)
    _, vecs = concept_vectors(cdam.backbone, {"a": images(2, seed=3), "b": images(2, seed=4)})
    ex = cdam.explain(x, targets=targets, concepts=vecs, similarity="cosine")
    assert m.training and all(p.grad is None for p in m.parameters())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())

    m.eval()
    with torch.no_grad():
        assert torch.allclose(ex.logits, m(pixel_values=x).logits, rtol=1e-10, atol=1e-12)
        cls_feature = lambda im: m.vit(pixel_values=im).last_hidden_state[:, 0]  # noqa: E731  (the classifier's input)
        assert torch.allclose(vecs[0], cls_feature(images(2, seed=3)).mean(0), rtol=1e-10, atol=1e-12)
    assert ex.class_maps.shape == (3, 2, *GRID)
    for k in range(2):
        ref = literal_cdam(lambda im: m(pixel_values=im).logits, hf_last_norm(m), x,
                           lambda lg: lg.gather(1, targets[:, k:k + 1])[:, 0], 1)
        assert rel_err(ex.class_maps[:, k].double(), ref) < RTOL
    for j in range(2):
        ref = literal_cdam(cls_feature, hf_last_norm(m), x,
                           lambda e, v=vecs[j]: nn.functional.cosine_similarity(e, v[None], dim=-1), 1)
        assert rel_err(ex.concept_maps[:, j].double(), ref) < RTOL


# --- what from_model refuses ----------------------------------------------------------------------------------------
class PoolTwice(VisionTransformer):
    def forward_head(self, x, pre_logits=False):
        return super().forward_head(x * 2, pre_logits)


def test_timm_models_it_cannot_explain_exactly_are_one_line_errors():
    one_line_error(lambda: CDAM.from_model(nn.Linear(3, 4)), "Linear", "VisionTransformer")
    one_line_error(lambda: CDAM.from_model(timm_vit(num_classes=0)), "no head", "num_classes")
    one_line_error(lambda: CDAM.from_model(timm_vit("")), "global_pool=''")
    no_cls = timm_vit("avg", class_token=False)
    no_cls.global_pool = "token"
    one_line_error(lambda: CDAM.from_model(no_cls), "no CLS token")
    one_line_error(lambda: CDAM.from_model(timm_vit(block_fn=ResPostBlock)), "ResPostBlock", "last layer")
    torch.manual_seed(0)
    subclass = PoolTwice(img_size=SIZE, patch_size=8, num_classes=5, embed_dim=64, depth=1, num_heads=4)
    one_line_error(lambda: CDAM.from_model(subclass), "PoolTwice", "forward_head")
    patched = timm_vit()
    patched.forward = lambda x: patched.forward_head(patched.forward_features(x)) * 2
    one_line_error(lambda: CDAM.from_model(patched), "forward", "replaced")
    one_line_error(lambda: CDAM(nn.Linear(3, 4)), "FrozenViT", "from_model")


def test_hf_models_it_cannot_convert_are_one_line_errors():
    transformers = pytest.importorskip("transformers")
    dinov2 = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8))
    one_line_error(lambda: CDAM.from_model(dinov2), "Dinov2Model", "no classification head")
    one_line_error(lambda: CDAM.from_model(hf_vit(hidden_act="relu")), "hidden_act='relu'", "gelu")
    one_line_error(lambda: CDAM.from_model(hf_vit(num_labels=0)), "num_labels=0")
    cdam = CDAM.from_model(hf_vit())
    one_line_error(lambda: cdam.class_maps(images(1, size=(48, 48)).float(), [0]), "48x48", "32x48")
