"""explain.py end to end on the tiny digits checkpoint: the saved maps are the library's maps for the same images and
targets (recomputed here from the image files with cdam_pl's CDAM), the panels, manifest and gallery name every
image, odd image files are converted or skipped, and every user error is one line on stderr with exit status 2."""
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import explain
from cdam_pl import load_explanations, report
from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.data import build_transform, load_image
from cdam_pl.errors import CdamError, ConfigError
from cdam_pl.explain import CDAM, concept_vectors, registry

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-4, 1e-6


# --------------------------------------------------------------------------------------------- helpers / fixtures


def run(argv, capsys):
    """explain.main in-process -> (exit status, stdout, stderr)."""
    rc = explain.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def make_images(folder: Path) -> dict[str, Path]:
    """One image per awkward case, plus a corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    px = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    files = {
        "rgb": folder / "rgb.png",
        "gray": folder / "gray.png",
        "rgba": folder / "sub" / "rgba.png",  # folders are searched recursively
        "deep16": folder / "deep16.png",
        "palette": folder / "palette.gif",
        "wide": folder / "wide.png",
        "rotated": folder / "rotated.jpg",
        "corrupt": folder / "corrupt.png",
    }
    files["rgba"].parent.mkdir()
    Image.fromarray(px(40, 40, 3)).save(files["rgb"])
    Image.fromarray(px(40, 40)).save(files["gray"])
    Image.fromarray(px(40, 40, 4), "RGBA").save(files["rgba"])
    deep = Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16))
    assert deep.mode.startswith("I;16")
    deep.save(files["deep16"])
    Image.fromarray(px(40, 40, 3)).convert("P").save(files["palette"])
    Image.fromarray(px(32, 64, 3)).save(files["wide"])  # H 32, W 64
    rot = Image.fromarray(px(32, 64, 3))  # stored H 32 x W 64; orientation 6: shown rotated, H 64 x W 32
    exif = rot.getexif()
    exif[0x0112] = 6
    rot.save(files["rotated"], exif=exif, quality=95)
    files["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return files


def make_concept(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(folder / f"ex{k}.png")
    return folder


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


def inputs(model, paths, size=None):
    """Model inputs built here from the files: load_image + the backbone's eval transform -> [B, 3, H, W]."""
    dc = model.backbone.data_config
    t = build_transform(size or model.backbone.img_size, dc["mean"], dc["std"], dc["interpolation"])
    return torch.stack([t(load_image(p)) for p in paths])


def close(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL * max(1.0, np.abs(b).max()))


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, tmp_path_factory):
    """One run over every awkward image with cdam + attention, top3 and a concept, in batches of 3."""
    root = tmp_path_factory.mktemp("full")
    files = make_images(root / "imgs")
    concept = make_concept(root / "blob")
    out = root / "out"
    rc = explain.main([tiny_checkpoint, str(root / "imgs"), "--out", str(out), "--methods", "cdam,attention",
                       "--concept", f"blob={concept}", "--batch-size", "3", "--device", "cpu"])
    manifest = json.loads((out / "manifest.json").read_text())
    return dict(rc=rc, files=files, concept=concept, out=out, manifest=manifest, maps=load_explanations(out))


# --------------------------------------------------------------------------------------------- the saved maps


def test_saved_maps_equal_library_output(full_run, model):
    m, ex = full_run["manifest"], full_run["maps"]
    assert full_run["rc"] == 0
    records = m["images"]
    paths = [Path(r["path"]) for r in records]
    x = inputs(model, paths)  # all at the checkpoint's 32x32
    names, vectors = concept_vectors(model.backbone, {"blob": inputs(model, sorted(full_run["concept"].iterdir()))})
    assert list(ex) == [str(p) for p in paths] and ex.methods == ["cdam", "attention"]
    assert ex.concepts == ["blob"] and ex.classes == [str(c) for c in range(10)]
    ref = CDAM(model.backbone, model.head).explain(x, targets=lambda logits: logits.topk(3, dim=1).indices,
                                                   concepts=vectors, attention=True)
    for b, r in enumerate(records):
        i, e = r["index"], ex[r["path"]]
        assert e.index == i and e.record == r
        np.testing.assert_array_equal(e.targets, ref.targets[b].numpy())
        assert e.target_names == [str(c) for c in ref.targets[b].tolist()]
        close(e.logits, ref.logits[b])
        cdam = e.maps["cdam"]
        assert cdam.dtype == np.float32 and cdam.shape == (4, 2, 2)  # 3 targets + 1 concept on the 2x2 grid
        close(cdam[:3], ref.class_maps[b])
        close(cdam[3:], ref.concept_maps[b])
        close(e.maps["attention"], ref.attention[b].mean(0, keepdim=True))
        close(e.concept_scores, ref.concept_scores[b])
        assert e.rows["cdam"] == [f"class:{c}" for c in ref.targets[b].tolist()] + ["concept:blob"]
        assert e.rows["attention"] == ["image"]
        # manifest: targets with logits and softmax probabilities, concept scores
        probs = ref.logits[b].softmax(0)
        for t, c in zip(r["targets"], ref.targets[b].tolist()):
            assert t["index"] == c and t["class"] == str(c)
            assert t["logit"] == pytest.approx(ref.logits[b, c].item(), rel=1e-5, abs=1e-6)
            assert t["probability"] == pytest.approx(probs[c].item(), rel=1e-5, abs=1e-7)
        assert r["prediction"]["index"] == int(ref.logits[b].argmax())
        assert r["concepts"][0]["score"] == pytest.approx(ref.concept_scores[b, 0].item(), rel=1e-5)
        assert r["maps"]["cdam"] == {"key": f"{i}/cdam", "shape": [4, 2, 2], "rows": e.rows["cdam"], "params": {}}


def test_panels_manifest_and_gallery_name_every_image(full_run, tiny_checkpoint):
    m, out, files = full_run["manifest"], full_run["out"], full_run["files"]
    good = {k: p for k, p in files.items() if k != "corrupt"}
    assert sorted(r["path"] for r in m["images"]) == sorted(str(p) for p in good.values())
    assert m["skipped"] == [{"index": 0, "path": str(files["corrupt"]), "reason": m["skipped"][0]["reason"]}]
    assert "corrupt.png" in m["skipped"][0]["reason"] and "not a recognised image" in m["skipped"][0]["reason"]
    assert len(full_run["maps"]) == len(good)
    # manifest: checkpoint, backbone identity, image size, methods + parameters, versions
    assert m["checkpoint"]["path"] == str(Path(tiny_checkpoint).resolve())
    assert m["checkpoint"]["classes"] == [str(c) for c in range(10)]
    assert m["backbone"]["name"] == "vit_small_patch16_224.dino" and len(m["backbone"]["sha256"]) == 64
    assert m["backbone"]["patch_size"] == 16 and m["image_size"] == {"mode": "checkpoint", "size": [32, 32]}
    assert [x["name"] for x in m["methods"]] == ["cdam", "attention"]
    assert m["versions"]["torch"] == metadata.version("torch")
    assert {"python", "timm", "numpy"} <= set(m["versions"])
    assert m["timing"]["images_per_second"] > 0
    # every image: its model input, its original size (EXIF orientation applied), a readable PNG panel
    by_name = {r["name"]: r for r in m["images"]}
    assert by_name["rotated.jpg"]["original_size"] == [64, 32]
    assert by_name["wide.png"]["original_size"] == [32, 64]
    html = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == len(good)
    for r in m["images"]:
        assert r["input_size"] == [32, 32] and r["grid"] == [2, 2]
        panel = out / r["panel"]
        with Image.open(panel) as im:
            # rows: cdam (image + 3 targets), cdam concepts (image + 1), attention (image + 1)
            assert im.format == "PNG" and im.width >= 4 * 200 and im.height >= 3 * 200
        assert r["name"] in html and r["panel"] in srcs
    assert len(list((out / "panels").glob("*.png"))) == len(good)
    # the gallery opens offline: only relative links to files that exist
    assert not re.search(r"(src|href)=\"(https?:)?//", html) and "<script" not in html
    for link in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert (out / link).is_file()
    assert "corrupt.png" in html  # listed as skipped


def test_unreadable_image_is_one_warning(tiny_checkpoint, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    rc, out, err = run([tiny_checkpoint, files["rgb"], files["corrupt"], "--out", tmp_path / "o", "--methods",
                        "attention"], capsys)
    assert rc == 0
    assert err.strip().splitlines() == [err.strip()]  # exactly one line
    assert err.startswith("warning: skipped: cannot read image") and "corrupt.png" in err
    assert "explained 1 images, 1 skipped" in out


def test_keep_aspect_grid_follows_the_image(tiny_checkpoint, model, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    chosen = [files["wide"], files["rotated"], files["rgb"]]
    rc, _, err = run([tiny_checkpoint, *chosen, "--keep-aspect", "--out", tmp_path / "o", "--targets", "top2",
                      "--batch-size", "8"], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    ex = load_explanations(tmp_path / "o")
    # area about 32*32, each side a multiple of 16: 32x64 -> 16x48, EXIF-rotated 64x32 -> 48x16, square stays
    expected = {"wide.png": ([16, 48], [1, 3]), "rotated.jpg": ([48, 16], [3, 1]), "rgb.png": ([32, 32], [2, 2])}
    cdam = CDAM(model.backbone, model.head)
    for r in m["images"]:
        size, grid = expected[r["name"]]
        assert r["input_size"] == size and r["grid"] == grid
        assert ex[r["path"]].maps["cdam"].shape == (2, *grid)
        ref = cdam.explain(inputs(model, [r["path"]], size), targets=lambda lg: lg.topk(2, dim=1).indices)
        close(ex[r["path"]].maps["cdam"], ref.class_maps[0])
    assert m["image_size"] == {"mode": "keep-aspect", "area_of": [32, 32], "multiple_of": 16}


def test_img_size_and_named_targets(tiny_checkpoint, model, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    rc, _, err = run([tiny_checkpoint, files["rgb"], files["gray"], "--img-size", "48", "32", "--targets", "7,3",
                      "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    ex = load_explanations(tmp_path / "o")
    assert list(ex) == [str(files["gray"]), str(files["rgb"])]  # sorted order: gray, rgb
    x = inputs(model, [files["gray"], files["rgb"]], (48, 32))
    ref = CDAM(model.backbone, model.head).class_maps(x, [7, 3])  # [2, 2, 3, 2]
    for b, e in enumerate(ex.values()):
        assert list(e.targets) == [7, 3] and e.rows["cdam"] == ["class:7", "class:3"]
        close(e.maps["cdam"], ref[b])


def test_targets_all_stores_every_class_and_panels_draw_the_top_ones(tiny_checkpoint, model, tmp_path, capsys,
                                                                      monkeypatch):
    """--targets all: every class's map, in the head's order, equal to the engine's; a panel draws only the
    PANEL_TARGETS highest logits, highest first, and says so in its title."""
    from cdam_pl.report import outputs

    drawn = []
    monkeypatch.setattr(outputs, "PANEL_TARGETS", 3)
    monkeypatch.setattr(outputs.PanelWriter, "submit",
                        lambda self, image, rows, suptitle, path: drawn.append((rows, suptitle)))
    files = make_images(tmp_path / "imgs")
    chosen = [files["rgb"], files["gray"]]
    rc, _, err = run([tiny_checkpoint, *chosen, "--targets", "all", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    ex = load_explanations(tmp_path / "o")
    c = len(model.classes)
    x = inputs(model, sorted(chosen))
    ref = CDAM(model.backbone, model.head).explain(x, targets=list(range(c)))
    for b, e in enumerate(ex.values()):
        assert list(e.targets) == list(range(c)) and e.maps["cdam"].shape[0] == c
        close(e.maps["cdam"], ref.class_maps[b])
        rows, title = drawn[b]
        top = ref.logits[b].argsort(descending=True)[:3]
        assert [t.split("\n")[0] for t in rows[0][2]] == [model.classes[int(k)] for k in top]
        for grid, k in zip(rows[0][1], top):
            close(grid, ref.class_maps[b, int(k)])
        assert f"the top 3 of its {c} targets drawn" in title


def test_smooth_and_integrated_match_library(tiny_checkpoint, model, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    chosen = [files["rgb"], files["gray"], files["deep16"]]
    rc, _, err = run([tiny_checkpoint, *chosen, "--methods", "smooth,integrated", "--targets", "pred",
                      "--n-samples", "3", "--n-steps", "4", "--seed", "5", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    ex = load_explanations(tmp_path / "o")
    x = inputs(model, [r["path"] for r in m["images"]])
    cdam = CDAM(model.backbone, model.head)
    pred = lambda logits: logits.argmax(1, keepdim=True)  # noqa: E731
    # noise left to the library's defaults: the CLI's recorded defaults must be the ones the engine uses
    smooth = cdam.class_maps(x, pred, variant="smooth", n_samples=3, generator=torch.Generator().manual_seed(5))
    integ = cdam.class_maps(x, pred, variant="integrated", n_steps=4, generator=torch.Generator().manual_seed(5))
    for b, r in enumerate(m["images"]):
        close(ex[r["path"]].maps["smooth"], smooth[b])
        close(ex[r["path"]].maps["integrated"], integ[b])
    params = {x["name"]: x["params"] for x in m["methods"]}
    assert params == {"smooth": {"n_samples": 3, "noise": 0.05, "seed": 5},
                      "integrated": {"n_steps": 4, "noise": 0.0, "seed": 5}}
    assert m["images"][0]["maps"]["smooth"]["params"] == params["smooth"]


def test_comparison_methods_come_from_the_registry(tiny_checkpoint, model, tmp_path, capsys):
    """explain.py runs the benchmark's methods (one registry): same numbers, aliases for the engine's own names."""
    from cdam_pl.explain import registry

    files = make_images(tmp_path / "imgs")
    chosen = [files["rgb"], files["gray"]]
    rc, _, err = run([tiny_checkpoint, *chosen, "--methods", "tam,rp,ixg,am", "--targets", "top2",
                      "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [x["name"] for x in m["methods"]] == ["tam", "rp", "ixg", "attention"]  # am is the attention shortcut
    ex = load_explanations(tmp_path / "o")
    x = inputs(model, [r["path"] for r in m["images"]])
    top2 = model.head(model.backbone(x)).topk(2, dim=1).indices
    for name in ("tam", "rp", "ixg"):
        ref = registry.get(name)(model.backbone, model.head, x, top2)  # [B, 2, gh, gw]
        for b, r in enumerate(m["images"]):
            assert ex[r["path"]].rows[name] == [f"class:{model.classes[k]}" for k in top2[b].tolist()]
            close(ex[r["path"]].maps[name], ref[b])


def test_rerun_ignores_its_own_output_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    files = make_images(tmp_path / "all")
    (tmp_path / "imgs").mkdir()
    for key in ("rgb", "wide"):
        files[key].rename(tmp_path / "imgs" / files[key].name)
    monkeypatch.chdir(tmp_path / "imgs")
    for _ in range(2):  # the second run must not explain the first run's panels
        rc, _, err = run([tiny_checkpoint, ".", "--methods", "attention", "--out", "explained"], capsys)
        assert rc == 0, err
        m = json.loads((tmp_path / "imgs" / "explained" / "manifest.json").read_text())
        assert [r["name"] for r in m["images"]] == ["rgb.png", "wide.png"] and not m["skipped"]


def test_no_panels_writes_arrays_only(tiny_checkpoint, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    rc, out, err = run([tiny_checkpoint, files["rgb"], files["gray"], "--no-panels", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["manifest.json", "maps"]
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [r["panel"] for r in m["images"]] == [None, None] and "gallery" not in out
    assert list(load_explanations(tmp_path / "o")) == [str(files["gray"]), str(files["rgb"])]


def test_panels_drawn_in_worker_processes_equal_inline(tiny_checkpoint, tmp_path):
    files = make_images(tmp_path / "imgs")
    for procs in (0, 1):
        report.explain_to_dir(tiny_checkpoint, [files["rgb"], files["wide"]], tmp_path / f"o{procs}",
                              methods="cdam,attention", render_processes=procs, progress=False)
        m = json.loads((tmp_path / f"o{procs}" / "manifest.json").read_text())
        assert m["timing"]["render_processes"] == procs
    panels = sorted(p.name for p in (tmp_path / "o0" / "panels").iterdir())
    assert len(panels) == 2
    for name in panels:
        assert (tmp_path / "o1" / "panels" / name).read_bytes() == (tmp_path / "o0" / "panels" / name).read_bytes()


# --------------------------------------------------------------------------------------------- pieces


def test_default_render_processes():
    """Drawing processes only where they do not compete with the model for cores."""
    assert report.default_render_processes(64, cpus=2) == 0 and report.default_render_processes(64, cpus=3) == 0
    assert report.default_render_processes(15, cpus=32) == 0
    assert report.default_render_processes(64, cpus=4) == 2 and report.default_render_processes(64, cpus=64) == 8


def test_parse_targets():
    classes = ["Cat", "dog", "top2"]
    assert report.parse_targets("DOG, cat", classes).indices == (1, 0)
    assert report.parse_targets("top2", classes).indices == (2,)  # a class of that name wins over top-n
    assert report.parse_targets("top3", classes).top == 3
    assert report.parse_targets("pred", classes).top == 1
    assert report.parse_targets("ALL", classes).indices == (0, 1, 2)
    assert report.parse_targets("all", ["all", "none"]).indices == (0,)  # a class of that name wins over `all`
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 2.0]])
    assert report.parse_targets("top3", classes)(logits).tolist() == [[1, 2, 0], [0, 2, 1]]
    assert report.parse_targets("dog", classes)(logits).tolist() == [[1], [1]]
    with pytest.raises(ConfigError, match=r"unknown class 'cow'; valid classes: Cat, dog, top2$"):
        report.parse_targets("cat,cow", classes)
    with pytest.raises(ConfigError, match="the head has 3 classes; use top1..top3"):
        report.parse_targets("top4", classes)
    # Without --targets: the top 3, or every class of a smaller head (a binary head must not fail by default).
    assert report.default_targets(classes + ["x"]) == "top3"
    assert report.parse_targets(report.default_targets(["no", "yes"]), ["no", "yes"])(logits[:, :2]).tolist() == [
        [1, 0], [0, 1]]


def test_keep_aspect_size():
    assert report.keep_aspect_size(32, 64, 32 * 32, 16) == (16, 48)
    assert report.keep_aspect_size(480, 640, 224 * 224, 16) == (192, 256)  # 4:3 at about 224^2 pixels
    assert report.keep_aspect_size(1000, 10, 224 * 224, 14) == (2240, 28)
    assert report.keep_aspect_size(10000, 10, 224 * 224, 14) == (7084, 14)  # never below one patch
    h, w = report.keep_aspect_size(3000, 4000, 518 * 518, 14)
    assert h % 14 == 0 and w % 14 == 0 and abs(h * w / 518**2 - 1) < 0.06 and abs(w / h - 4 / 3) < 0.03


def test_registered_methods_plug_in(tiny_checkpoint, model, tmp_path, capsys):
    """A method registered in the one registry (backbone, head, images, targets, **params) and a class-agnostic
    one run without changes to the CLI; CLI options reach the parameters they name."""

    def patch_mean(backbone, head, images, targets, n_samples=7, scale=2.0, seed=0):
        """Toy: first channel's patch means times (class + 1) * scale + seed."""
        pooled = F.avg_pool2d(images[:, :1], backbone.patch_size)  # [B, 1, gh, gw]
        return pooled * (targets[:, :, None, None] + 1) * scale + seed + 0 * n_samples

    def brightness(backbone, head, images, targets):
        """Toy: mean brightness of each patch, the same for every target."""
        m = F.avg_pool2d(images.mean(1, keepdim=True), backbone.patch_size)  # [B, 1, gh, gw]
        return m.expand(-1, targets.shape[1], -1, -1)

    registry.register_method("patchmean")(patch_mean)
    registry.register_method("brightness", class_specific=False)(brightness)
    try:
        files = make_images(tmp_path / "imgs")
        rc, _, err = run([tiny_checkpoint, files["rgb"], files["wide"], "--methods", "patchmean,brightness",
                          "--targets", "top2", "--n-samples", "3", "--seed", "4", "--out", tmp_path / "o"], capsys)
        assert rc == 0, err
        m = json.loads((tmp_path / "o" / "manifest.json").read_text())
        ex = load_explanations(tmp_path / "o")
        x = inputs(model, [r["path"] for r in m["images"]])
        pooled = F.avg_pool2d(x[:, :1], 16)
        for b, r in enumerate(m["images"]):
            e = ex[r["path"]]
            t = torch.as_tensor(e.targets)
            close(e.maps["patchmean"], pooled[b] * (t[:, None, None] + 1) * 2.0 + 4)
            close(e.maps["brightness"], F.avg_pool2d(x[b:b + 1].mean(1, keepdim=True), 16)[0])
            assert e.rows["brightness"] == ["image"]
        params = {x["name"]: x["params"] for x in m["methods"]}
        assert params == {"patchmean": {"n_samples": 3, "scale": 2.0, "seed": 4}, "brightness": {}}
        assert m["methods"][0]["description"].startswith("Toy: first channel")
    finally:
        registry.unregister_method("patchmean")
        registry.unregister_method("brightness")


def test_one_registry_serves_explain_py(tmp_path, capsys):
    """explain.py lists and runs exactly the registry's methods, by their canonical names; old spellings are
    aliases that say the canonical name."""
    assert [m.name for m in registry.parse_methods("cdam,smooth,integrated,attention")] == \
        ["cdam", "smooth", "integrated", "attention"]
    notes = []
    assert [m.name for m in registry.parse_methods("smooth_cdam,am", note=notes.append)] == ["smooth", "attention"]
    assert notes == ["method 'smooth_cdam' is called 'smooth'", "method 'am' is called 'attention'"]
    with pytest.raises(CdamError, match="unknown method 'ones'"):
        registry.parse_methods("ones")
    assert registry.get("ixg").params() == {} and registry.get("ig").params(n_steps=5)["n_steps"] == 5
    with pytest.raises(CdamError, match="has no parameter 'noise'"):
        registry.get("cdam").params(noise=0.1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_method("cdam")(lambda backbone, head, images, targets: images)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        explain.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in report.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in text
    assert "examples:" in text and "python explain.py" in text
    for key in report.MAPS_LAYOUT:
        assert key in text
    for name in registry.names():
        assert re.search(rf"^  {name} +\S", text, re.M)


# --------------------------------------------------------------------------------------------- user errors


@pytest.fixture(scope="module")
def bad_checkpoints(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    ckpt["cdam_pl"]["backbone"]["sha256"] = "0" * 64
    torch.save(ckpt, d / "other_backbone.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, d / "plain.ckpt")
    (d / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")

    class Evil:  # unpickling this would create the folder `marker`
        def __reduce__(self):
            return (os.mkdir, (str(d / "marker"),))

    torch.save({"cdam_pl": {}, "state_dict": {}, "payload": Evil()}, d / "evil.ckpt")
    from safetensors.torch import save_file

    from tests.conftest import tiny_backbone

    bb = tiny_backbone("p16", img_size=(32, 32))  # same architecture, other weights
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, d / "other_weights.safetensors")
    return d


def _error_cases():
    # (id, argv builder (ckpt, images, bad) -> argv, message pattern)
    return [
        ("unknown-class", lambda c, i, b: [c, i["rgb"], "--targets", "3,eleven"],
         r"unknown class 'eleven'; valid classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9$"),
        ("missing-input", lambda c, i, b: [c, i["rgb"], b / "nope.png"], r"input not found: .*nope\.png"),
        ("missing-checkpoint", lambda c, i, b: [b / "missing.ckpt", i["rgb"]], r"missing\.ckpt.* not found"),
        ("not-cdam-pl", lambda c, i, b: [b / "plain.ckpt", i["rgb"]], r"plain\.ckpt is not a cdam-pl checkpoint"),
        ("text-file", lambda c, i, b: [b / "notes.ckpt", i["rgb"]], r"notes\.ckpt is not a (readable|cdam-pl) "
                                                                      r"checkpoint"),
        ("unsafe-pickle", lambda c, i, b: [b / "evil.ckpt", i["rgb"]], r"refusing to load .*evil\.ckpt"),
        ("backbone-sha256", lambda c, i, b: [b / "other_backbone.ckpt", i["rgb"]],
         r"backbone weights do not match the checkpoint"),
        ("weights-file", lambda c, i, b: [c, i["rgb"], "--weights", b / "other_weights.safetensors"],
         r"backbone weights do not match the checkpoint"),
        ("img-size", lambda c, i, b: [c, i["rgb"], "--img-size", "30", "30"],
         r"--img-size 30 30 is not a multiple of the patch size 16; try --img-size 32 32"),
        ("unknown-method", lambda c, i, b: [c, i["rgb"], "--methods", "cdam,gradcam"],
         r"unknown method 'gradcam'; available: cdam, smooth, integrated, attention"),
        ("concept-spec", lambda c, i, b: [c, i["rgb"], "--concept", "stripes"], r"'stripes' is not NAME=DIR"),
        ("concept-folder", lambda c, i, b: [c, i["rgb"], "--concept", f"stripes={b / 'none'}"],
         r"--concept stripes: folder .* not found"),
        ("no-inputs", lambda c, i, b: [c], r"no INPUT given: name image files, folders or globs"),
        ("bad-number", lambda c, i, b: [c, i["rgb"], "--batch-size", "0"], r"--batch-size must be >= 1"),
        ("exclusive", lambda c, i, b: [c, i["rgb"], "--keep-aspect", "--img-size", "32", "32"],
         r"not allowed with argument"),
    ]


@pytest.mark.parametrize("case", _error_cases(), ids=[c[0] for c in _error_cases()])
def test_user_errors_are_one_line(case, tiny_checkpoint, bad_checkpoints, tmp_path, capsys):
    _, argv, pattern = case
    files = make_images(tmp_path / "imgs")
    out = tmp_path / "o"
    rc, _, err = run([*argv(tiny_checkpoint, files, bad_checkpoints), "--out", out], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (out / "manifest.json").exists()
    assert not (bad_checkpoints / "marker").exists()  # the unsafe pickle was never executed


def test_all_images_unreadable_fails(tiny_checkpoint, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    (tmp_path / "empty.png").write_bytes(b"")
    rc, _, err = run([tiny_checkpoint, files["corrupt"], tmp_path / "empty.png", "--out", tmp_path / "o"], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["warning", "warning", "error"]
    assert re.match(r"error: no image could be explained: all 2 inputs are unreadable \(first: cannot read image "
                    r".*empty\.png: file is empty", lines[-1])  # inputs are sorted: .../empty.png < .../imgs/...


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tiny_checkpoint, tmp_path, capsys):
    files = make_images(tmp_path / "imgs")
    rc, _, err = run([tiny_checkpoint, files["rgb"], "--device", "cuda", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "--device cuda: CUDA is not available here" in err and "use --device cpu" in err


def test_subprocess_exit_status_and_one_line_stderr(tiny_checkpoint, tmp_path):
    files = make_images(tmp_path / "imgs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "explain.py"), str(tiny_checkpoint), str(files["rgb"]),
                           "--targets", "Nine", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: unknown class 'Nine'; valid classes: 0, 1, 2")
    assert proc.stdout == ""


def test_serve_and_missing_inputs_are_wired(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr("cdam_pl.report.cli.serve", lambda ckpt, port, **kw: calls.append((ckpt, port, kw)) or 0)
    code, _, _ = run([tiny_checkpoint, "--serve", "--port", "8123"], capsys)
    assert code == 0 and calls == [(tiny_checkpoint, 8123, {"weights": None, "device": "cpu"})]
