"""Heads on pooled features (`backbone.pool` = avg | cls+avg) everywhere: the engine against the naive reference
(float64, 1e-5 relative) for 1 and 5 prefix tokens, non-square grids, linear and MLP heads, class and concept maps,
Smooth and Integrated with the same noise, several targets per call; the feature against DINOv2's definition
computed by hand; every other registered method, TAM and the deletion metrics by hand; and the training path:
config, checkpoints, feature cache key, resume, the explanation callback, explain.py and the web demo."""
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

import explain
import train
from cdam_pl.app import DemoEngine
from cdam_pl.backbone import POOLINGS, load_backbone
from cdam_pl.checkpoint import check_backbone_matches, load_checkpoint
from cdam_pl.config import load_config
from cdam_pl.data import build_transform, load_image
from cdam_pl.errors import CheckpointError, ConfigError
from cdam_pl.explain import CDAM, concept_vectors, registry
from cdam_pl.explain.reference import naive_cdam
from cdam_pl.explain.tam import naive_token_ablation_map, token_ablation_map
from cdam_pl.features.cache import cache_key
from cdam_pl.metrics import deletion_curves, deletion_drop, embed_without_tokens
from cdam_pl.store import load_explanations
from cdam_pl.train.callbacks import ExplanationCallback
from cdam_pl.train.run import build_backbone, build_datamodule, run_training
from tests.conftest import TINY, TINY_MODELS, tiny_backbone, tiny_config
from tests.test_cdam import RTOL, _noisy, make_head, rel_err

POOLS = ("avg", "cls+avg")
KEYS = ("p16", "p14reg")  # 1 and 5 prefix tokens; grids 2 x 3
PREFIX = {"p16": 1, "p14reg": 5}


def setup(key, pool, head_kind="linear", b=3):
    bb = tiny_backbone(key, pool=pool).double()
    head = make_head(head_kind, bb.feature_dim).double().eval()
    images = torch.randn(b, 3, *bb.img_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return bb, head, images


def feature_by_hand(bb, pool, tokens):
    """DINOv2's linear-evaluation features from tokens after the position embedding: run the blocks, final norm,
    then CLS, the mean of the patch tokens (registers excluded) or their concatenation. An empty mean is 0."""
    x = tokens
    for blk in bb.model.blocks:
        x = blk(x)
    x = bb.model.norm(x)
    patches = x[:, bb.num_prefix_tokens:]  # checked against the model's 1 or 5 in the first test
    avg = patches.mean(1) if patches.shape[1] else torch.zeros_like(x[:, 0])
    return {"cls": x[:, 0], "avg": avg, "cls+avg": torch.cat([x[:, 0], avg], -1)}[pool]


# ================================================================================================ the feature


@pytest.mark.parametrize("key", KEYS)
def test_forward_is_dinov2_pooling_computed_by_hand(key):
    bbs = {pool: tiny_backbone(key, pool=pool).double() for pool in POOLINGS}
    x = torch.randn(2, 3, *bbs["cls"].img_size, dtype=torch.float64)
    with torch.no_grad():
        tokens = bbs["cls"].model.forward_features(x)  # timm's own forward: blocks, then the final norm
        p = PREFIX[key]
        cls, avg = tokens[:, 0], tokens[:, p:].mean(1)
        expected = {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], -1)}
        for pool, bb in bbs.items():
            assert bb.num_prefix_tokens == p and bb.pooling == pool and bb.identity["pool"] == pool
            assert bb.reads_cls_only == (pool == "cls")
            assert bb.feature_dim == {"cls": 64, "avg": 64, "cls+avg": 128}[pool]
            torch.testing.assert_close(bb(x), expected[pool], rtol=1e-12, atol=1e-12)
        if p > 1:  # the registers are not averaged in
            assert not torch.allclose(tokens[:, 1:].mean(1), avg)
    # same weights, so the same sha256; the identities differ by the pooling only
    ids = [{k: v for k, v in bb.identity.items() if k != "pool"} for bb in bbs.values()]
    assert ids[0] == ids[1] == ids[2]


def test_bad_pool_name_is_a_one_line_config_error():
    name, size = TINY_MODELS["p16"]
    with pytest.raises(ConfigError) as e:
        load_backbone(name, weights=None, img_size=size, pool="mean", **TINY)
    assert str(e.value) == "unknown pooling 'mean'; choose one of cls, avg, cls+avg"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["backbone.pool=max"])
    assert str(e.value) == "backbone.pool='max' is not one of cls, avg, cls+avg"


# ================================================================================================ the engine


@pytest.mark.parametrize("head_kind", ["linear", "mlp"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_class_maps_match_naive_reference(key, pool, head_kind):
    bb, head, images = setup(key, pool, head_kind)
    targets = torch.tensor([[0, 4], [2, 2], [3, 1]])  # several targets per image, different per image
    maps = CDAM(bb, head).class_maps(images, targets)
    gh, gw = bb.grid_size(*images.shape[-2:])
    assert maps.shape == (3, 2, gh, gw) and gh != gw
    for k in range(2):
        ref = naive_cdam(bb, lambda e, k=k: head(e).gather(1, targets[:, k:k + 1])[:, 0], images)
        assert rel_err(maps[:, k].double(), ref) < RTOL
    # one target per backward (the smallest memory budget) gives the same maps
    assert rel_err(CDAM(bb, head, max_elements=1).class_maps(images, targets).double(), maps.double()) < 1e-6


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_concept_maps_match_naive_reference(key, pool, similarity):
    bb, head, images = setup(key, pool)
    ex_imgs = torch.randn(3, 3, *images.shape[-2:], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    names, vecs = concept_vectors(bb, {"a": ex_imgs[:2], "b": [ex_imgs[2]]})
    assert names == ["a", "b"] and vecs.shape == (2, bb.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(vecs[0], feature_by_hand(bb, pool, bb.embed(ex_imgs[:2])).mean(0))
    cmaps = CDAM(bb, head).concept_maps(images, vecs, similarity=similarity)
    for m, v in enumerate(vecs):
        def score(e, v=v):
            return e @ v if similarity == "dot" else nn.functional.cosine_similarity(e, v[None], dim=-1)

        assert rel_err(cmaps[:, m].double(), naive_cdam(bb, score, images)) < RTOL


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_smooth_cdam_matches_reference_with_same_noise(key, pool):
    bb, head, images = setup(key, pool, "mlp")
    n, lam = 4, 0.1
    _, vecs = concept_vectors(bb, {"c": images[:1]})
    ex = CDAM(bb, head, max_elements=20_000).explain(  # tiny budget: chunks over samples and targets
        images, targets=[1, 2], concepts=vecs, similarity="cosine", variant="smooth", n_samples=n, noise=lam,
        generator=torch.Generator().manual_seed(7))
    fns = [lambda e: head(e)[:, 1], lambda e: head(e)[:, 2],
           lambda e: nn.functional.cosine_similarity(e, vecs[0][None], dim=-1)]
    for row, fn in enumerate(fns):  # every row sees the same noise: a fresh generator per row here
        gen = torch.Generator().manual_seed(7)
        ref = sum(naive_cdam(bb, fn, images, lambda z, i=i, gen=gen: _noisy(z, i, gen, lam)) for i in range(n)) / n
        assert rel_err(ex.maps[:, row].double(), ref) < RTOL


@pytest.mark.parametrize("noise", [0.0, 0.05])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_integrated_cdam_matches_reference(key, pool, noise):
    bb, head, images = setup(key, pool)
    m = 5
    maps = CDAM(bb, head).class_maps(images, [3, 0], variant="integrated", n_steps=m, noise=noise,
                                     generator=torch.Generator().manual_seed(2))
    for row, cls in enumerate([3, 0]):
        gen = torch.Generator().manual_seed(2)
        def path(k):  # the k-th point of the path from zero to z, with the engine's noise draw when noise > 0
            return (lambda z, g=gen: _noisy(z, k, g, noise, k / m)) if noise else (lambda z: z * k / m)

        ref = sum(naive_cdam(bb, lambda e, c=cls: head(e)[:, c], images, path(k)) for k in range(1, m)) / (m - 1)
        assert rel_err(maps[:, row].double(), ref) < RTOL


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_one_explain_call_gives_logits_classes_concepts_and_attention(key, pool):
    bb, head, images = setup(key, pool, "mlp")
    _, vecs = concept_vectors(bb, {"c": images[1:]})
    ex = CDAM(bb, head).explain(images, targets=lambda lg: lg.topk(3).indices, concepts=vecs, attention=True)
    with torch.no_grad():
        emb = feature_by_hand(bb, pool, bb.embed(images))
        logits = head(emb)
    torch.testing.assert_close(ex.embeddings, emb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ex.logits, logits, rtol=1e-10, atol=1e-10)
    assert torch.equal(ex.targets, logits.topk(3).indices)
    for k in range(3):
        ref = naive_cdam(bb, lambda e, k=k: head(e).gather(1, ex.targets[:, k:k + 1])[:, 0], images)
        assert rel_err(ex.class_maps[:, k].double(), ref) < RTOL
    assert rel_err(ex.concept_maps[:, 0].double(), naive_cdam(bb, lambda e: e @ vecs[0], images)) < RTOL
    # the attention map stays the last block's CLS-query attention, whatever the head reads
    blk, captured = bb.model.blocks[-1], {}
    hook = blk.norm1.register_forward_hook(lambda m, i, o: captured.__setitem__("t", o))
    with torch.no_grad():
        bb(images)
    hook.remove()
    a, t = blk.attn, captured["t"]
    qkv = a.qkv(t).reshape(t.shape[0], t.shape[1], 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    probs = ((qkv[0] * a.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)  # [B, h, T, T]
    ref = probs[:, :, 0, PREFIX[key]:].reshape(3, a.num_heads, 2, 3)
    torch.testing.assert_close(ex.attention, ref, rtol=1e-10, atol=1e-12)


# ================================================================================================ other methods


@pytest.mark.parametrize("pool", POOLS)
def test_every_registered_method_runs_on_pooled_features(pool):
    bb, head, images = setup("p14reg", pool, b=2)
    targets = torch.tensor([[0, 4], [2, 2]])
    for name in registry.names():
        m = registry.get(name)
        maps = m(bb, head, images, targets, **m.params_from({"n_samples": 2, "n_steps": 3}))
        assert maps.shape == (2, 2, 2, 3) and maps.dtype == torch.float32, name
        assert torch.isfinite(maps).all() and maps.abs().max() > 0, name
        if not m.signed:
            assert (maps >= 0).all(), name
        if not m.class_specific:
            assert torch.equal(maps[:, 0], maps[:, 1]), name
    assert torch.equal(registry.get("cdam")(bb, head, images, targets), CDAM(bb, head).class_maps(images, targets))


def naive_pooled_tam(bb, pool, head, images, targets):
    """One forward per (image, removed token), pooled by hand."""
    p = bb.num_prefix_tokens
    gh, gw = bb.grid_size(*images.shape[-2:])
    out = torch.zeros(images.shape[0], targets.shape[1], gh * gw, dtype=torch.float64)
    with torch.no_grad():
        for b in range(images.shape[0]):
            tok = bb.embed(images[b:b + 1])
            full = head(feature_by_hand(bb, pool, tok))[0, targets[b]]
            for i in range(gh * gw):
                seq = torch.cat([tok[:, :p + i], tok[:, p + i + 1:]], 1)
                out[b, :, i] = full - head(feature_by_hand(bb, pool, seq))[0, targets[b]]
    return out.view(images.shape[0], -1, gh, gw)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_tam_equals_its_naive_loop(key, pool):
    bb, head, images = setup(key, pool, b=2)
    targets = torch.tensor([[0, 4], [2, 2]])
    ref = naive_pooled_tam(bb, pool, head, images, targets)
    assert (ref < 0).any() and (ref > 0).any()
    for maps in (token_ablation_map(bb, head, images, targets), token_ablation_map(bb, head, images, targets,
                                                                                    chunk_size=4),
                 naive_token_ablation_map(bb, head, images, targets)):
        assert maps.shape == ref.shape and rel_err(maps.double(), ref) < 1e-5


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("key", KEYS)
def test_deletion_metrics_on_pooled_features(key, pool):
    bb, head, images = setup(key, pool, b=2)
    p, n = PREFIX[key], 6
    targets = torch.tensor([[0, 2], [1, 1]])
    maps = torch.randn(2, 2, 2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    curves = deletion_curves(bb, head, images, targets, maps, steps=3, mode="token")
    assert curves.shape == (2, 2, 2, 4) and torch.isfinite(curves).all()
    with torch.no_grad():
        for b in range(2):
            tok = bb.embed(images[b:b + 1])
            for k in range(2):
                rank = torch.argsort(maps[b, k].flatten(), descending=True).tolist()
                for s in range(4):
                    for order, ranked in enumerate((rank, rank[::-1])):
                        gone = set(ranked[:round(s * n / 3)])  # the last step deletes every patch: empty mean = 0
                        keep = [t for t in range(p + n) if t < p or (t - p) not in gone]
                        ref = head(feature_by_hand(bb, pool, tok[:, keep]))[0, targets[b, k]].item()
                        assert curves[b, k, order, s].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    pixel = deletion_curves(bb, head, images, targets, maps, steps=3, mode="pixel", replace="mean")
    assert pixel.shape == (2, 2, 2, 4) and torch.isfinite(pixel).all()
    remove = torch.tensor([[[0, 5], [2, 3]], [[1, 4], [0, 1]]])  # [B, R=2, n=2]
    emb = embed_without_tokens(bb, images, remove)
    assert emb.shape == (2, 2, bb.feature_dim)
    with torch.no_grad():
        for b in range(2):
            tok = bb.embed(images[b:b + 1])
            for r in range(2):
                keep = [t for t in range(p + n) if t < p or (t - p) not in remove[b, r].tolist()]
                torch.testing.assert_close(emb[b, r], feature_by_hand(bb, pool, tok[:, keep])[0])
    top, rand = deletion_drop(bb, head, images, maps[:, 0], targets[:, 0], fraction=0.3, n_random=2)
    assert top.shape == rand.shape == (2,) and torch.isfinite(top).all() and torch.isfinite(rand).all()


# ================================================================================================ training path


def _train(out, *overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_training(tiny_config(out, *overrides))


COMMON = ("backbone.img_size=[32,48]", "trainer.max_epochs=2", "explain.enabled=true", "explain.num_images=2")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny pooled runs on digits at 32 x 48 px (2 x 3 tokens), both with the explanation callback: avg with a
    linear head, the feature cache and class-mean concepts; cls+avg with an MLP head, no cache."""
    base = tmp_path_factory.mktemp("pooled")
    return {
        "avg": _train(base / "avg", *COMMON, "backbone.pool=avg", "cache.enabled=true",
                      "explain.class_mean_concepts=true", "explain.max_class_mean_images=100000"),
        "cls+avg": _train(base / "cls_avg", *COMMON, "backbone.pool=cls+avg", "head.kind=mlp",
                          "head.hidden=[32]"),
        "avg_cache": base / "avg" / "cache",  # tiny_config's cache.dir
    }


@pytest.mark.parametrize("pool", POOLS)
def test_checkpoints_record_the_pooling_and_rebuild_it(runs, pool):
    result = runs[pool]
    ckpt = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["cdam_pl"]["backbone"]["pool"] == pool and ckpt["cdam_pl"]["config"]["backbone"]["pool"] == pool
    loaded = load_checkpoint(result["last_checkpoint"])
    assert loaded.backbone.pooling == pool and loaded.backbone.identity == result["module"].backbone.identity
    first = next(m for m in loaded.head.modules() if isinstance(m, nn.Linear))
    assert first.in_features == loaded.backbone.feature_dim == {"avg": 64, "cls+avg": 128}[pool]
    x = torch.randn(4, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded.head(loaded.backbone(x)), result["module"].eval()(x))


def test_checkpoint_without_a_pooling_reads_as_cls(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    del ckpt["cdam_pl"]["backbone"]["pool"]  # written before pooling existed
    torch.save(ckpt, tmp_path / "old.ckpt")
    assert load_checkpoint(tmp_path / "old.ckpt").backbone.pooling == "cls"


def test_feature_cache_key_differs_between_poolings(runs, tmp_path):
    keys = {}
    for pool in POOLINGS:
        cfg = tiny_config(tmp_path, *COMMON, f"backbone.pool={pool}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bb = build_backbone(cfg)
            data = build_datamodule(cfg, bb)
        data.setup()
        ds = data.eval_dataloader("train").dataset
        keys[pool] = cache_key(bb.identity, data.eval_transform_id, ds.ids, {"dtype": cfg.cache.dtype})
    assert len(set(keys.values())) == 3
    # the avg run cached its training features under its own key, and only there
    found = {d.name for d in Path(runs["avg_cache"]).iterdir() if d.is_dir()}
    assert keys["avg"][:16] in found and keys["cls"][:16] not in found and keys["cls+avg"][:16] not in found


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_resume_with_another_pooling_is_refused_in_one_line(runs, tmp_path, capsys):
    ckpt = runs["avg"]["last_checkpoint"]
    with pytest.raises(CheckpointError) as e:
        check_backbone_matches(torch.load(ckpt, weights_only=True)["cdam_pl"]["backbone"],
                               tiny_backbone("p16", img_size=(32, 48), perturb=False))
    assert str(e.value) == ("the head reads the 'avg' feature of its backbone, this backbone pools 'cls'; "
                            "set backbone.pool=avg")
    config = tmp_path / "run.yaml"  # train.py with the same settings, but the default pooling
    config.write_text(OmegaConf.to_yaml(tiny_config(tmp_path / "out", *COMMON)))
    assert train.main(["--config", str(config), f"resume={ckpt}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {e.value}"
    assert not (tmp_path / "out" / "cache").exists()  # refused before any feature extraction


@pytest.mark.parametrize("pool", POOLS)
def test_explanation_callback_runs_on_a_pooled_run(runs, pool):
    result = runs[pool]
    cb = next(c for c in result["trainer"].callbacks if isinstance(c, ExplanationCallback))
    bb, head = result["module"].backbone, result["module"].head.eval()
    assert cb.last is not None and len(cb.history) == 3  # before training, then once per epoch
    with torch.no_grad():
        logits = head(bb(cb.images))
    targets = torch.cat([cb.labels[:, None], logits.topk(3).indices], 1)
    assert torch.equal(cb.last.targets, targets)
    torch.testing.assert_close(cb.last.class_maps, CDAM(bb, head).class_maps(cb.images, targets),
                               rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(v) for v in cb.last.scalars.values())
    if pool == "avg":  # class means: the mean pooled feature of every training image of the class
        assert cb.class_mean_source == "feature cache" and cb._vectors.shape[1] == bb.feature_dim
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = build_datamodule(tiny_config("unused", *COMMON), bb)
        data.setup()
        train_set = data.train_dataset.with_transform(data.eval_transform)
        for row, label in enumerate(sorted(set(cb.labels.tolist()))):
            idx = [i for i, t in enumerate(train_set.targets) if t == label]
            with torch.no_grad():
                ref = bb(torch.stack([train_set[i][0] for i in idx])).mean(0)
            torch.testing.assert_close(cb._vectors[row], ref, rtol=1e-5, atol=1e-5)
        assert cb.last.concept_maps.shape == (2, len(cb.concept_names), 2, 3)


def _pngs(folder, n, seed, size=(40, 56)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return sorted(folder.iterdir())


@pytest.mark.parametrize("pool", POOLS)
def test_explain_py_maps_equal_the_library_on_a_pooled_checkpoint(runs, pool, tmp_path, capsys):
    ckpt = runs[pool]["last_checkpoint"]
    _pngs(tmp_path / "imgs", 3, 0)
    concept = tmp_path / "blob"
    _pngs(concept, 2, 1)
    methods = registry.names()
    rc = explain.main([ckpt, str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--methods", ",".join(methods),
                       "--concept", f"blob={concept}", "--targets", "top2", "--n-samples", "3", "--n-steps", "4",
                       "--seed", "5", "--batch-size", "8", "--no-panels", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["backbone"]["pool"] == pool
    z = load_explanations(tmp_path / "o")
    model = load_checkpoint(ckpt)
    dc = model.backbone.data_config
    tf = build_transform(model.backbone.img_size, dc["mean"], dc["std"], dc["interpolation"])
    x = torch.stack([tf(load_image(r["path"])) for r in manifest["images"]])
    _, vectors = concept_vectors(model.backbone, {"blob": torch.stack([tf(load_image(p)) for p in concept.iterdir()])})
    cdam = CDAM(model.backbone, model.head)

    def top2(logits):
        return logits.topk(2, dim=1).indices

    params = {m["name"]: m["params"] for m in manifest["methods"]}
    expected = {"attention": cdam.explain(x, attention=True).attention.mean(1, keepdim=True)}
    for name in ("cdam", "smooth", "integrated"):
        kw = {k: v for k, v in params[name].items() if k != "seed"}
        expected[name] = cdam.explain(x, targets=top2, concepts=vectors, variant=registry.get(name).variant,
                                      generator=torch.Generator().manual_seed(5), **kw).maps
    with torch.no_grad():
        targets = top2(model.head(model.backbone(x)))
    for name in ("rp", "tam", "ig", "smoothgrad", "ixg"):
        expected[name] = registry.get(name)(model.backbone, model.head, x, targets, **params[name])
    assert set(expected) == set(methods)
    for b, r in enumerate(manifest["images"]):
        np.testing.assert_array_equal(z[r["path"]].targets, targets[b].numpy())
        for name, maps in expected.items():
            got = z[r["path"]].maps[name]
            assert got.shape[-2:] == (2, 3), name
            np.testing.assert_allclose(got, maps[b].numpy(), rtol=1e-4, atol=1e-6 * max(1.0, float(maps.abs().max())),
                                       err_msg=name)


@pytest.mark.parametrize("pool", POOLS)
def test_web_demo_explains_a_pooled_checkpoint(runs, pool):
    model = load_checkpoint(runs[pool]["last_checkpoint"])
    engine = DemoEngine(model, n_samples=3, n_steps=4)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    summary = engine.add_image(img, "noise.png")
    assert summary["grid"] == [2, 3] and summary["input_size"] == [32, 48]
    x = build_transform(model.backbone.img_size, **model.backbone.data_config)(img)[None]
    cdam = CDAM(model.backbone, model.head)
    top = summary["top"][0]["index"]
    assert rel_err(torch.as_tensor(engine.map(summary["id"], f"c{top}")).double(),
                   naive_cdam(model.backbone, lambda e: model.head(e)[:, top], x)[0].double()) < 1e-4
    smooth = cdam.class_maps(x, [top], variant="smooth", n_samples=3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(engine.map(summary["id"], f"c{top}", "smooth"), smooth[0, 0].numpy(), rtol=1e-5,
                               atol=1e-7)
    flipped, buf = img.transpose(Image.FLIP_LEFT_RIGHT), io.BytesIO()
    flipped.save(buf, format="PNG")
    info = engine.add_concept("flipped", [("f.png", buf.getvalue())])
    tf = build_transform(model.backbone.img_size, **model.backbone.data_config)
    _, vectors = concept_vectors(model.backbone, {"f": tf(flipped)[None]})
    assert vectors.shape == (1, model.backbone.feature_dim)
    np.testing.assert_allclose(engine.map(summary["id"], info["target"]), cdam.concept_maps(x, vectors)[0, 0].numpy(),
                               rtol=1e-5, atol=1e-7)
