"""The explanation callback and the plain metric functions it logs.

Metric functions are checked against independent references (numpy formulas; token deletion through timm's own
`forward_features` with a patch-drop module that keeps given tokens). The callback is checked end to end on tiny
runs by parsing the TensorBoard event files: tags at every step, maps that evolve, the user's concept, scalars equal
to a recomputation from the final head, bitwise-unchanged training, flat memory, DDP with two CPU processes.
"""
import gc
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cdam_pl.errors import ConfigError
from cdam_pl.explain import CDAM, concept_vectors
from cdam_pl.metrics import (
    compactness_symmetric,
    compactness_v1,
    deletion_drop,
    embed_without_tokens,
    map_correlation,
    num_deleted,
    random_tokens,
)
from cdam_pl.train.callbacks import ExplanationCallback, Snapshot
from cdam_pl.train.run import build_backbone, build_datamodule, run_training
from tests.conftest import tiny_backbone, tiny_config

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("classes", "concepts", "attention")
SCALARS = ("explain/compactness_v1", "explain/compactness_symmetric", "explain/class_sensitivity",
           "explain/faithfulness", "explain/deletion_drop_top", "explain/deletion_drop_random")
HISTOGRAMS = ("explain/scores_predicted", "explain/faithfulness_per_image")


# --- independent references -------------------------------------------------------------------------------------
class _KeepTokens(nn.Module):
    """Stands in for timm's patch_drop: keeps the prefix tokens and the patch tokens not listed in `remove`."""

    def __init__(self, num_prefix: int, remove: list[list[int]]):
        super().__init__()
        self.p, self.remove = num_prefix, remove

    def forward(self, x):  # [B, P+N, D] -> [B, P+N-n, D]
        rows = []
        for b, drop in enumerate(self.remove):
            keep = [t for t in range(x.shape[1]) if t < self.p or (t - self.p) not in set(drop)]
            rows.append(x[b, keep])
        return torch.stack(rows)


def reference_embedding(backbone, images, remove):
    """CLS embedding with the given patch tokens removed, via timm's own forward_features: [B, D]."""
    model = backbone.model
    saved = model.patch_drop
    model.patch_drop = _KeepTokens(backbone.num_prefix_tokens, remove)
    try:
        with torch.no_grad():
            return model.forward_features(images)[:, 0]
    finally:
        model.patch_drop = saved


def events(run_dir):
    """All image/scalar/histogram events of a run: {kind: {tag: [steps]}}, plus the accumulators."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {"images": {}, "scalars": {}, "histograms": {}}
    accs = []
    for f in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        ea = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0, "histograms": 0})
        ea.Reload()
        accs.append(ea)
        for kind, read in (("images", ea.Images), ("scalars", ea.Scalars), ("histograms", ea.Histograms)):
            for tag in ea.Tags()[kind]:
                out[kind].setdefault(tag, []).extend(e.step for e in read(tag))
    return out, accs


def image_event(accs, tag, step):
    return next(e for ea in accs if tag in ea.Tags()["images"] for e in ea.Images(tag) if e.step == step)


def scalar_event(accs, tag, step):
    return next(e.value for ea in accs if tag in ea.Tags()["scalars"] for e in ea.Scalars(tag) if e.step == step)


def the_callback(result) -> ExplanationCallback:
    return next(c for c in result["trainer"].callbacks if isinstance(c, ExplanationCallback))


def stripes_folder(path: Path) -> Path:
    """A concept folder: two images of vertical stripes."""
    path.mkdir(parents=True, exist_ok=True)
    for i, period in enumerate((4, 6)):
        x = np.zeros((40, 40, 3), np.uint8)
        x[:, (np.arange(40) // period) % 2 == 0] = 255
        Image.fromarray(x).save(path / f"stripes{i}.png")
    return path


# --- metric functions ---------------------------------------------------------------------------------------------
def test_compactness_rules_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 4, 5, 7, generator=g) ** 3  # heavy tails: many near-zero scores
    maps[0, 0] = 0.0  # all zero: v1 0 (max <= 0), symmetric 1
    maps[0, 1] = -maps[0, 1].abs()  # no positive score: v1 0
    s = maps.numpy().reshape(3, 4, -1)
    top = s.max(-1, keepdims=True)
    v1 = np.where(top[..., 0] > 0, (np.abs(s) < 0.05 * top).mean(-1), 0.0)
    sym = (np.abs(s) <= 0.05 * np.abs(s).max(-1, keepdims=True)).mean(-1)
    assert compactness_v1(maps).shape == (3, 4) and v1[0, 0] == 0 and sym[0, 0] == 1
    np.testing.assert_allclose(compactness_v1(maps).numpy(), v1, atol=1e-7)
    np.testing.assert_allclose(compactness_symmetric(maps).numpy(), sym, atol=1e-7)
    np.testing.assert_allclose(compactness_symmetric(maps, rel=0.5).numpy(),
                               (np.abs(s) <= 0.5 * np.abs(s).max(-1, keepdims=True)).mean(-1), atol=1e-7)


def test_map_correlation_is_pearson_over_tokens():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    b[1] = 2 * a[1] + 1  # perfectly correlated
    b[2] = -a[2]  # perfectly anti-correlated
    got = map_correlation(a, b)
    ref = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a.numpy(), b.numpy())]
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert got[1].item() == pytest.approx(1.0, abs=1e-6) and got[2].item() == pytest.approx(-1.0, abs=1e-6)


@pytest.mark.parametrize("key", ["p8", "p14reg"])
def test_embed_without_tokens_matches_timm_forward_with_tokens_dropped(key):
    bb = tiny_backbone(key).double()
    h, w = bb.img_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    n_patches = (h // bb.patch_size) * (w // bb.patch_size)
    remove = torch.stack([random_tokens(2, n_patches, 2, repeats=3, generator=torch.Generator().manual_seed(s))[:, 0]
                          for s in range(3)], 1)  # [B=2, R=3, n=2]
    got = embed_without_tokens(bb, images, remove, max_elements=1)  # chunks of one sequence
    for r in range(3):
        ref = reference_embedding(bb, images, remove[:, r].tolist())
        torch.testing.assert_close(got[:, r], ref, rtol=1e-10, atol=1e-10)


def test_deletion_drop_removes_top_scores_and_keeps_training_state():
    bb = tiny_backbone("p8", img_size=(32, 48)).double()  # 4 x 6 = 24 tokens: 10% -> 2 removed
    head = nn.Sequential(nn.BatchNorm1d(64), nn.Dropout(0.5), nn.Linear(64, 5)).double().train()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 32, 48, generator=g, dtype=torch.float64)
    maps = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 3, 4])
    rng = torch.get_rng_state()
    top, rand = deletion_drop(bb, head, images, maps, targets, n_random=2, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), rng), "deletion_drop must not draw from the global RNG"
    assert head.training, "the head's mode must be restored"
    assert head[0].num_batches_tracked.item() == 0, "BatchNorm statistics must not be updated"
    assert num_deleted(24, 0.1) == 2
    head.eval()
    with torch.no_grad():
        full = head(bb(images)).gather(1, targets[:, None])[:, 0]
        top_sets = maps.flatten(1).argsort(1, descending=True)[:, :2].tolist()
        ref_top = full - head(reference_embedding(bb, images, top_sets)).gather(1, targets[:, None])[:, 0]
        sets = random_tokens(3, 24, 2, repeats=2, generator=torch.Generator().manual_seed(7))
        ref_rand = torch.stack([full - head(reference_embedding(bb, images, sets[:, r].tolist()))
                                .gather(1, targets[:, None])[:, 0] for r in range(2)], 1).mean(1)
    torch.testing.assert_close(top, ref_top, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rand, ref_rand, rtol=1e-9, atol=1e-9)
    assert all(len(set(s)) == 2 for s in sets.reshape(-1, 2).tolist())  # distinct tokens per set


# --- tiny runs shared by the callback tests -----------------------------------------------------------------------
def _train(out, *overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_training(tiny_config(out, *overrides))
    result["rng"] = (torch.get_rng_state(), np.random.get_state()[1].copy())
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs with one seed: no callback; the full callback (concept folder, class means, default inference
    mode); the callback with inference_mode=False. 3 epochs each, 48 px (3 x 3 tokens), a head with BatchNorm (its
    running statistics would change if the callback ran the head in training mode)."""
    base = tmp_path_factory.mktemp("explain_runs")
    common = ("trainer.max_epochs=3", "backbone.img_size=48", "trainer.limit_train_batches=6",
              "trainer.limit_val_batches=2", "head.batchnorm=true")  # BatchNorm: running stats see any misuse
    concept = stripes_folder(base / "concept_stripes")
    return {
        "plain": _train(base / "plain", *common),
        "full": _train(base / "full", *common, "explain.enabled=true", "explain.num_images=2", "explain.top_k=3",
                       f"explain.concepts.stripes={concept}", "explain.class_mean_concepts=true",
                       "explain.max_class_mean_images=60"),
        "no_inference_mode": _train(base / "noinf", *common, "explain.enabled=true", "explain.num_images=1",
                                    "trainer.inference_mode=false"),
        "concept_dir": concept,
    }


@pytest.mark.parametrize("name, n_images, kinds", [("full", 2, KINDS), ("no_inference_mode", 1, KINDS[::2])])
def test_every_tag_exists_once_at_every_logged_step(runs, name, n_images, kinds):
    found, _ = events(runs[name]["run_dir"])
    steps = [0, 1, 2, 3]  # 0 = untrained head, then one per epoch
    expected = {f"explain/img{i:02d}/{k}" for i in range(n_images) for k in kinds}
    assert {t for t in found["images"] if t.startswith("explain/")} == expected
    for tag in expected:
        assert sorted(found["images"][tag]) == steps, tag
    for tag in SCALARS:
        assert sorted(found["scalars"][tag]) == steps, tag
    for tag in HISTOGRAMS:
        assert sorted(found["histograms"][tag]) == steps, tag


def test_training_is_bitwise_unchanged_by_the_callback(runs):
    plain = runs["plain"]["module"].head.state_dict()
    for name in ("full", "no_inference_mode"):
        other = runs[name]["module"].head.state_dict()
        assert plain.keys() == other.keys()
        for k in plain:
            assert plain[k].numpy().tobytes() == other[k].numpy().tobytes(), (name, k)
        assert torch.equal(runs[name]["rng"][0], runs["plain"]["rng"][0]), f"{name}: global torch RNG was used"
        assert np.array_equal(runs[name]["rng"][1], runs["plain"]["rng"][1]), f"{name}: global numpy RNG was used"
        assert runs[name]["metrics"]["val/acc"] == runs["plain"]["metrics"]["val/acc"]


def test_maps_evolve_and_head_independent_maps_do_not(runs):
    cb = the_callback(runs["full"])
    _, accs = events(runs["full"]["run_dir"])
    first, last = cb.history[0], cb.history[-1]
    assert (first.step, last.step) == (0, 3)
    assert not torch.allclose(first.class_maps[:, 0], last.class_maps[:, 0])  # true-class maps changed
    for i in range(2):
        tag = f"explain/img{i:02d}/classes"
        assert image_event(accs, tag, 0).encoded_image_string != image_event(accs, tag, 3).encoded_image_string
        classes = Image.open(io.BytesIO(image_event(accs, tag, 3).encoded_image_string))
        attention = Image.open(io.BytesIO(image_event(accs, f"explain/img{i:02d}/attention", 3).encoded_image_string))
        # a grid of at most three maps a row: image + true, pred, top2, then top3 below true
        assert 1.8 * attention.size[1] < classes.size[1] < 2.2 * attention.size[1]
        assert 1.6 * attention.size[0] < classes.size[0] < 2.1 * attention.size[0]
    # concept and attention maps depend on the frozen backbone only
    torch.testing.assert_close(cb.last.concept_maps, first.concept_maps)
    torch.testing.assert_close(cb.last.attention, first.attention)


def test_user_concept_folder_shows_up_with_its_own_vector(runs):
    result, cb = runs["full"], the_callback(runs["full"])
    assert cb.concept_names[0] == "stripes"
    assert all(n.startswith("mean(") for n in cb.concept_names[1:])
    # the logged concept map is CDAM of the similarity to the mean embedding of the folder's images
    bb = result["module"].backbone
    data = build_datamodule(tiny_config("unused", "backbone.img_size=48"), bb)
    examples = torch.stack([data.eval_transform(Image.open(p).convert("RGB"))
                            for p in sorted(runs["concept_dir"].glob("*.png"))])
    _, vec = concept_vectors(bb, {"stripes": examples})
    ref = CDAM(bb).concept_maps(cb.images, vec)[:, 0]
    torch.testing.assert_close(cb.last.concept_maps[:, 0], ref, rtol=1e-5, atol=1e-6)
    # class means: each image's own class, from training images of that class
    for i, label in enumerate(cb.labels.tolist()):
        assert cb.concept_names[int(cb._own_mean[i])] == f"mean({label})"
    found, _ = events(result["run_dir"])
    assert sorted(found["images"]["explain/img00/concepts"]) == [0, 1, 2, 3]


def test_class_means_from_the_feature_cache_equal_those_from_images(tmp_path, runs):
    assert the_callback(runs["full"]).class_mean_source == "images"  # no cache in that run
    result = _train(tmp_path, "cache.enabled=true", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                    "explain.enabled=true", "explain.num_images=2", "explain.class_mean_concepts=true",
                    "explain.max_class_mean_images=100000")  # every training image of the tracked classes
    cb = the_callback(result)
    assert cb.class_mean_source == "feature cache"
    cfg = tiny_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_datamodule(cfg, result["module"].backbone)
    data.setup()
    train = data.train_dataset.with_transform(data.eval_transform)
    for row, label in enumerate(sorted(set(cb.labels.tolist()))):
        idx = [i for i, t in enumerate(train.targets) if t == label]
        with torch.no_grad():
            ref = result["module"].backbone(torch.stack([train[i][0] for i in idx])).mean(0)
        assert cb.concept_names[row] == f"mean({label})"
        torch.testing.assert_close(cb._vectors[row], ref, rtol=1e-5, atol=1e-5)

def test_logged_scalars_match_a_recomputation_from_the_final_head(runs):
    """The last step (after the final epoch) used the final head: recompute every scalar independently."""
    result, cb = runs["full"], the_callback(runs["full"])
    _, accs = events(result["run_dir"])
    bb, head = result["module"].backbone, result["module"].head.eval()
    images, labels = cb.images, cb.labels
    with torch.no_grad():
        logits = head(bb(images))
    targets = torch.cat([labels[:, None], logits.topk(3).indices], 1)
    assert torch.equal(cb.last.targets, targets)
    torch.testing.assert_close(cb.last.probs, logits.softmax(-1).gather(1, targets), rtol=1e-5, atol=1e-6)
    maps = CDAM(bb, head).class_maps(images, targets).numpy()  # [B, 4, gh, gw]
    s = maps[:, 1].reshape(len(labels), -1)  # the predicted class's maps
    top = s.max(1, keepdims=True)
    comp_v1 = np.where(top[:, 0] > 0, (np.abs(s) < 0.05 * top).mean(1), 0.0).mean()
    comp_sym = (np.abs(s) <= 0.05 * np.abs(s).max(1, keepdims=True)).mean()
    sens = np.mean([np.corrcoef(m[1].ravel(), m[2].ravel())[0, 1] for m in maps])
    n_tok = maps.shape[-1] * maps.shape[-2]
    n = max(1, round(0.1 * n_tok))
    pred = targets[:, 1:2]
    with torch.no_grad():
        full = logits.gather(1, pred)[:, 0]
        top_sets = [list(np.argsort(-m[1].ravel(), kind="stable")[:n]) for m in maps]
        drop_top = full - head(reference_embedding(bb, images, top_sets)).gather(1, pred)[:, 0]
        sets = random_tokens(len(labels), n_tok, n, repeats=4, generator=torch.Generator().manual_seed(0))
        drop_rand = torch.stack([full - head(reference_embedding(bb, images, sets[:, r].tolist())).gather(1, pred)[:, 0]
                                 for r in range(4)], 1).mean(1)
    ref = {"explain/compactness_v1": comp_v1, "explain/compactness_symmetric": comp_sym,
           "explain/class_sensitivity": sens,
           "explain/faithfulness": (drop_top - drop_rand).mean().item(),
           "explain/deletion_drop_top": drop_top.mean().item(), "explain/deletion_drop_random": drop_rand.mean().item()}
    for tag, value in ref.items():
        assert scalar_event(accs, tag, 3) == pytest.approx(value, rel=1e-4, abs=1e-5), tag
        assert cb.last.scalars[tag] == pytest.approx(value, rel=1e-4, abs=1e-5), tag


def test_tracked_images_are_a_seeded_class_stratified_val_subset(runs):
    cb = the_callback(runs["full"])
    assert len(set(cb.labels.tolist())) == 2  # 2 images from 2 different classes
    cfg = tiny_config("unused", "backbone.img_size=48", "explain.num_images=2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_datamodule(cfg, build_backbone(cfg))
    again = ExplanationCallback.from_config(cfg.explain, data)
    assert torch.equal(again.images, cb.images) and again.ids == cb.ids
    for i, image_id in enumerate(cb.ids):
        j = data.val_dataset.ids.index(image_id)
        assert torch.equal(data.val_dataset[j][0], cb.images[i])


def test_strips_one_png_per_tracked_image(runs):
    cb = the_callback(runs["full"])
    out = Path(runs["full"]["run_dir"]) / "explanations"
    files = sorted(out.glob("*.png"))
    assert files == sorted(cb.strip_paths) and len(files) == 2
    assert [p.name.split("_")[0] for p in files] == ["img00", "img01"]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files
    assert [s.step for s in cb.history] == [0, 1, 2, 3]  # the columns: every logged epoch
    assert all(Image.open(p).mode == "RGB" for p in files)


@pytest.mark.parametrize("overrides, steps", [
    (("explain.every_n_epochs=2", "trainer.limit_val_batches=1"), [0, 2, 3]),  # every 2nd epoch + the last one
    (("trainer.limit_val_batches=0",), [0, 3]),  # no validation: the final head is logged when fitting ends
])
def test_logging_schedule(tmp_path, overrides, steps):
    result = _train(tmp_path, "trainer.max_epochs=3", "trainer.limit_train_batches=2", "explain.enabled=true",
                    "explain.num_images=1", *overrides)
    found, _ = events(result["run_dir"])
    assert sorted(found["images"]["explain/img00/classes"]) == steps
    assert sorted(found["scalars"]["explain/faithfulness"]) == steps
    assert [s.step for s in the_callback(result).history] == steps

class _Crash(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("boom")


def test_a_crash_still_writes_the_strips_of_what_was_logged(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_training(tiny_config(tmp_path, "trainer.max_epochs=3", "trainer.limit_train_batches=2",
                                 "trainer.limit_val_batches=1", "explain.enabled=true", "explain.num_images=1"),
                     extra_callbacks=[_Crash()])
    strips = list(tmp_path.rglob("explanations/img00_*.png"))
    assert len(strips) == 1  # steps 0, 1 and 2 were logged before the crash
    found, _ = events(tmp_path)
    assert sorted(found["images"]["explain/img00/classes"]) == [0, 1, 2]

# --- concept folder errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, expect", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no images"),
])
def test_bad_concept_folder_is_a_one_line_config_error_naming_the_concept(tmp_path, make, expect):
    folder = make(tmp_path)
    cfg = tiny_config(tmp_path, f"explain.concepts.beak={folder}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = build_datamodule(cfg, build_backbone(cfg))
    with pytest.raises(ConfigError) as err:
        ExplanationCallback.from_config(cfg.explain, data)
    msg = str(err.value)
    assert "explain.concepts.beak" in msg and expect in msg and "\n" not in msg


def test_history_is_thinned_evenly_and_keeps_first_and_last():
    cb = ExplanationCallback(images=torch.zeros(1, 3, 16, 16), labels=[0], classes=["a", "b"], max_strip_columns=6)
    for step in range(31):
        z = torch.zeros(1, 3)
        cb._remember(Snapshot(step, z.long(), z, torch.zeros(1, 3, 1, 1), None, None, torch.zeros(1, 1, 1), {}, z[0]))
        assert len(cb.history) <= 6
    steps = [s.step for s in cb.history]
    assert steps[0] == 0 and steps[-1] == 30
    gaps = np.diff(steps)
    assert gaps.max() <= 2 * gaps.min() + 2, steps  # evenly spread, not just the latest epochs
    assert cb.history[0].attention is not None and all(s.attention is None for s in cb.history[1:])


# --- memory and hooks over 20 validation epochs ------------------------------------------------------------------
def _tensor_bytes() -> int:
    gc.collect()
    seen = {}
    for o in gc.get_objects():
        if torch.is_tensor(o) and o.device.type == "cpu":
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in module.modules())


class _Probe(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_epoch_end(self, trainer, pl_module):
        e = trainer.current_epoch + 1
        self.rows.append({"epoch": e, "hooks": _hooks(pl_module),
                          "tensor_bytes": _tensor_bytes() if e in (8, 14, 20) else None})


def test_memory_stays_flat_over_20_epochs_and_no_hooks_remain(tmp_path):
    probe = _Probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_training(tiny_config(
            tmp_path, "trainer.max_epochs=20", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.val_check_interval=1",  # two validations per epoch: only the epoch-end one logs
            "explain.enabled=true", "explain.num_images=1"),
            extra_callbacks=[probe])
    cb = the_callback(result)
    sizes = {r["epoch"]: r["tensor_bytes"] for r in probe.rows if r["tensor_bytes"] is not None}
    assert abs(sizes[20] - sizes[8]) < 64 * 1024, sizes  # live CPU tensor memory does not grow with epochs
    assert abs(sizes[20] - sizes[14]) < 64 * 1024, sizes
    assert all(r["hooks"] == 0 for r in probe.rows) and _hooks(result["module"]) == 0
    assert len(cb.history) == cb.max_strip_columns
    assert 0 < len(cb._removed._store) <= 1 + cb.n_random  # only the latest top set + the random sets are kept
    found, _ = events(result["run_dir"])
    for kind in ("classes", "attention"):
        assert sorted(found["images"][f"explain/img00/{kind}"]) == list(range(21))  # once per epoch, + step 0


# --- DDP: two CPU processes (gloo) ---------------------------------------------------------------------------------
DDP_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
from tests.conftest import tiny_config
from cdam_pl.train.run import run_training

if __name__ == "__main__":
    result = run_training(tiny_config({out!r}, "explain.enabled=true", "explain.num_images=2",
                                      "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"))
    trainer = result["trainer"]
    print("RESULT " + json.dumps({{"rank": trainer.global_rank, "world": trainer.world_size,
                                  "run_dir": result["run_dir"]}}), flush=True)
"""


def test_ddp_two_cpu_processes_log_each_image_once_without_deadlock(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path / "out"))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)  # a deadlock would hit the timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert {(r["rank"], r["world"]) for r in results} == {(0, 2), (1, 2)}
    run_dir = next(r["run_dir"] for r in results if r["rank"] == 0)
    found, _ = events(Path(run_dir).parent)  # every version folder: a second rank must not log anywhere
    expected = {f"explain/img{i:02d}/{k}" for i in range(2) for k in ("classes", "attention")}
    assert {t for t in found["images"] if t.startswith("explain/")} == expected
    for tag in expected:
        assert Counter(found["images"][tag]) == Counter({0: 1, 1: 1, 2: 1}), tag  # each step once
    for tag in SCALARS:
        assert Counter(found["scalars"][tag]) == Counter({0: 1, 1: 1, 2: 1}), tag
    assert len(list((Path(run_dir) / "explanations").glob("*.png"))) == 2
