"""The comparison methods against hand-checked references on tiny depth-2 ViTs (float64 models, so differences are
of the mathematics, not of rounding): TAM against one forward per removed token, RP against the rule written out
on a hand-coded forward pass, captum's IG/SmoothGrad/IxG against completeness and direct autograd, and the
registry's engine entries against the engine itself."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdam_pl.errors import CdamError
from cdam_pl.explain import CDAM, attention_maps, registry
from cdam_pl.explain._vit import pool_to_grid
from cdam_pl.explain.input_space import input_x_gradient, integrated_gradients, smoothgrad
from cdam_pl.explain.rp import recording_attention, relevance_propagation
from cdam_pl.explain.tam import naive_token_ablation_map, token_ablation_map
from tests.conftest import tiny_backbone

TARGETS = torch.tensor([[0, 4], [2, 2]])  # different targets per image, a repeated one


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def setup(key="p16", b=2, dtype=torch.float64):
    bb = tiny_backbone(key).to(dtype)
    torch.manual_seed(3)
    head = nn.Linear(bb.embed_dim, 5).to(dtype).eval()
    h, w = bb.img_size
    images = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return bb, head, images


# --- TAM ----------------------------------------------------------------------------------------------------------
def naive_tam(bb, head, images, targets):
    """One forward per (image, removed token): torch.cat the sequence without token i, run the model's blocks."""
    m, p = bb.model, bb.num_prefix_tokens
    gh, gw = bb.grid_size(*images.shape[-2:])
    out = torch.zeros(images.shape[0], targets.shape[1], gh * gw, dtype=torch.float64)
    with torch.no_grad():
        for b in range(images.shape[0]):
            tok = bb.embed(images[b:b + 1])  # [1, T, D]

            def logit(x):
                for blk in m.blocks:
                    x = blk(x)
                return head(m.norm(x)[:, 0])[0, targets[b]]

            full = logit(tok)
            for i in range(gh * gw):
                out[b, :, i] = full - logit(torch.cat([tok[:, :p + i], tok[:, p + i + 1:]], 1))
    return out.view(images.shape[0], -1, gh, gw)


@pytest.mark.parametrize("key", ["p16", "p14reg"])
def test_tam_equals_explicit_per_token_removal(key):
    bb, head, images = setup(key)
    ref = naive_tam(bb, head, images, TARGETS)
    maps = token_ablation_map(bb, head, images, TARGETS)
    assert maps.shape == ref.shape and maps.dtype == torch.float32
    assert rel_err(maps, ref) < 1e-5
    assert (ref < 0).any() and (ref > 0).any()  # signed
    # chunks that cut across images (3 removals per forward) give the same numbers
    assert rel_err(token_ablation_map(bb, head, images, TARGETS, chunk_size=3), ref) < 1e-5
    assert rel_err(naive_token_ablation_map(bb, head, images, TARGETS), ref) < 1e-5  # the benchmarks' baseline


# --- RP -----------------------------------------------------------------------------------------------------------
def direct_rp(bb, head, image, target):
    """Chefer's rule written out: a hand-coded forward (weights only, no timm modules) with the input requiring
    grad, A per head with retain_grad, one backward, then R = I; R += mean_h(clamp(grad*A, 0)) @ R."""
    m, d = bb.model, bb.embed_dim
    x = bb.embed(image[None]).detach().requires_grad_()  # [1, T, D]
    t, attn_per_block = x.shape[1], []
    h = x
    for blk in m.blocks:
        a = blk.attn
        n1 = F.layer_norm(h, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)[0]  # [T, D]
        q, k, v = (n1 @ a.qkv.weight.T + a.qkv.bias).split(d, -1)
        heads, outs = [], []
        for j in range(a.num_heads):
            sl = slice(j * a.head_dim, (j + 1) * a.head_dim)
            probs = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(a.head_dim), -1)  # [T, T]
            probs.retain_grad()
            heads.append(probs)
            outs.append(probs @ v[:, sl])
        attn_per_block.append(heads)
        g1 = getattr(blk.ls1, "gamma", 1.0)
        h = h + g1 * (torch.cat(outs, -1) @ a.proj.weight.T + a.proj.bias)
        n2 = F.layer_norm(h, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        g2 = getattr(blk.ls2, "gamma", 1.0)
        h = h + g2 * (F.gelu(n2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)
    cls = F.layer_norm(h[:, 0], (d,), m.norm.weight, m.norm.bias, m.norm.eps)
    logits = head(cls)[0]
    logits[target].backward()
    r = torch.eye(t, dtype=x.dtype)
    for heads in attn_per_block:
        cam = sum((p.grad * p).clamp(min=0) for p in heads) / len(heads)
        r = r + cam @ r
    return logits.detach(), r[0, bb.num_prefix_tokens:].detach()


@pytest.mark.parametrize("key", ["p16", "p14reg"])
def test_rp_equals_direct_implementation_of_the_rule(key):
    bb, head, images = setup(key)
    maps = relevance_propagation(bb, head, images, TARGETS)
    gh, gw = bb.grid_size(*images.shape[-2:])
    assert maps.shape == (2, 2, gh, gw)
    for b in range(2):
        for k in range(2):
            logits, ref = direct_rp(bb, head, images[b], int(TARGETS[b, k]))
            assert torch.allclose(logits, head(bb(images[b:b + 1]))[0], atol=1e-10)  # the hand forward is the model
            assert rel_err(maps[b, k].flatten(), ref) < 1e-5
    assert (maps >= 0).all() and not torch.equal(maps[:, 0], maps[:, 1])


def test_rp_restores_fused_attention_even_after_an_error():
    bb, head, images = setup("p16")
    attn = bb.model.blocks[0].attn
    with pytest.raises(RuntimeError, match="boom"):
        with recording_attention(bb) as probs:
            bb(images)
            assert len(probs) == 2 and probs[0].shape == (2, 4, 7, 7)
            raise RuntimeError("boom")
    assert "forward" not in attn.__dict__  # the class's (fused) forward is back


# --- captum input-space methods -----------------------------------------------------------------------------------
def test_pool_to_grid_sums_channels_and_patch_pixels():
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    grid = pool_to_grid(x, 16)
    assert grid.shape == (2, 2, 3)
    assert torch.allclose(grid[1, 1, 2], x[1, :, 16:32, 32:48].sum())


def test_ig_completeness_gap_within_captum_convergence_delta():
    bb, head, images = setup("p16")
    maps, delta = integrated_gradients(bb, head, images, TARGETS, n_steps=50, return_delta=True)
    with torch.no_grad():
        gain = (head(bb(images)) - head(bb(torch.zeros_like(images)))).gather(1, TARGETS)  # f(x) - f(0), [B, K]
    gap = (maps.double().sum((2, 3)) - gain).abs()
    assert (gap <= delta.abs() + 1e-5 * gain.abs().max()).all()
    assert (delta.abs() < 0.05 * gain.abs()).all()  # 50 steps converge on this model


def grad_pooled(bb, head, images, targets, times_input):
    """Direct autograd: d logit / d image (optionally times the image), pooled to tokens -> [B, K, gh, gw]."""
    maps = []
    for k in range(targets.shape[1]):
        x = images.clone().requires_grad_()
        head(bb(x)).gather(1, targets[:, k:k + 1]).sum().backward()
        maps.append(pool_to_grid(x.grad * (x.detach() if times_input else 1), bb.patch_size))
    return torch.stack(maps, 1)


def test_input_x_gradient_matches_direct_autograd():
    bb, head, images = setup("p16")
    ref = grad_pooled(bb, head, images, TARGETS, times_input=True)
    assert rel_err(input_x_gradient(bb, head, images, TARGETS), ref) < 1e-5


def test_smoothgrad_is_signed_seeded_and_reduces_to_the_gradient_without_noise():
    bb, head, images = setup("p16")
    ref = grad_pooled(bb, head, images, TARGETS, times_input=False)
    assert rel_err(smoothgrad(bb, head, images, TARGETS, n_samples=3, noise=0.0), ref) < 1e-5
    a = smoothgrad(bb, head, images, TARGETS, n_samples=8, seed=1)
    assert torch.equal(a, smoothgrad(bb, head, images, TARGETS, n_samples=8, seed=1))
    assert not torch.equal(a, smoothgrad(bb, head, images, TARGETS, n_samples=8, seed=2))
    assert (a < 0).any() and (a > 0).any()


# --- registry -----------------------------------------------------------------------------------------------------
def test_registry_engine_entries_are_the_engine():
    bb, head, images = setup("p14reg", dtype=torch.float32)
    cdam = CDAM(bb, head)
    assert torch.equal(registry.get("cdam")(bb, head, images, TARGETS), cdam.class_maps(images, TARGETS))
    g = torch.Generator().manual_seed(5)
    ref = cdam.class_maps(images, TARGETS, variant="smooth", n_samples=4, noise=0.05, generator=g)
    got = registry.get("smooth")(bb, head, images, TARGETS, n_samples=4, seed=5)
    assert torch.equal(got, ref)
    ref = cdam.class_maps(images, TARGETS, variant="integrated", n_steps=6)
    assert torch.equal(registry.get("integrated")(bb, head, images, TARGETS, n_steps=6), ref)
    am = registry.get("attention")(bb, head, images, TARGETS)
    assert am.shape == (2, 2, *bb.grid_size(*images.shape[-2:]))
    assert torch.equal(am[:, 0], attention_maps(bb, images).mean(1)) and torch.equal(am[:, 0], am[:, 1])


def test_every_method_has_the_uniform_signature_and_shape():
    bb, head, images = setup("p8", dtype=torch.float32)
    gh, gw = bb.grid_size(*images.shape[-2:])
    fast = {"smooth": {"n_samples": 2}, "integrated": {"n_steps": 3}, "ig": {"n_steps": 3},
            "smoothgrad": {"n_samples": 2}}
    assert registry.names() == ["cdam", "smooth", "integrated", "attention", "rp", "tam", "ig", "smoothgrad", "ixg"]
    with torch.inference_mode():  # callers inside validation loops
        for name in registry.names():
            m = registry.get(name)
            maps = m(bb, head, images, TARGETS, **fast.get(name, {}))
            assert maps.shape == (2, 2, gh, gw) and maps.dtype == torch.float32, name
            assert torch.isfinite(maps).all(), name
            if not m.signed:
                assert (maps >= 0).all(), name
            # one list of classes for every image gives the same as the [B, K] tensor
            same = m(bb, head, images, [0, 4], **fast.get(name, {}))
            assert torch.allclose(same[0], maps[0], atol=1e-6), name


def test_each_method_carries_its_facts():
    """What explain.py, the benchmark and the web demo read from the registry."""
    m = {n: registry.get(n) for n in registry.names()}
    assert m["smooth"].defaults == {"n_samples": 50, "noise": 0.05, "seed": 0} and m["smooth"].samples == "n_samples"
    assert m["integrated"].defaults == {"n_steps": 50, "noise": 0.0, "seed": 0} and m["integrated"].samples == "n_steps"
    assert m["ig"].defaults == {"n_steps": 50, "baseline": 0.0} and m["ig"].samples == "n_steps"
    assert m["smoothgrad"].defaults == {"n_samples": 50, "noise": 0.15, "seed": 0}
    assert [n for n, x in m.items() if x.takes_concepts] == ["cdam", "smooth", "integrated"]
    assert [n for n, x in m.items() if not x.signed] == ["attention", "rp"]
    assert [n for n, x in m.items() if not x.class_specific] == ["attention"]
    assert {n: x.variant for n, x in m.items() if x.variant} == {"cdam": "vanilla", "smooth": "smooth",
                                                                 "integrated": "integrated"}
    assert m["smooth"].params(n_samples=None, noise=0.1) == {"n_samples": 50, "noise": 0.1, "seed": 0}
    kw = m["smooth"].kwargs(m["smooth"].params(seed=3), "cpu")
    assert set(kw) == {"n_samples", "noise", "generator"}
    expected = torch.randn(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.randn(4, generator=kw["generator"]), expected)
    assert m["smoothgrad"].kwargs(m["smoothgrad"].params(seed=3), "cpu")["seed"] == 3  # captum's own forked RNG


def test_registry_errors_are_one_line_and_helpful():
    bb, head, images = setup("p16", dtype=torch.float32)
    with pytest.raises(CdamError, match="did you mean tam"):
        registry.get("tma")
    assert registry.get("Smooth-CDAM").name == "smooth"  # old spellings are aliases of the canonical names
    assert [registry.get(a).name for a in ("smooth_cdam", "integrated_cdam", "am")] == ["smooth", "integrated",
                                                                                         "attention"]
    notes = []
    assert [m.name for m in registry.parse_methods("am,cdam,attention", note=notes.append)] == ["attention", "cdam"]
    assert notes == ["method 'am' is called 'attention'"]
    with pytest.raises(CdamError, match="has no parameter 'n_step'.*n_steps"):
        registry.get("ig")(bb, head, images, TARGETS, n_step=3)
    for name in ("tam", "rp", "ixg", "cdam"):
        with pytest.raises(CdamError, match="index 7 is out of range: the head has 5 classes"):
            registry.get(name)(bb, head, images, torch.tensor([[0], [7]]))


# --- the benchmark, end to end ------------------------------------------------------------------------------------
def test_benchmark_quick_end_to_end(tiny_checkpoint, tmp_path):
    import csv
    import math

    from PIL import Image

    from cdam_pl.benchmark import CONTROL, main
    from cdam_pl.data import FASHION_MNIST_ROOT

    if not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "bench"
    assert main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--quick", "--n-samples", "4"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    expected = registry.names() + [CONTROL]
    for s in ("fmnist", "composites", "photos"):
        assert [r["method"] for r in rows if r["set"] == s] == expected
    for r in rows:
        # v1 <= symmetric on every map: its threshold 0.05 max(s) <= 0.05 max|s|, and it is strict
        assert 0.0 <= float(r["compactness_v1"]) <= float(r["compactness_symmetric"]) <= 1.0
        assert -1.0 <= float(r["top12_correlation"]) <= 1.0
        assert math.isfinite(float(r["fidelity_token"])) and math.isfinite(float(r["fidelity_pixel"]))
        assert int(r["n_images"]) == 2
        seconds = float(r["seconds_per_image"])
        assert math.isnan(seconds) if r["method"] == CONTROL else seconds > 0
        share = float(r["evidence_in_object"])
        assert (0.0 <= share <= 1.0) if r["set"] == "composites" else math.isnan(share)
        if r["method"] == "attention":
            assert float(r["top12_correlation"]) == pytest.approx(1.0)  # class-agnostic by construction
    md = (out / "results.md").read_text()
    for label in [registry.get(n).label for n in registry.names()]:
        assert md.count(f"| {label} |") == 3  # one row per set
    assert "compactness_v1 (the paper's rule), paper order CDAM > TAM > AM > RP" in md and "TAM speed" in md
    assert "| compactness_v1 ↑ | compactness_symmetric ↑ |" in md
    with Image.open(out / "grid.png") as im:
        assert im.width > im.height > 200  # 6 image rows x 10 columns


def test_benchmark_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from cdam_pl.benchmark import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no demo checkpoint" in err and "configs/demo.yaml" in err
    assert main(["--checkpoint", "nope.ckpt"]) == 2
    assert "checkpoint 'nope.ckpt' not found" in capsys.readouterr().err
    assert main(["--checkpoint", "nope.ckpt", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["--methods", "cdam,tma"]) == 2
    assert "did you mean tam" in capsys.readouterr().err
    assert main(["--sets", "fmnist,cifar"]) == 2
    assert "unknown image set 'cifar'" in capsys.readouterr().err
