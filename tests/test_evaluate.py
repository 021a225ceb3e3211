"""The evaluation (python -m cdam_pl.evaluate): its image sets, its statistics and a --quick run end to end."""
import csv
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cdam_pl.data import FASHION_MNIST_ROOT
from cdam_pl.data.datamodule import ImageDataModule
from cdam_pl.errors import DataError
from cdam_pl.evaluate import data as D
from cdam_pl.evaluate.stats import align, bootstrap_mean, bootstrap_statistic, paired_difference
from cdam_pl.explain import registry
from cdam_pl.metrics.sensitivity import pooled_correlation

from .conftest import tiny_config

HAVE_FMNIST = (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST is not installed "
                                  "(apt-get install dataset-fashion-mnist)")
VAL_SIZE = 100


@pytest.fixture(scope="module")
def fmnist_checkpoint(tmp_path_factory):
    """A tiny head trained on Fashion-MNIST at 64 px (a 4 x 4 token grid, the smallest the evaluation supports),
    validated on a seeded subset of the test split."""
    from cdam_pl.train.run import run_training

    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path_factory.mktemp("fmnist_run")
    cfg = tiny_config(out, "data.name=fashion_mnist", "data.train_size=200", f"data.val_size={VAL_SIZE}",
                      "backbone.img_size=64", "trainer.max_epochs=1", "seed=3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_training(cfg)["last_checkpoint"]


@pytest.fixture(scope="module")
def model(fmnist_checkpoint):
    from cdam_pl.checkpoint import load_checkpoint

    return load_checkpoint(fmnist_checkpoint)


# --- data ---------------------------------------------------------------------------------------------------------
def test_tile_grid_puts_tiles_in_reading_order():
    tiles = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 5)  # tile t is filled with t
    img = D.tile_grid(tiles, 2, 2)
    assert img.shape == (3, 4, 10)
    assert [img[0, r, c].item() for r, c in ((0, 0), (0, 5), (2, 0), (3, 9))] == [0, 1, 2, 3]


def test_token_masks_half_and_any_rules():
    px = torch.zeros(4, 8, dtype=torch.bool)  # two 4x4 patches side by side
    px[:2, :4] = True  # left patch: exactly half foreground
    px[0, 7] = True  # right patch: one pixel
    half, anyp = D.token_masks(px, 4)
    assert half.tolist() == [[True, False]] and anyp.tolist() == [[True, True]]


@needs_fmnist
def test_heldout_images_exclude_the_validation_subset(model):
    test = D.fashion_mnist(model)
    dm = ImageDataModule("fashion_mnist", train_size=200, val_size=VAL_SIZE, img_size=64, seed=3)
    dm.setup()  # the split train.py validated the head on, built independently of the evaluation
    val = {int(i.rsplit("/", 1)[1]) for i in dm.val_dataset.ids}
    assert len(val) == VAL_SIZE
    pool = D.holdout_pool(model, test)
    assert len(pool) == len(test) - VAL_SIZE and not val & set(pool)
    idx = D.heldout_indices(test, pool, 50, seed=0)
    assert len(set(idx)) == 50 and not val & set(idx)
    assert idx == D.heldout_indices(test, pool, 50, seed=0) != D.heldout_indices(test, pool, 50, seed=1)
    assert sorted({test.targets[i] for i in idx}) == list(range(10))  # stratified
    with pytest.raises(DataError, match="only 9900 .* held out"):
        D.heldout_indices(test, pool, 9901, seed=0)


@needs_fmnist
def test_masks_match_the_items_foreground(model):
    test = D.fashion_mnist(model)
    idx = [0, 1, 2]
    s = D.fmnist_set(model, test, idx, lambda x: torch.zeros(len(x), 2, dtype=torch.long))
    h, w = model.backbone.img_size
    p = model.backbone.patch_size
    assert s.masks.shape == (3, 2, h // p, w // p) == s.masks_any.shape
    for b, i in enumerate(idx):
        raw = np.asarray(test.images[i]) > 0
        rows, cols = np.arange(h) * 28 // h, np.arange(w) * 28 // w  # nearest neighbour, 28 px -> the tile
        px = raw[rows][:, cols]
        frac = px.reshape(h // p, p, w // p, p).mean((1, 3))
        assert np.array_equal(s.masks[b, 0].numpy(), frac >= 0.5)
        assert np.array_equal(s.masks_any[b, 1].numpy(), frac > 0)
        assert 0 < s.masks[b, 0].sum() <= s.masks_any[b, 0].sum() <= (h // p) * (w // p)


@needs_fmnist
def test_mosaic_layout_two_target_tiles_and_a_doubled_grid(model):
    test = D.fashion_mnist(model)
    pool = D.holdout_pool(model, test)
    s = D.mosaic_set(model, test, pool, 6, seed=0)
    h, w = model.backbone.img_size
    gh, gw = model.backbone.grid_size(h, w)
    assert s.images.shape == (6, 3, 2 * h, 2 * w) and s.masks.shape == (6, 1, 2 * gh, 2 * gw)
    src = D.TileSource(model, test, pool)
    for b in range(6):
        items = [int(t.split("/")[1]) for t in s.ids[b].split("+")]
        labels = [test.targets[i] for i in items]
        target = s.targets[b, 0].item()
        assert s.tiles[b].tolist() == [lab == target for lab in labels] and s.tiles[b].sum() == 2
        assert len(set(labels)) == 3 and not set(items) - set(pool)  # two other classes, all held out
        for t, i in enumerate(items):
            r, c = divmod(t, 2)
            assert torch.equal(s.images[b, :, r * h:(r + 1) * h, c * w:(c + 1) * w], src.image(i))
            quad = s.masks_any[b, 0, r * gh:(r + 1) * gh, c * gw:(c + 1) * gw]
            assert bool(quad.any()) == bool(s.tiles[b, t])  # only the target items' foreground is masked


@needs_fmnist
def test_composites_mask_each_item_in_its_half(model):
    test = D.fashion_mnist(model)
    s = D.composite_set(model, test, D.holdout_pool(model, test), 4, seed=0)
    gw = s.masks.shape[-1] // 2
    assert s.images.shape[-1] == 2 * s.images.shape[-2]
    assert not s.masks_any[:, 0, :, gw:].any() and not s.masks_any[:, 1, :, :gw].any()
    assert s.masks_any[:, 0, :, :gw].flatten(1).any(1).all() and (s.targets[:, 0] != s.targets[:, 1]).all()


# --- statistics ---------------------------------------------------------------------------------------------------
def test_bootstrap_hand_cases():
    e = bootstrap_mean([2.0, 2.0, 2.0])
    assert (e.mean, e.lo, e.hi, e.n) == (2.0, 2.0, 2.0, 3)
    e = bootstrap_mean([0.0, 1.0], n_boot=4000)  # resampled means: 0, 1/2, 1 with chances 1/4, 1/2, 1/4
    assert (e.mean, e.lo, e.hi) == (0.5, 0.0, 1.0)
    e = bootstrap_mean([1.0, float("nan"), 3.0])  # undefined scores are left out and not counted
    assert e.mean == 2.0 and e.n == 2
    assert bootstrap_mean([float("nan")]).n == 0 and bootstrap_mean([]).text() == "–"


def test_bootstrap_is_seeded():
    x = np.random.default_rng(5).normal(size=40)
    assert bootstrap_mean(x, seed=1) == bootstrap_mean(x, seed=1)
    assert bootstrap_mean(x, seed=1) != bootstrap_mean(x, seed=2)
    e = bootstrap_mean(x, n_boot=5000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert e.lo < x.mean() < e.hi and abs((e.hi - e.lo) - 2 * 1.96 * se) < 0.25 * 2 * 1.96 * se


def test_paired_interval_covers_a_known_difference():
    g = np.random.default_rng(0)
    difficulty = g.normal(0, 2.0, 200)  # shared by both methods on each image
    a, b = difficulty + 0.3 + g.normal(0, 0.05, 200), difficulty + g.normal(0, 0.05, 200)
    d = paired_difference(a, b)
    assert d.lo < 0.3 < d.hi and d.hi - d.lo < 0.05 and d.lo > 0
    unpaired = bootstrap_mean(a).lo - bootstrap_mean(b).hi  # the difficulty does not cancel without pairing
    assert unpaired < 0
    a[3] = np.nan
    assert paired_difference(a, b).n == 199
    ida, idb = ["x", "y", "z"], ["z", "x"]
    assert [v.tolist() for v in align(ida, [1, 2, 3], idb, [30, 10])] == [[1, 3], [10, 30]]


def test_bootstrap_statistic_of_pooled_correlation():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 4, 4, generator=g)
    b = a + 0.5 * torch.randn(30, 4, 4, generator=g)
    e = bootstrap_statistic(lambda idx: float(pooled_correlation(a[idx], b[idx])), 30, n_boot=300)
    flat = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
    assert e.mean == pytest.approx(flat, abs=1e-6) and e.lo < flat < e.hi and e.n == 30
    # the report's path: per-image sums, every resample at once; the same resamples, so the same interval
    from cdam_pl.evaluate.scoring import pooled_from_sums, pooled_sums
    from cdam_pl.evaluate.stats import bootstrap_of_sums

    fast = bootstrap_of_sums(pooled_sums(a, b), pooled_from_sums, n_boot=300)
    assert (fast.mean, fast.lo, fast.hi, fast.n) == pytest.approx((e.mean, e.lo, e.hi, e.n), abs=1e-6)
    # the sums on the metric's side give the same number as the one-pass correlation and the torchmetrics state
    from cdam_pl.metrics import PooledCorrelation

    m = PooledCorrelation()
    m.update(a[:10], b[:10])
    m.update(a[10:], b[10:])
    assert float(m.compute()) == pytest.approx(flat, abs=1e-6)
    const = bootstrap_of_sums(pooled_sums(torch.ones(3, 4, 4), b[:3]), pooled_from_sums, n_boot=50)
    assert np.isnan([const.mean, const.lo, const.hi]).all() and const.n == 3  # a constant map: undefined, no error


# --- end to end ---------------------------------------------------------------------------------------------------
CELL = re.compile(r"(-?\d+\.\d+) \[(-?\d+\.\d+), (-?\d+\.\d+)\] \((\d+)\)")


def _tables(md: str) -> dict[tuple[str, str], dict[str, dict[str, str]]]:
    """(set, group) -> {row label: {column: cell}} for every '### set: group' table of results.md."""
    out, key, head = {}, None, None
    for line in md.splitlines():
        if line.startswith("### "):
            key, head = tuple(line[4:].split(": ", 1)), None
        elif line.startswith("| ") and key:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if head is None:
                head = cells
            else:
                out.setdefault(key, {})[cells[0]] = dict(zip(head[1:], cells[1:]))
        elif line.startswith("|---"):
            continue
    return out


def test_stage_seconds_count_each_stage_over_the_images_it_covered():
    from cdam_pl.evaluate.report import stage_seconds
    from cdam_pl.evaluate.run import MethodResult

    idx, sub = torch.arange(4), torch.tensor([0, 2])
    r = MethodResult(idx, torch.zeros(4, 1, 2, 2), scores={}, score_idx={
        "compactness_v1": idx, "deletion_token": sub, "random_logit": sub, "rand_head_ssim": sub,
        "rand_head_spearman": sub}, seconds={"maps": 0.5, "map metrics": 0.1, "deletion_token": 2.0,
                                             "random_logit": 0.25, "randomisation": 3.0})
    cheap = MethodResult(idx, torch.zeros(4, 1, 2, 2), seconds={"maps": 1.0, "map metrics": 0.0})
    # 4 x (0.5 + 0.1) + 2 x (2.0 + 0.25 + 3.0), and 4 x 1.0 for the method without forward metrics
    assert stage_seconds({"fmnist": {"a": r}, "mosaics": {"b": cheap}}) == pytest.approx(2.4 + 10.5 + 4.0)


@needs_fmnist
def test_quick_run_end_to_end(fmnist_checkpoint, tmp_path):
    from PIL import Image

    from cdam_pl.benchmark import CONTROL
    from cdam_pl.evaluate import QUICK, main

    out = tmp_path / "eval"
    assert main(["--checkpoint", str(fmnist_checkpoint), "--out", str(out), "--quick"]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    methods = registry.names() + [CONTROL]
    labels = {n: registry.get(n).label for n in registry.names()} | {CONTROL: "random (control)"}
    scores: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        scores.setdefault((r["set"], r["method"], r["metric"]), []).append(float(r["value"]) if r["value"] else
                                                                            float("nan"))
    assert {m for _, m, _ in scores} == set(methods)
    n_set = {"fmnist": QUICK["images"], "composites": QUICK["composites"], "mosaics": QUICK["mosaics"],
             "photos": QUICK["photos"]}
    for (s, m, metric), v in scores.items():
        if metric.startswith(("deletion", "insertion", "road", "random_logit", "rand_")):
            assert s == "fmnist" and len(v) == QUICK["faithful_expensive" if m in ("tam", "ig", "smoothgrad")
                                                     else "faithful"]
        else:
            assert len(v) == (min(QUICK["expensive"], n_set[s]) if m in ("tam", "ig", "smoothgrad") else n_set[s])
        finite = [x for x in v if not math.isnan(x)]
        if metric == "road_fidelity":  # a difference of two mean probabilities
            assert all(-1.0 <= x <= 1.0 for x in finite), (s, m, metric)
        elif metric.startswith(("compactness", "focus", "pointing", "relevance", "deletion", "insertion", "road")):
            assert all(0.0 <= x <= 1.0 for x in finite), (s, m, metric)
    assert all(x == pytest.approx(1.0) for x in scores[("fmnist", "attention", "class_sensitivity")])
    assert {"focus", "pointing_game"} <= {k[2] for k in scores if k[0] == "mosaics"}
    assert {"rand_head_spearman", "rand_head_ssim", "random_logit", "road_morf", "insertion_pixel"} <= {
        k[2] for k in scores if k[0] == "fmnist"}
    for m in methods:  # the paper's fidelity form, LIF minus MIF, per image from the two ROAD curves
        lerf, morf = scores[("fmnist", m, "road_lerf")], scores[("fmnist", m, "road_morf")]
        assert scores[("fmnist", m, "road_fidelity")] == pytest.approx([a - b for a, b in zip(lerf, morf)], abs=1e-12)

    md = (out / "results.md").read_text()
    assert re.search(r"Stages \(maps, metrics, randomisation\) \d+ s of wall time summed", md)
    tables = _tables(md)
    checked = 0
    for (s, group), table in tables.items():
        if group not in ("map metrics", "faithfulness", "model randomisation"):
            continue
        for m in methods:
            for col, cell in table[labels[m]].items():
                metric = col.rsplit(" ", 1)[0]
                e = bootstrap_mean(scores[(s, m, metric)], n_boot=QUICK["bootstrap"], seed=0)
                if cell == "–":
                    assert e.n == 0
                    continue
                mean, lo, hi, n = CELL.fullmatch(cell).groups()
                assert (float(mean), float(lo), float(hi), int(n)) == pytest.approx(
                    (round(e.mean, 3), round(e.lo, 3), round(e.hi, 3), e.n), abs=1.01e-3)
                checked += 1
    assert checked > 100
    cdam_minus = tables[("fmnist", "CDAM minus each method (paired bootstrap over the same images)")]
    d = paired_difference(scores[("fmnist", "cdam", "compactness_v1")], scores[("fmnist", "rp", "compactness_v1")],
                          n_boot=QUICK["bootstrap"], seed=0)
    assert cdam_minus["RP"]["compactness_v1 ↑"].strip("*").startswith(f"{d.mean:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}]")
    assert "TAM – CDAM" in md or "CDAM – TAM" in md
    for name in ("bars_fmnist.png", "bars_composites.png", "bars_mosaics.png", "bars_photos.png", "examples.png"):
        with Image.open(out / name) as im:
            assert im.width > 300 and im.height > 200
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from cdam_pl.evaluate import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no demo checkpoint" in err
    assert main(["--checkpoint", "nope.ckpt"]) == 2
    assert "checkpoint 'nope.ckpt' not found" in capsys.readouterr().err
    assert main(["--methods", "cdam,tma"]) == 2
    assert "did you mean tam" in capsys.readouterr().err
    assert main(["--sets", "fmnist,cifar"]) == 2
    assert "unknown image set 'cifar'" in capsys.readouterr().err
    assert main(["--expensive", "2", "--faithful-expensive", "5"]) == 2
    assert "cannot exceed --expensive" in capsys.readouterr().err
    assert main(["--images", "0"]) == 2
    assert "--images must be >= 1" in capsys.readouterr().err
    assert main(["--photos", "9"]) == 2
    assert "--photos must be at most 8" in capsys.readouterr().err


def test_forward_scores_do_not_depend_on_the_batch_size(model):
    """Every image's Random Logit draws its own other class: scoring in batches of 2 equals one batch of 6 (a
    generator reseeded per batch would give images 0, 2 and 4 the same draw), and so do the perturbation curves (ROAD's
    imputation noise is drawn per call, so it is left out here)."""
    from cdam_pl.evaluate.scoring import forward_scores
    from cdam_pl.metrics.sanity import random_other_classes

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g)
    target = torch.tensor([0, 1, 2, 3, 4, 5])
    maps = torch.rand(6, 4, 4, generator=g)
    seen = []

    def explain(backbone, head, x, t):
        seen.append(t[:, 0].clone())
        return torch.rand(x.shape[0], 1, 4, 4, generator=torch.Generator().manual_seed(int(t.sum())))

    small, _ = forward_scores(model, images, target, maps, steps=4, seed=0, batch_size=2, explain=explain)
    drawn_small = torch.cat(seen)
    seen.clear()
    whole, _ = forward_scores(model, images, target, maps, steps=4, seed=0, batch_size=6, explain=explain)
    assert torch.equal(drawn_small, torch.cat(seen))
    assert torch.equal(drawn_small, random_other_classes(target, len(model.classes), 0))
    assert (drawn_small != target).all()
    for metric in small:
        if metric.startswith(("deletion", "insertion")):
            np.testing.assert_allclose(small[metric], whole[metric], rtol=1e-4, atol=1e-5, err_msg=metric)


@needs_fmnist
def test_a_rerun_recomputes_only_the_stages_its_settings_change(fmnist_checkpoint, tmp_path):
    """Each stage under DIR/.work is keyed by what it depends on: fewer forward-metric images keep every map, fewer
    photos redo only the photos, more samples redo only the sampling method's maps and what was computed from them."""
    from cdam_pl.evaluate import parse_args, run

    out = tmp_path / "eval"
    args = ["--checkpoint", str(fmnist_checkpoint), "--out", str(out), "--quick", "--methods", "cdam,ig",
            "--sets", "fmnist,photos"]

    def computed(*extra: str) -> tuple[set[str], dict]:
        before = {p.name for p in (out / ".work").glob("*.pt")}
        result = run(parse_args([*args, *extra]), log=lambda line: None)
        after = {p.name for p in (out / ".work").glob("*.pt")}
        stages = [n.split("@")[0] for n in after]
        assert len(stages) == len(set(stages))  # the stale file of a recomputed stage is removed
        return {n.split("@")[0] for n in after - before}, result["results"]

    first, maps = computed()
    every_map = {f"maps-{s}-{m}" for s in ("fmnist", "photos") for m in ("cdam", "ig", "random")}
    assert first == every_map | {"set-fmnist", "set-photos", "forward-cdam", "forward-ig", "forward-random",
                                 "randomisation-2", "randomisation-3"}
    args += ["--faithful", "2", "--faithful-expensive", "1"]
    second, again = computed()
    assert second == {"forward-cdam", "forward-ig", "forward-random", "randomisation-1", "randomisation-2"}
    assert torch.equal(again["fmnist"]["cdam"].maps, maps["fmnist"]["cdam"].maps)
    args += ["--photos", "1"]
    assert computed()[0] == {"set-photos", "maps-photos-cdam", "maps-photos-ig", "maps-photos-random"}
    args += ["--n-samples", "3"]
    assert computed()[0] == {"maps-fmnist-ig", "maps-photos-ig", "forward-ig", "randomisation-1"}
    assert computed()[0] == set()  # the same command again resumes everything
