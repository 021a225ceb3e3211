"""Every bad input gets one line that says what, where and what to do, never a traceback: unreadable image files
(skipped with a counted warning by train.py, one warning each by explain.py), odd but valid files (tiny images,
non-UTF-8 names), and fatal problems (empty class folder, class only in val, NaN/Inf features, wrong config types,
unknown backbone, image size vs patch size, out-of-range class index) that end train.py with exit status 2."""
from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import explain
import train
from cdam_pl.backbone import FrozenViT
from cdam_pl.data import check_image, load_image
from cdam_pl.errors import CdamError, DataError
from cdam_pl.store import load_explanations
from tests.conftest import tiny_backbone
from tests.test_reliability import train_argv

ROOT = Path(__file__).resolve().parents[1]
TINY = ["backbone.name=vit_small_patch16_224.dino", "backbone.weights=null", "backbone.img_size=32",
        "backbone.kwargs.depth=2", "backbone.kwargs.embed_dim=64", "backbone.kwargs.num_heads=4",
        "data.batch_size=8", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "explain.enabled=false"]
RNG = np.random.default_rng(0)
NON_UTF8 = b"\xff\xfe-photo.png"  # a file name that is not UTF-8 (e.g. Latin-1 from an old camera)


# --------------------------------------------------------------------------------------------- bad files


def _png(h: int = 40, w: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_with_broken_huffman_table() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    i = 2
    while data[i + 1] != 0xC4:  # walk the marker segments to the first DHT (Huffman table)
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 21] = b"\xff" * 16  # impossible code counts
    return bytes(data)


def _bomb_png(side: int) -> bytes:
    """A real decompression bomb: a 1-bit side x side PNG of zeros, a few kB that decode to side^2 pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


BAD_FILES = {  # name -> (bytes, what the one-line reason says)
    "corrupt.jpg": (_jpeg_with_broken_huffman_table(), r"broken data stream"),
    "truncated.png": (_png()[:300], r"[Tt]runcated"),
    "empty.jpg": (b"", r"file is empty \(0 bytes\)"),
    "notes.jpg": (b"these are my notes, not a photo\n", r"not a recognised image format"),
    "bomb.png": (_bomb_png(12_000), r"too large, possible decompression bomb"),
}


def _write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _non_utf8(folder: Path) -> Path:
    path = os.path.join(os.fsencode(folder), NON_UTF8)
    with open(path, "wb") as f:
        f.write(_png())
    return Path(os.fsdecode(path))


@pytest.mark.parametrize("name", [*BAD_FILES, "bomb-over-pil-hard-limit.png"])
def test_each_bad_file_is_one_line_naming_file_reason_and_fix(tmp_path, name):
    data, reason = BAD_FILES.get(name) or (_bomb_png(20_000), r"decompression bomb")  # PIL's own error above 2x
    path = tmp_path / name
    path.write_bytes(data)
    assert re.search(reason, check_image(path))
    with pytest.raises(DataError) as e:
        load_image(path)
    msg = str(e.value)
    assert "\n" not in msg and re.fullmatch(rf"cannot read image {re.escape(str(path))}: .*{reason}.*; replace or "
                                            r"delete the file", msg), msg


def test_odd_but_valid_files_load(tmp_path):
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(_png(3, 3))  # smaller than one 16-pixel patch
    odd = _non_utf8(tmp_path)
    assert load_image(tiny).size == (3, 3) and load_image(odd).mode == "RGB"
    assert check_image(tiny) is None and check_image(odd) is None


def _imagefolder(root: Path, per_class: int = 6, classes=("cat", "dog")) -> Path:
    for c in classes:
        _write(root / c, {f"{i}.png": _png() for i in range(per_class)})
    return root


def _train(argv, capsys, quiet: bool = True) -> tuple[int, list[str]]:
    """train.main in-process -> (exit status, stderr lines written by train.py itself). quiet: ignore warnings (the
    test backbone's random-weights warning and Lightning's notices are not what is tested)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        rc = train.main([str(a) for a in argv])
    return rc, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_train_py_skips_every_bad_file_with_one_counted_warning(tmp_path, capsys):
    root = _imagefolder(tmp_path / "data")
    _write(root / "cat", {name: data for name, (data, _) in BAD_FILES.items()})
    (root / "dog" / "tiny.png").write_bytes(_png(3, 3))
    _non_utf8(root / "dog")
    out = tmp_path / "runs"
    with pytest.warns(UserWarning) as record:
        rc, err = _train([*TINY, "data.name=imagefolder", f"data.root={root}", "cache.enabled=true",
                          f"cache.dir={tmp_path / 'cache'}", f"out_dir={out}"], capsys, quiet=False)
    assert rc == 0 and not [ln for ln in err if ln.startswith("error")]
    skipped = [str(w.message) for w in record if "unreadable" in str(w.message)]
    assert len(skipped) == 1 and "\n" not in skipped[0]
    assert not [w for w in record if issubclass(w.category, Image.DecompressionBombWarning)]  # no second message
    assert re.fullmatch(r"skipped 5 unreadable images \(first: .*/cat/bomb\.png: .*decompression bomb.*\)", skipped[0])
    headers = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/header.json")]
    assert sum(h["n"] for h in headers) == 6 + 6 + 2  # the good files, the tiny one and the non-UTF-8 one


@pytest.fixture(scope="module")
def two_class_checkpoint(tmp_path_factory):
    import warnings

    from cdam_pl.config import load_config
    from cdam_pl.train.run import run_training

    tmp = tmp_path_factory.mktemp("two_class")
    root = _imagefolder(tmp / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_training(load_config(None, [*TINY, "data.name=imagefolder", f"data.root={root}",
                                                 "cache.enabled=false", f"out_dir={tmp / 'runs'}"]))
    return result["last_checkpoint"]


def test_explain_py_warns_once_per_bad_file_and_explains_the_rest(two_class_checkpoint, tmp_path, capsys):
    folder = tmp_path / "mixed"
    _write(folder, {name: data for name, (data, _) in BAD_FILES.items()})
    _write(folder, {"good.png": _png(), "tiny.png": _png(3, 3), "strip.png": _png(2, 60)})
    _non_utf8(folder)
    out = tmp_path / "explained"
    rc = explain.main([two_class_checkpoint, str(folder), "--out", str(out), "--targets", "pred", "--keep-aspect",
                       "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 0
    assert len(err) == len(BAD_FILES) and all(ln.startswith("warning: skipped: cannot read image ") for ln in err)
    for name, (_, reason) in BAD_FILES.items():
        assert sum(bool(re.search(rf"/{re.escape(name)}: .*{reason}.*; replace or delete the file$", ln))
                   for ln in err) == 1, name
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == sorted(BAD_FILES)
    images = {im["name"]: im for im in manifest["images"]}
    assert sorted(images) == sorted(["good.png", "tiny.png", "strip.png", r"\xff\xfe-photo.png"])
    # smaller than a patch, or thinner than one: at least one patch per side, never an empty grid
    assert images["tiny.png"]["original_size"] == [3, 3] and min(images["tiny.png"]["grid"]) >= 1
    assert images["strip.png"]["original_size"] == [2, 60] and images["strip.png"]["grid"][0] >= 1
    assert all(s % 16 == 0 for s in images["strip.png"]["input_size"])
    # a file name that is not UTF-8 is written as \xNN escapes: valid JSON, HTML and a drawable panel title
    odd = images[r"\xff\xfe-photo.png"]
    assert odd["path"].endswith(r"/\xff\xfe-photo.png") and (out / odd["panel"]).is_file()
    assert r"\xff\xfe-photo.png" in (out / "index.html").read_text(encoding="utf-8")
    assert r"\xff\xfe-photo.png" in " ".join(load_explanations(out))


# --------------------------------------------------------------------------------------------- fatal problems


def _folder_case(kind: str, root: Path) -> list[str]:
    """Builds the data for a fatal case; returns the data.* overrides."""
    if kind == "empty-class-folder":
        _imagefolder(root)
        (root / "emu").mkdir()
        return ["data.name=imagefolder", f"data.root={root}"]
    if kind == "class-only-in-val":
        _imagefolder(root / "train")
        _imagefolder(root / "val", per_class=2, classes=("cat", "dog", "emu"))
        return ["data.name=imagefolder", f"data.train_dir={root / 'train'}", f"data.val_dir={root / 'val'}"]
    if kind == "class-only-in-val-after-subset":
        _imagefolder(root)
        return ["data.name=imagefolder", f"data.root={root}", "data.train_size=1"]
    if kind == "every-image-of-a-class-unreadable":
        _imagefolder(root, classes=("cat",))
        _write(root / "dog", {"a.jpg": b"", "b.jpg": b"text"})
        return ["data.name=imagefolder", f"data.root={root}"]
    if kind == "non-utf8-class-folder":
        _imagefolder(root)
        os.mkdir(os.path.join(os.fsencode(root), b"b\xe9te"))
        _non_utf8(Path(os.fsdecode(os.path.join(os.fsencode(root), b"b\xe9te"))))
        return ["data.name=imagefolder", f"data.root={root}"]
    raise AssertionError(kind)


FATAL = [  # (case, extra overrides, message pattern)
    ("empty-class-folder", [], r"class folder .*/emu has no images; add images .* or remove the folder"),
    ("class-only-in-val", [], r"class folder\(s\) emu in .*/val are not among the training classes \(cat, dog\); add "
                              r"them to the training data or remove them"),
    ("class-only-in-val-after-subset", [], r"class\(es\) \w+ appear only in the validation set; increase train_size"),
    ("every-image-of-a-class-unreadable", [], r"no readable images left for class\(es\) dog in .*; first problem: "
                                              r".*/dog/a\.jpg: file is empty"),
    ("non-utf8-class-folder", [], r"class folder name 'b\\\\xe9te' in .* is not valid UTF-8; rename the folder"),
    ("empty-class-folder", ["trainer.max_epochs=abc"],
     r"trainer\.max_epochs='abc' has the wrong type: expected int or null"),
    ("empty-class-folder", ["data.batch_size=eight"], r"invalid config value: data\.batch_size: Value 'eight'"),
    ("empty-class-folder", ["trainer.devices=[1,2"], r"override value is not valid YAML"),
    ("empty-class-folder", ["trainer.max_epoch=3"], r"unknown trainer option trainer\.max_epoch \(did you mean "
                                                    r"trainer\.max_epochs\?\)"),
    ("empty-class-folder", ["backbone.name=vit_tiny_patch16_224_nope"],
     r"unknown backbone 'vit_tiny_patch16_224_nope'"),
    ("empty-class-folder", ["backbone.img_size=30"], r"image size 30x30 is not divisible by the patch size 16; resize "
                                                     r"to a multiple of 16"),
]


@pytest.mark.parametrize("case, extra, pattern", FATAL,
                         ids=[f"{c}{'+' + e[0].split('=')[0] if e else ''}" for c, e, _ in FATAL])
def test_train_py_fatal_problems_are_one_line_with_exit_2(tmp_path, capsys, case, extra, pattern):
    data = _folder_case(case, tmp_path / "data")
    rc, err = _train([*TINY, *data, *extra, f"out_dir={tmp_path / 'runs'}", f"cache.dir={tmp_path / 'cache'}"],
                     capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]


def test_train_py_wrong_type_is_the_only_stderr_line_in_a_real_process(tmp_path):
    """Formerly a TypeError traceback from inside Lightning; now refused before anything starts."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "data.name=digits",
                           "trainer.max_epochs=ten", f"out_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: trainer.max_epochs='ten' has the wrong type: expected int or null"]


DIGITS = ("data.train_size=96", "data.val_size=32", "data.batch_size=32")


@pytest.mark.parametrize("cached, value", [(True, float("nan")), (False, float("inf"))], ids=["nan-cached",
                                                                                             "inf-uncached"])
def test_non_finite_features_stop_train_py_with_one_line(tmp_path, capsys, monkeypatch, cached, value):
    """A backbone that outputs NaN/Inf (e.g. a damaged weights file): refused when the cache is built, or at the
    first training batch without the cache, before any NaN weights are saved."""
    real = FrozenViT.forward
    monkeypatch.setattr(FrozenViT, "forward", lambda self, x: real(self, x) * value)
    rc, err = _train(train_argv(tmp_path, (*DIGITS, f"cache.enabled={str(cached).lower()}")), capsys)
    assert rc == 2 and len(err) == 1, err
    if cached:
        assert re.fullmatch(r"error: feature cache: non-finite \(NaN/Inf\) features for sample 0 \(shard 0\); check "
                            r"backbone\.weights \(the backbone gives NaN/Inf\)", err[0]), err[0]
    else:
        assert re.fullmatch(r"error: training loss became NaN/Inf at epoch 0 batch 0: the backbone gives non-finite "
                            r"features \(check backbone\.weights\) or the head diverges \(lower optim\.lr\).*", err[0])
        assert not list(tmp_path.rglob("*.ckpt"))  # nothing was saved from a NaN step


def test_image_unreadable_inside_a_dataloader_worker_is_still_one_line(tmp_path, capsys, monkeypatch):
    """A file that passed the up-front check but fails when a worker process reads it (changed on disk, or a defect
    the cheap check misses): torch wraps the error with the worker's traceback; train.py prints the original line."""
    root = _imagefolder(tmp_path / "data")
    (root / "cat" / "0.png").write_bytes(_png()[:300])
    monkeypatch.setattr("cdam_pl.data.datasets.check_image", lambda path: None)  # the up-front check sees nothing wrong
    rc, err = _train([*TINY, "data.name=imagefolder", f"data.root={root}", "data.num_workers=1",
                      "cache.enabled=false", f"out_dir={tmp_path / 'runs'}"], capsys)
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(r"error: cannot read image .*/cat/0\.png: OSError: image file is truncated.*; replace or "
                        r"delete the file", err[0]), err[0]


def test_resume_with_checkpoint_of_other_classes_is_one_line(two_class_checkpoint, tmp_path, capsys):
    rc, err = _train(train_argv(tmp_path, (*DIGITS, f"resume={two_class_checkpoint}")), capsys)
    assert rc == 2 and len(err) == 1
    assert re.fullmatch(r"error: resume checkpoint .* was trained on classes \['cat', 'dog'\], the data has "
                        r"\['0', '1', .*\]; resume with the data it was trained on or start a new run \(resume=null\)",
                        err[0]), err[0]


# --------------------------------------------------------------------------------------------- the API


def test_out_of_range_class_index_in_the_api_is_a_clear_error():
    from cdam_pl.explain import CDAM

    backbone = tiny_backbone("p16")
    cdam = CDAM(backbone, torch.nn.Linear(backbone.embed_dim, 10))
    images = torch.randn(2, 3, 32, 48)
    for targets in ([99], [-1], torch.tensor([[0], [10]]), lambda logits: logits.argmax(1, keepdim=True) + 10):
        with pytest.raises(CdamError, match=r"target class index -?\d+ is out of range: the head has 10 classes "
                                            r"\(0\.\.9\)"):
            cdam.class_maps(images, targets)
    assert cdam.class_maps(images, [9]).shape == (2, 1, 2, 3)  # the last valid index works
