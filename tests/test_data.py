"""Tests for cdam_pl.data: loading, transforms, datasets, sampling and the data module."""

from __future__ import annotations

import gzip
import io
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_pl.data import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    DigitsDataset,
    FashionMNISTDataset,
    ImageDataModule,
    ImageFolderDataset,
    build_transform,
    check_image,
    list_images,
    load_image,
    stratified_split,
    stratified_subset,
    transform_id,
    validate_images,
)
from cdam_pl.errors import CdamError, ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _rgb(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def make_folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    """root/<class>/<i><ext> with `counts[class]` small random images."""
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _rgb(hash((c, i)) % 10_000).save(root / c / f"{i:03d}{ext}")
    return root


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _assert_one_line_naming(err: pytest.ExceptionInfo, path: Path) -> None:
    msg = str(err.value)
    assert str(path) in msg
    assert "\n" not in msg and "\r" not in msg
    assert isinstance(err.value, CdamError)


# ---------------------------------------------------------------------------------------------
# stratified sampling
# ---------------------------------------------------------------------------------------------


def test_stratified_subset_keeps_proportions_and_is_deterministic():
    targets = [0] * 600 + [1] * 300 + [2] * 100
    idx = stratified_subset(targets, 100, seed=3)
    assert len(idx) == 100 and len(set(idx)) == 100
    assert idx == sorted(idx)
    counts = Counter(targets[i] for i in idx)
    assert counts == {0: 60, 1: 30, 2: 10}
    assert stratified_subset(targets, 100, seed=3) == idx
    assert stratified_subset(targets, 100, seed=4) != idx


def test_stratified_subset_min_one_per_class_and_edge_cases():
    targets = [0] * 1000 + [1] * 5 + [2] * 5
    idx = stratified_subset(targets, 10, seed=0)
    counts = Counter(targets[i] for i in idx)
    assert len(idx) == 10 and set(counts) == {0, 1, 2}
    # fewer samples than classes: no minimum, still n samples
    assert len(stratified_subset(targets, 2, seed=0)) == 2
    # n >= len returns everything
    assert stratified_subset([0, 1, 1], 10) == [0, 1, 2]
    with pytest.raises(ConfigError):
        stratified_subset(targets, 0)


def test_stratified_split_no_overlap_all_classes_in_train():
    targets = [0] * 50 + [1] * 20 + [2] * 2 + [3] * 1
    tr, va = stratified_split(targets, 0.25, seed=1)
    assert not set(tr) & set(va)
    assert sorted(tr + va) == list(range(len(targets)))
    assert {targets[i] for i in tr} == {0, 1, 2, 3}
    assert 3 not in {targets[i] for i in va}  # single-sample class stays in train
    c = Counter(targets[i] for i in va)
    assert c[0] in (12, 13) and c[1] == 5
    assert stratified_split(targets, 0.25, seed=1) == (tr, va)
    with pytest.raises(ConfigError):
        stratified_split(targets, 1.0)


# ---------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------


def test_load_rgb_roundtrip(tmp_path):
    img = _rgb(0)
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == img.size
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_load_grayscale(tmp_path):
    arr = np.full((5, 7), 77, np.uint8)
    arr[0, 0] = 200
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert tuple(out[0, 0]) == (200, 200, 200) and tuple(out[1, 1]) == (77, 77, 77)


def test_load_rgba_composited_on_white(tmp_path):
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 0)  # fully transparent -> white
    arr[0, 1] = (0, 0, 255, 255)  # opaque blue
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 2])


def test_load_la_composited_on_white(tmp_path):
    arr = np.zeros((3, 3, 2), np.uint8)
    arr[..., 0] = 10
    arr[0, 0, 1] = 255
    Image.fromarray(arr, "LA").save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    assert tuple(out[0, 0]) == (10, 10, 10) and tuple(out[1, 1]) == (255, 255, 255)


def test_load_palette(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 9))
    img.putpixel((1, 2), 2)
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "p.png")
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert out.shape == (4, 4, 3)
    assert tuple(out[2, 1]) == (200, 100, 50) and tuple(out[0, 0]) == (10, 20, 30)


def test_load_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 3), 0)
    img.putpalette([1, 2, 3, 40, 50, 60] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 1)
    img.save(tmp_path / "pt.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "pt.png"))
    assert tuple(out[0, 0]) == (40, 50, 60) and tuple(out[1, 1]) == (255, 255, 255)


def test_load_16bit_png(tmp_path):
    arr = np.zeros((4, 4), np.uint16)
    arr[0, 0] = 65535
    arr[0, 1] = 257 * 100
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (100, 100, 100)
    assert tuple(out[1, 1]) == (0, 0, 0)


def test_load_32bit_int_tiff(tmp_path):
    arr = np.zeros((3, 3), np.int32)
    arr[1, 2] = 257 * 50
    Image.fromarray(arr, "I").save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    out = np.asarray(load_image(tmp_path / "i.tif"))
    assert tuple(out[1, 2]) == (50, 50, 50) and out.dtype == np.uint8


def test_load_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(tmp_path / "c.jpg")
    out = np.asarray(load_image(tmp_path / "c.jpg"))
    assert out.shape == (8, 8, 3) and out.min() > 240  # white


def test_exif_orientation_honoured(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40
    arr[:5, :5] = (255, 0, 0)  # red top-left corner
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "o.png", exif=exif)
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    for name in ("o.png", "o.jpg"):
        out = load_image(tmp_path / name)
        assert out.size == (20, 40), name  # (W, H) swapped
    out = np.asarray(load_image(tmp_path / "o.png"))
    assert tuple(out[0, -1]) == (255, 0, 0)  # top-left went to top-right
    assert tuple(out[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["zero_byte", "text_as_jpg", "truncated_png", "corrupt_jpeg",
                                  "truncated_jpeg", "missing", "directory"])
def test_bad_files_raise_one_line_dataerror(tmp_path, kind):
    img = _rgb(1, size=(64, 64))
    path = tmp_path / f"bad_{kind}.jpg"
    if kind == "zero_byte":
        path.write_bytes(b"")
    elif kind == "text_as_jpg":
        path.write_text("this is not an image\nsecond line\n")
    elif kind == "truncated_png":
        path = tmp_path / "bad.png"
        data = _png_bytes(img)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt_jpeg":
        data = bytearray(_jpeg_bytes(img))
        data[2:300] = bytes(range(256)) + bytes(42)
        path.write_bytes(bytes(data))
    elif kind == "truncated_jpeg":
        data = _jpeg_bytes(img)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    with pytest.raises(DataError) as err:
        load_image(path)
    _assert_one_line_naming(err, path)
    if kind != "directory":
        assert check_image(path) is not None


def test_decompression_bomb(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warn level
    with pytest.raises(DataError) as err:
        load_image(tmp_path / "big.png")
    _assert_one_line_naming(err, tmp_path / "big.png")
    assert "decompression bomb" in str(err.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # error level (> 2x)
    with pytest.raises(DataError):
        load_image(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_image(tmp_path / "big.png") is not None


def test_check_image_accepts_good_files(tmp_path):
    _rgb(0).save(tmp_path / "a.png")
    _rgb(0).save(tmp_path / "a.jpg")
    _rgb(0).save(tmp_path / "a.bmp")
    for name in ("a.png", "a.jpg", "a.bmp"):
        assert check_image(tmp_path / name) is None


# ---------------------------------------------------------------------------------------------
# list_images
# ---------------------------------------------------------------------------------------------


def test_list_images_files_folders_globs(tmp_path):
    make_folder(tmp_path / "d", {"x": 2, "y": 1})
    _rgb(0).save(tmp_path / "d" / "x" / "UPPER.JPG")
    (tmp_path / "d" / "x" / "notes.txt").write_text("hi")
    (tmp_path / "d" / "x" / ".hidden.png").write_bytes(b"")
    single = tmp_path / "single.png"
    _rgb(1).save(single)
    got = list_images(tmp_path / "d")
    assert [p.name for p in got] == ["000.png", "001.png", "UPPER.JPG", "000.png"]
    assert got == sorted(got)
    assert list_images(str(single)) == [single]
    globbed = list_images([str(tmp_path / "d" / "*" / "*.png"), single, tmp_path / "d" / "y"])
    assert len(globbed) == 4  # duplicates removed
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="no images"):
        list_images(str(tmp_path / "*.gif"))


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------


def test_build_transform_shapes_and_normalisation():
    img = Image.new("RGB", (30, 50), (255, 0, 128))
    t = build_transform((16, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = t(img)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 24)) and torch.allclose(x[1], -torch.ones(16, 24))
    assert build_transform(8)(img).shape == (3, 8, 8)
    aug = build_transform(8, augment=True)
    assert aug(img).shape == (3, 8, 8)
    with pytest.raises(ConfigError):
        build_transform(0)
    with pytest.raises(ConfigError):
        build_transform(8, interpolation="cubic-ish")
    with pytest.raises(ConfigError):
        build_transform(8, std=(0.0, 1.0, 1.0))
    with pytest.raises(ConfigError):
        build_transform(8, mean=(0.5, 0.5))


def test_transform_id_stable_and_sensitive():
    base = transform_id(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert base == transform_id((224, 224), [0.5, 0.5, 0.5], (0.5, 0.5, 0.5))
    assert isinstance(base, str)
    variants = {
        transform_id(256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        transform_id((224, 256), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        transform_id(224, (0.4, 0.5, 0.5), (0.5, 0.5, 0.5)),
        transform_id(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.6)),
        transform_id(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation="bilinear"),
        transform_id(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), augment=True),
    }
    assert base not in variants and len(variants) == 6


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------


def test_image_folder_dataset(tmp_path):
    root = make_folder(tmp_path / "data", {"cat": 3, "dog": 2})
    ds = ImageFolderDataset(root, transform=build_transform(8))
    assert ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1]
    assert len(ds) == 5 and len(set(ds.ids)) == 5
    assert all(Path(i).is_absolute() and Path(i).exists() for i in ds.ids)
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and y == 1
    raw = ds.load_image(0)
    assert raw.mode == "RGB"
    sub = ds.subset([4, 0])
    assert sub.targets == [1, 0] and sub.ids == [ds.ids[4], ds.ids[0]] and sub.classes == ds.classes


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found") as err:
        ImageFolderDataset(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)
    root = make_folder(tmp_path / "d", {"a": 2})
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as err:
        ImageFolderDataset(root)
    assert str(root / "b") in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "flat").mkdir()
    _rgb(0).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="subfolder"):
        ImageFolderDataset(tmp_path / "flat")


def test_image_folder_unreadable_item_raises_on_getitem(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 1, "b": 1})
    bad = root / "b" / "zzz.jpg"
    bad.write_text("not an image")
    ds = ImageFolderDataset(root, transform=build_transform(8))
    i = ds.ids.index(str(bad))
    with pytest.raises(DataError) as err:
        ds[i]
    _assert_one_line_naming(err, bad)
    bad_list = validate_images(ds)
    assert [(j, p) for j, p, _ in bad_list] == [(i, str(bad))]


def _write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_synthetic_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", imgs, 2051)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    ds = FashionMNISTDataset(tmp_path, "test", transform=build_transform(16))
    assert len(ds) == 20 and ds.classes == list(FASHION_MNIST_CLASSES)
    assert ds.ids[7] == "fashion_mnist/test/7" and ds.targets[7] == 7
    x, y = ds[7]
    assert x.shape == (3, 16, 16) and y == 7
    raw = np.asarray(ds.load_image(3))
    assert raw.shape == (28, 28, 3) and (raw[..., 0] == raw[..., 2]).all()
    # truncated file -> DataError
    data = (tmp_path / "train-images-idx3-ubyte.gz").read_bytes()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        raw_bytes = f.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw_bytes[:-5])
    with pytest.raises(DataError, match="truncated"):
        FashionMNISTDataset(tmp_path, "train")
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(data)


def test_fashion_mnist_missing_gives_install_hint(tmp_path):
    with pytest.raises(DataError) as err:
        FashionMNISTDataset(tmp_path / "nowhere")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg
    assert str(tmp_path / "nowhere") in msg


_HAVE_FMNIST = (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.mark.skipif(not _HAVE_FMNIST, reason="Debian Fashion-MNIST files not installed")
def test_fashion_mnist_real():
    ds = FashionMNISTDataset(split="test", transform=build_transform(32))
    assert len(ds) == 10_000
    assert ds.classes == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                          "Shirt", "Sneaker", "Bag", "Ankle boot"]
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    dm = ImageDataModule("fashion_mnist", train_size=100, val_size=50, img_size=32,
                         batch_size=20)
    dm.setup()
    assert len(dm.train_dataset) == 100 and len(dm.val_dataset) == 50
    assert Counter(dm.train_dataset.targets) == {k: 10 for k in range(10)}
    assert all(i.startswith("fashion_mnist/train/") for i in dm.train_dataset.ids)
    assert all(i.startswith("fashion_mnist/test/") for i in dm.val_dataset.ids)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (20, 3, 32, 32) and yb.shape == (20,)


def test_digits_dataset_and_module():
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.classes == [str(i) for i in range(10)]
    from sklearn.datasets import load_digits

    raw = np.asarray(ds.load_image(0))
    expected = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    assert raw.shape == (8, 8, 3) and raw.dtype == np.uint8
    assert np.array_equal(raw[..., 1], expected)
    dm = ImageDataModule("digits", img_size=16, batch_size=32, val_split=0.2, seed=5)
    assert dm.num_classes == 10  # triggers setup
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert abs(len(dm.val_dataset) - 359) <= 1
    assert not set(dm.train_dataset.ids) & set(dm.val_dataset.ids)
    xb, yb = next(iter(dm.val_dataloader()))
    assert xb.shape == (32, 3, 16, 16) and yb.dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# data module
# ---------------------------------------------------------------------------------------------


def test_module_single_root_stratified_split(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 10, "b": 5, "c": 5})
    dm = ImageDataModule("imagefolder", root=root, val_split=0.2, img_size=8, batch_size=4, seed=1)
    dm.setup()
    tr, va = dm.train_dataset, dm.val_dataset
    assert dm.classes == ["a", "b", "c"] and dm.num_classes == 3
    assert not set(tr.ids) & set(va.ids)
    assert len(tr) + len(va) == 20 and len(va) == 4
    assert set(tr.targets) == {0, 1, 2}
    assert Counter(va.targets) == {0: 2, 1: 1, 2: 1}
    # deterministic for a seed, idempotent setup
    dm2 = ImageDataModule("imagefolder", root=root, val_split=0.2, img_size=8, seed=1)
    dm2.setup()
    assert dm2.val_dataset.ids == va.ids
    dm.setup("fit")
    assert dm.train_dataset is tr


def test_module_dataloaders(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    dm = ImageDataModule(root=root, val_split=0.25, img_size=(8, 12), batch_size=5, seed=0,
                         augment=True)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert [b[0].shape for b in batches] == [(5, 3, 8, 12), (4, 3, 8, 12)]
    order1 = torch.cat([b[1] for b in batches])
    order2 = torch.cat([b[1] for b in dm.train_dataloader()])
    assert torch.equal(order1, order2)  # seeded shuffle
    v1 = next(iter(dm.val_dataloader()))[0]
    v2 = next(iter(dm.val_dataloader()))[0]
    assert v1.shape == (3, 3, 8, 12) and torch.equal(v1, v2)  # eval transform, not shuffled
    e = next(iter(dm.eval_dataloader("train")))[0]
    assert torch.equal(e, next(iter(dm.eval_dataloader("train")))[0])
    assert dm.eval_transform(Image.new("RGB", (20, 20))).shape == (3, 8, 12)


def test_module_train_and_val_dirs(tmp_path):
    tr = make_folder(tmp_path / "train", {"a": 3, "b": 3})
    va = make_folder(tmp_path / "val", {"a": 1, "b": 2})
    dm = ImageDataModule(train_dir=tr, val_dir=va, img_size=8)
    dm.setup()
    assert len(dm.train_dataset) == 6 and len(dm.val_dataset) == 3
    make_folder(tmp_path / "val", {"zebra": 1})
    dm = ImageDataModule(train_dir=tr, val_dir=va, img_size=8)
    with pytest.raises(DataError, match="zebra"):
        dm.setup()


def test_module_class_only_in_val_from_train_size(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 20, "b": 20, "c": 20})
    dm = ImageDataModule(root=root, train_size=2, img_size=8)
    with pytest.raises(DataError, match="only in the validation"):
        dm.setup()


def test_module_skips_unreadable_with_counted_warning(tmp_path):
    root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
    (root / "a" / "broken.png").write_bytes(_png_bytes(_rgb(0, (64, 64)))[:100])
    (root / "b" / "empty.jpg").write_bytes(b"")
    (root / "b" / "text.jpg").write_text("nope")
    dm = ImageDataModule(root=root, val_split=0.2, img_size=8)
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable images \(first: .*broken\.png"):
        dm.setup()
    all_ids = dm.train_dataset.ids + dm.val_dataset.ids
    assert len(all_ids) == 10 and not any("broken" in i or "text" in i for i in all_ids)


def test_module_config_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        ImageDataModule("cifar")
    for name in DATASET_NAMES:
        assert name in str(err.value)
    with pytest.raises(ConfigError):
        ImageDataModule("imagefolder")  # no root
    with pytest.raises(ConfigError):
        ImageDataModule("digits", val_split=0)
    with pytest.raises(ConfigError):
        ImageDataModule("digits", batch_size=0)
    with pytest.raises(ConfigError):
        ImageDataModule("digits", train_size=-1)
    dm = ImageDataModule(root=tmp_path / "missing")  # cheap: no IO until setup
    with pytest.raises(DataError, match="not found"):
        dm.setup()


def test_bundled_photos_load_from_their_packages_without_a_download(monkeypatch):
    import sys

    from skimage import data as skdata

    from cdam_pl.data.photos import PHOTOS, load_photo

    assert {p.package for p in PHOTOS.values()} == {"scikit-image", "scikit-learn", "matplotlib"}
    for name in PHOTOS:
        im = load_photo(name)
        assert im.mode == "RGB" and min(im.size) >= 300, name
    assert np.array_equal(np.asarray(load_photo("coffee")), skdata.coffee())
    assert np.array_equal(np.asarray(load_photo("motorcycle")), skdata.stereo_motorcycle()[0])  # the left view
    with pytest.raises(DataError, match="unknown photo 'cat'; choose from chelsea, coffee"):
        load_photo("cat")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(DataError, match="ships with scikit-learn: pip install scikit-learn"):
        load_photo("china")
