"""Images, datasets and the Lightning data module.

* `load_image` opens any common image file as 8-bit RGB, or raises a one-line `DataError`.
* `list_images` expands files, folders and globs into a sorted list of image files.
* `build_transform` / `transform_id` make the preprocessing pipeline and a stable key for it.
* `ImageFolderDataset`, `FashionMNISTDataset`, `DigitsDataset` yield `(tensor, label)` and expose
  `.classes`, `.targets` and `.ids` (a stable per-sample identifier).
* `stratified_subset` / `stratified_split` pick class-balanced, seeded index sets.
* `ImageDataModule` ties it together for Lightning.
"""

from __future__ import annotations

import copy
import glob
import gzip
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from cdam_pl.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "DATASET_NAMES",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "load_image",
    "check_image",
    "path_text",
    "list_images",
    "parse_img_size",
    "build_transform",
    "transform_id",
    "ImageDataset",
    "ImageFolderDataset",
    "FashionMNISTDataset",
    "DigitsDataset",
    "validate_images",
    "stratified_subset",
    "stratified_split",
    "ImageDataModule",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}
DATASET_NAMES: tuple[str, ...] = ("imagefolder", "fashion_mnist", "digits")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_FIX_HINT = "replace or delete the file"


# --------------------------------------------------------------------------------------------
# Image loading
# --------------------------------------------------------------------------------------------


def _one_line(text: object) -> str:
    """Collapse whitespace so a message fits on one line."""
    return " ".join(str(text).split())


def _reason(exc: BaseException) -> str:
    """A short, one-line description of why PIL could not read a file."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format (or its header is corrupt)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image is too large, possible decompression bomb ({_one_line(exc)})"
    msg = _one_line(exc)
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def path_text(path: str | os.PathLike[str]) -> str:
    """`path` as printable UTF-8 text: bytes of a file name that are not UTF-8 are shown as `\\xNN`.

    Python keeps such bytes as lone surrogates (os.fsdecode), which JSON, HTML, fonts and strict UTF-8 streams
    refuse; use this wherever a path is written or drawn.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_error(path: Path | str, reason: str, hint: str = _FIX_HINT) -> DataError:
    return DataError(_one_line(f"cannot read image {path_text(path)}: {reason}; {hint}"))


def _file_problem(path: Path) -> tuple[str, str] | None:
    """`(reason, hint)` if `path` is not an existing, non-empty regular file, else None."""
    try:
        if not path.exists():
            return "file not found", "check the path"
        if not path.is_file():
            return "not a regular file", "pass an image file"
        if path.stat().st_size == 0:
            return "file is empty (0 bytes)", _FIX_HINT
    except OSError as exc:  # permission problems, broken mounts
        return _reason(exc), "check the file's permissions"
    return None


def _bomb_check(im: Image.Image) -> None:
    """Treat images above PIL's warning threshold as decompression bombs."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        raise Image.DecompressionBombError(
            f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the limit of "
            f"{limit} pixels"
        )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit int holding 16-bit) grayscale: scale 0..65535 -> 0..255.
        arr = np.asarray(im).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        # Float grayscale: assume [0, 1] when that is its range, else [0, 255].
        arr = np.asarray(im).astype(np.float64)
        arr = np.nan_to_num(arr)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as a fully loaded 8-bit RGB PIL image.

    Honours EXIF orientation; converts grayscale, palette, 16-bit and alpha images (alpha is
    composited on white). Raises `DataError` (one line, naming the file) for a missing, empty,
    non-image, truncated, corrupt or oversized (decompression bomb) file.
    """
    p = Path(path)
    problem = _file_problem(p)
    if problem is not None:
        raise _read_error(p, *problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _bomb_check(im)
                im.load()
                im = ImageOps.exif_transpose(im)  # returns a detached copy
        rgb = _to_rgb(im)
        if rgb.mode != "RGB":  # defensive: never hand back anything else
            rgb = rgb.convert("RGB")
        return rgb
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _read_error(p, _reason(exc)) from exc


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Cheaply check that a file is a readable image; return a one-line reason if it is not.

    PNGs are checked with `verify()` (all chunk CRCs), JPEGs are decoded at 1/8 scale (catches
    truncation), other formats are fully decoded. Does not change warning filters, so it is
    safe to call from threads.
    """
    p = Path(path)
    problem = _file_problem(p)
    if problem is not None:
        return problem[0]
    try:
        with Image.open(p) as im:
            _bomb_check(im)
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except Exception as exc:
        return _reason(exc)
    return None


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _walk_images(folder: Path) -> list[Path]:
    """Image files below `folder` (recursive), skipping hidden files and folders."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            f = Path(dirpath) / name
            if _is_image_name(f) and f.is_file():
                found.append(f)
    return sorted(found)


def list_images(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand image files, folders (recursive) and glob patterns into a sorted, unique list.

    Explicitly named files are kept whatever their extension; folders and globs contribute
    files with an extension in `IMAGE_EXTENSIONS`. Raises `DataError` for a path that does not
    exist or when nothing is found.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: set[Path] = set()
    for item in items:
        text = os.fspath(item)
        p = Path(text).expanduser()
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(_walk_images(p))
        elif glob.has_magic(text):
            for match in glob.glob(os.path.expanduser(text), recursive=True):
                m = Path(match)
                if m.is_dir():
                    found.update(_walk_images(m))
                elif m.is_file() and _is_image_name(m):
                    found.add(m)
        else:
            raise DataError(f"input not found: {text}; pass an image file, a folder or a glob")
    if not found:
        shown = ", ".join(os.fspath(i) for i in items[:3]) + (" ..." if len(items) > 3 else "")
        raise DataError(
            f"no images found in {shown or '(no inputs)'}; supported extensions: "
            f"{' '.join(IMAGE_EXTENSIONS)}"
        )
    return sorted(found)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def parse_img_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an image size (int or (H, W)) to a `(H, W)` tuple of positive ints."""
    if isinstance(img_size, bool):
        raise ConfigError(f"img_size must be an int or (H, W), got {img_size!r}")
    if isinstance(img_size, (int, np.integer)):
        size = (int(img_size), int(img_size))
    elif isinstance(img_size, Sequence) and not isinstance(img_size, str) and len(img_size) == 2:
        try:
            size = (int(img_size[0]), int(img_size[1]))
        except (TypeError, ValueError):
            raise ConfigError(f"img_size must be an int or (H, W), got {img_size!r}") from None
        if size[0] != img_size[0] or size[1] != img_size[1]:
            raise ConfigError(f"img_size must contain whole numbers, got {img_size!r}")
    else:
        raise ConfigError(f"img_size must be an int or (H, W), got {img_size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ConfigError(f"img_size must be positive, got {img_size!r}")
    return size


def _check_stats(name: str, values: Sequence[float], positive: bool) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}") from None
    if len(vals) != 3 or not all(np.isfinite(vals)):
        raise ConfigError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}")
    if positive and min(vals) <= 0:
        raise ConfigError(f"{name} must be positive, got {values!r}")
    return vals


def _interp(interpolation: str) -> InterpolationMode:
    key = str(interpolation).lower()
    if key not in INTERPOLATIONS:
        raise ConfigError(
            f"unknown interpolation {interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}"
        )
    return INTERPOLATIONS[key]


def build_transform(
    img_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    augment: bool = False,
) -> v2.Compose:
    """Transform from an RGB PIL image to a normalised float tensor of shape [3, H, W].

    Eval: `Resize((H, W))` (exact size, so the ViT patch grid is fixed). Augment:
    `RandomResizedCrop((H, W))` + `RandomHorizontalFlip`.
    """
    size = parse_img_size(img_size)
    mode = _interp(interpolation)
    mean_t = _check_stats("mean", mean, positive=False)
    std_t = _check_stats("std", std, positive=True)
    if augment:
        geometry = [
            v2.RandomResizedCrop(size, interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [v2.Resize(size, interpolation=mode, antialias=True)]
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean_t), std=list(std_t)),
        ]
    )


def transform_id(
    img_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    augment: bool = False,
) -> str:
    """Stable string describing `build_transform(...)` with the same arguments (a cache key)."""
    h, w = parse_img_size(img_size)
    _interp(interpolation)
    fmt = lambda vals: ",".join(format(v, ".8g") for v in vals)  # noqa: E731
    m = fmt(_check_stats("mean", mean, positive=False))
    s = fmt(_check_stats("std", std, positive=True))
    geometry = "rrcrop+hflip" if augment else "resize"
    return f"rgb8|{geometry}:{h}x{w}:{str(interpolation).lower()}|tensor01|norm:{m}/{s}|v1"


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

_KEEP: Any = object()


class ImageDataset(Dataset):
    """Base: `(transform(rgb_image), label)` samples with `.classes`, `.targets`, `.ids`.

    Subclasses implement `load_image(i)` (an RGB PIL image) and `_take(indices)`.
    With `transform=None` the PIL image itself is returned.
    """

    classes: list[str]
    targets: list[int]
    ids: list[str]
    transform: Callable[[Image.Image], Any] | None

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:
        """The untransformed RGB image of sample `index`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _take(self, indices: np.ndarray) -> None:
        """Keep only `indices` of the per-sample storage (called on a shallow copy)."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int], transform: Any = _KEEP) -> "ImageDataset":
        """A new dataset of the same type holding `indices` (classes unchanged)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)}")
        out = copy.copy(self)
        out.targets = [self.targets[i] for i in idx]
        out.ids = [self.ids[i] for i in idx]
        out._take(idx)
        if transform is not _KEEP:
            out.transform = transform
        return out

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> "ImageDataset":
        """A shallow copy using another transform."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={len(self.classes)})"


class ImageFolderDataset(ImageDataset):
    """One subfolder per class (sorted names); images below each are found recursively.

    `classes` fixes the class list/order (e.g. a val folder reusing the train classes): a
    subfolder not in it is an error, a class without a subfolder simply has no samples.
    Unreadable images raise `DataError` naming the file when loaded; see `validate_images`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.transform = transform
        if not self.root.exists():
            raise DataError(f"image folder not found: {self.root}; check data.root / the path")
        if not self.root.is_dir():
            raise DataError(f"not a folder: {self.root}; pass a folder with one subfolder per class")
        try:
            subdirs = sorted(
                d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")
            )
        except OSError as exc:
            raise DataError(f"cannot list folder {self.root}: {_reason(exc)}") from exc
        if not subdirs:
            raise DataError(
                f"no class subfolders in {self.root}; expected one subfolder per class, "
                "e.g. root/cat/*.jpg, root/dog/*.jpg"
            )
        for d in subdirs:  # class names end up in checkpoints, logs and pictures: they must be text
            if path_text(d) != d:
                raise DataError(f"class folder name {path_text(d)!r} in {path_text(self.root)} is not valid UTF-8; "
                                "rename the folder (class names are stored in checkpoints and drawn in pictures)")
        if classes is None:
            self.classes = list(subdirs)
        else:
            self.classes = [str(c) for c in classes]
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"duplicate class names in {self.classes}")
            extra = [d for d in subdirs if d not in self.classes]
            if extra:
                raise DataError(
                    f"class folder(s) {', '.join(extra)} in {self.root} are not among the "
                    f"training classes ({', '.join(self.classes)}); add them to the training "
                    "data or remove them"
                )
        self.paths: list[Path] = []
        targets: list[int] = []
        for label, name in enumerate(self.classes):
            folder = self.root / name
            if not folder.is_dir():
                continue
            files = _walk_images(folder)
            if not files:
                raise DataError(
                    f"class folder {folder} has no images; add images "
                    f"({' '.join(IMAGE_EXTENSIONS)}) or remove the folder"
                )
            self.paths.extend(files)
            targets.extend([label] * len(files))
        self.targets = targets
        self.ids = [os.path.abspath(p) for p in self.paths]

    def load_image(self, index: int) -> Image.Image:
        return load_image(self.paths[index])

    def _take(self, indices: np.ndarray) -> None:
        self.paths = [self.paths[i] for i in indices]


class _ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 array [N, H, W] (grayscale) or [N, H, W, 3]."""

    images: np.ndarray

    def load_image(self, index: int) -> Image.Image:
        arr = self.images[index]
        return Image.fromarray(arr, "L" if arr.ndim == 2 else "RGB").convert("RGB")

    def _take(self, indices: np.ndarray) -> None:
        self.images = self.images[indices]


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {_reason(exc)}; reinstall the dataset") from exc
    if len(data) < 8:
        raise DataError(f"{path} is too short to be an IDX file; reinstall the dataset")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{path} is not an IDX file of the expected kind; reinstall the dataset")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt; reinstall the dataset")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


class FashionMNISTDataset(_ArrayDataset):
    """Fashion-MNIST from the raw IDX files (`.gz` or uncompressed), 28x28 gray -> RGB.

    `split` is "train" (60k) or "test" (10k, the t10k files). ids: "fashion_mnist/<split>/<i>"
    with `i` the index in the official file.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ConfigError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        self.root = Path(root if root is not None else FASHION_MNIST_ROOT).expanduser()
        self.split = split
        self.transform = transform
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(self._find(f"{prefix}-images-idx3-ubyte"), 2051)
        labels = _read_idx(self._find(f"{prefix}-labels-idx1-ubyte"), 2049)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST files in {self.root} do not match; reinstall them")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"Fashion-MNIST labels in {self.root} are out of range; reinstall them")
        self.images = images
        self.classes = list(FASHION_MNIST_CLASSES)
        self.targets = labels.astype(int).tolist()
        self.ids = [f"fashion_mnist/{split}/{i}" for i in range(len(labels))]

    def _find(self, stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (self.root / name).is_file():
                return self.root / name
        raise DataError(
            f"Fashion-MNIST not found in {self.root} (missing {stem}.gz): install it with "
            "`apt-get install dataset-fashion-mnist` or set data.root"
        )


class DigitsDataset(_ArrayDataset):
    """scikit-learn's bundled 8x8 digits (1797 images), values 0..16 scaled to 0..255.

    Classes "0".."9"; ids "digits/<i>" with `i` the index in `load_digits()`. The data module
    splits it into train/val with `stratified_split`.
    """

    def __init__(self, transform: Callable[[Image.Image], Any] | None = None) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        self.transform = transform
        self.images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        self.classes = [str(i) for i in range(10)]
        self.targets = [int(t) for t in bunch.target]
        self.ids = [f"digits/{i}" for i in range(len(self.targets))]


def validate_images(dataset: ImageDataset, num_threads: int | None = None) -> list[tuple[int, str, str]]:
    """Check every file of an `ImageFolderDataset`; return `(index, path, reason)` for bad ones.

    In-memory datasets (no `.paths`) are always valid and return `[]`.
    """
    paths = getattr(dataset, "paths", None)
    if not paths:
        return []
    workers = num_threads or min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():  # PIL's bomb warning would be a second, multi-line message for a skipped file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if workers > 1 and len(paths) > 32:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                reasons = list(pool.map(check_image, paths, chunksize=16))
        else:
            reasons = [check_image(p) for p in paths]
    return [(i, path_text(paths[i]), r) for i, r in enumerate(reasons) if r is not None]


# --------------------------------------------------------------------------------------------
# Stratified sampling
# --------------------------------------------------------------------------------------------


def _allocate(counts: np.ndarray, n: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer per-class allocation summing to `n`, close to proportional, within [lo, hi]."""
    quota = n * counts / counts.sum()
    alloc = np.clip(np.floor(quota).astype(np.int64), lo, hi)
    order = np.arange(len(counts))
    while alloc.sum() < n:  # give to the class furthest below its quota
        gap = np.where(alloc < hi, quota - alloc, -np.inf)
        alloc[np.lexsort((order, -gap))[0]] += 1
    while alloc.sum() > n:  # take from the class furthest above its quota
        gap = np.where(alloc > lo, alloc - quota, -np.inf)
        alloc[np.lexsort((order, -gap))[0]] -= 1
    return alloc


def _check_count(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def stratified_subset(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """Sorted indices of `n` samples keeping class proportions; deterministic for `seed`.

    Every class gets at least one sample when `n >= number of classes`. `n >= len(targets)`
    returns all indices.
    """
    n = _check_count("subset size", n)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if n >= len(t):
        return list(range(len(t)))
    labels, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    lo = np.full(len(labels), 1 if n >= len(labels) else 0, dtype=np.int64)
    alloc = _allocate(counts, n, lo, counts)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for k in range(len(labels)):
        members = np.flatnonzero(inverse == k)
        chosen.append(rng.permutation(members)[: alloc[k]])
    return sorted(int(i) for i in np.concatenate(chosen))


def stratified_split(
    targets: Sequence[int], val_split: float, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded stratified `(train_indices, val_indices)`; every class keeps >= 1 training sample.

    `val_split` is a fraction in (0, 1); classes with a single sample go to train only.
    """
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)) or not 0 < val_split < 1:
        raise ConfigError(f"val_split must be a fraction between 0 and 1, got {val_split!r}")
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    labels, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    hi = counts - 1
    n_val = min(int(round(val_split * len(t))), int(hi.sum()))
    if n_val < 1:
        raise DataError(
            f"too few images ({len(t)}) to split off a validation set with val_split={val_split}; "
            "add images or give a separate val_dir"
        )
    lo = np.where(hi >= 1, 1, 0) if n_val >= int((hi >= 1).sum()) else np.zeros_like(hi)
    alloc = _allocate(counts, n_val, lo, hi)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(t), dtype=bool)
    for k in range(len(labels)):
        members = np.flatnonzero(inverse == k)
        val[rng.permutation(members)[: alloc[k]]] = True
    return np.flatnonzero(~val).tolist(), np.flatnonzero(val).tolist()


# --------------------------------------------------------------------------------------------
# Lightning data module
# --------------------------------------------------------------------------------------------


class ImageDataModule(L.LightningDataModule):
    """Train/val datasets and loaders for "imagefolder", "fashion_mnist" or "digits".

    imagefolder: `train_dir` + `val_dir`, or a single folder (`root`, or `train_dir` alone) split
    with a seeded stratified `val_split`. fashion_mnist: official train / t10k files under
    `root` (default `FASHION_MNIST_ROOT`). digits: scikit-learn digits split by `val_split`.
    `train_size` / `val_size` take seeded stratified subsets after splitting.
    `classes` / `num_classes` trigger `setup()` if needed; `setup()` is idempotent.
    """

    def __init__(
        self,
        name: str = "imagefolder",
        root: str | os.PathLike[str] | None = None,
        train_dir: str | os.PathLike[str] | None = None,
        val_dir: str | os.PathLike[str] | None = None,
        val_split: float = 0.2,
        train_size: int | None = None,
        val_size: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        augment: bool = False,
        img_size: int | Sequence[int] = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
        seed: int = 0,
        validate: bool = True,
    ) -> None:
        super().__init__()
        key = str(name).lower().replace("-", "_")
        if key not in DATASET_NAMES:
            raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
        if key == "imagefolder":
            if root is None and train_dir is None:
                raise ConfigError("dataset 'imagefolder' needs data.root or data.train_dir")
            if val_dir is not None and train_dir is None:
                raise ConfigError("data.val_dir needs data.train_dir as well")
            if root is not None and train_dir is not None:
                raise ConfigError("give either data.root or data.train_dir (+ val_dir), not both")
        if not (isinstance(val_split, (int, float)) and not isinstance(val_split, bool)
                and 0 < val_split < 1):
            raise ConfigError(f"val_split must be a fraction between 0 and 1, got {val_split!r}")
        for field, value in (("train_size", train_size), ("val_size", val_size)):
            if value is not None:
                _check_count(field, value)
        self.batch_size = _check_count("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.name = key
        self.root = root
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.val_split = float(val_split)
        self.train_size = train_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.augment = bool(augment)
        self.img_size = parse_img_size(img_size)
        self.mean = _check_stats("mean", mean, positive=False)
        self.std = _check_stats("std", std, positive=True)
        self.interpolation = str(interpolation).lower()
        self.seed = int(seed)
        self.validate = bool(validate)
        self.eval_transform = build_transform(self.img_size, self.mean, self.std, self.interpolation)
        self.train_transform = (
            build_transform(self.img_size, self.mean, self.std, self.interpolation, augment=True)
            if self.augment
            else self.eval_transform
        )
        self.eval_transform_id = transform_id(self.img_size, self.mean, self.std, self.interpolation)
        self.train_dataset: ImageDataset | None = None
        self.val_dataset: ImageDataset | None = None
        self._classes: list[str] | None = None

    # -- public properties -------------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        """Class names (runs `setup()` if it has not run yet)."""
        if self._classes is None:
            self.setup()
        assert self._classes is not None
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- Lightning hooks ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Nothing to download: all sources are local."""

    def setup(self, stage: str | None = None) -> None:
        """Build `train_dataset` / `val_dataset` once (later calls return immediately)."""
        if self.train_dataset is not None and self.val_dataset is not None:
            return
        if self.name == "imagefolder":
            train, val = self._setup_imagefolder()
        elif self.name == "fashion_mnist":
            train = FashionMNISTDataset(self.root, "train")
            val = FashionMNISTDataset(self.root, "test")
        else:
            full = DigitsDataset()
            tr_idx, va_idx = stratified_split(full.targets, self.val_split, self.seed)
            train, val = full.subset(tr_idx), full.subset(va_idx)
        if self.train_size is not None:
            train = train.subset(stratified_subset(train.targets, self.train_size, self.seed))
        if self.val_size is not None:
            val = val.subset(stratified_subset(val.targets, self.val_size, self.seed + 1))
        self._check_splits(train, val)
        self.train_dataset = train.with_transform(self.train_transform)
        self.val_dataset = val.with_transform(self.eval_transform)
        self._classes = list(train.classes)

    def train_dataloader(self) -> DataLoader:
        """Shuffled with a generator seeded by `seed` (same order for the same seed)."""
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self._require("train_dataset"), shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require("val_dataset"), shuffle=False)

    def eval_dataloader(self, split: str = "train") -> DataLoader:
        """Unshuffled loader over `split` ("train" or "val") with the eval transform
        (no augmentation), e.g. for caching features."""
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        ds = self._require(f"{split}_dataset").with_transform(self.eval_transform)
        return self._loader(ds, shuffle=False)

    # -- helpers -----------------------------------------------------------------------------

    def _require(self, attr: str) -> ImageDataset:
        if getattr(self, attr) is None:
            self.setup()
        return getattr(self, attr)

    def _loader(self, dataset: ImageDataset, shuffle: bool, generator=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _setup_imagefolder(self) -> tuple[ImageDataset, ImageDataset]:
        if self.train_dir is not None and self.val_dir is not None:
            train = self._drop_bad(ImageFolderDataset(self.train_dir))
            val = self._drop_bad(ImageFolderDataset(self.val_dir, classes=train.classes))
            return train, val
        full = self._drop_bad(ImageFolderDataset(self.root if self.root is not None else self.train_dir))
        tr_idx, va_idx = stratified_split(full.targets, self.val_split, self.seed)
        return full.subset(tr_idx), full.subset(va_idx)

    def _drop_bad(self, dataset: ImageFolderDataset) -> ImageDataset:
        """Remove unreadable files with one counted warning; error if a class is emptied."""
        if not self.validate:
            return dataset
        bad = validate_images(dataset)
        if not bad:
            return dataset
        _, first_path, first_reason = bad[0]
        warnings.warn(
            f"skipped {len(bad)} unreadable image{'s' if len(bad) != 1 else ''} "
            f"(first: {first_path}: {first_reason})",
            UserWarning,
            stacklevel=3,
        )
        bad_idx = {i for i, _, _ in bad}
        before = set(dataset.targets)
        kept = dataset.subset([i for i in range(len(dataset)) if i not in bad_idx])
        emptied = sorted(before - set(kept.targets))
        if emptied:
            names = ", ".join(dataset.classes[k] for k in emptied)
            raise DataError(
                f"no readable images left for class(es) {names} in {dataset.root}; "
                f"first problem: {first_path}: {first_reason}"
            )
        return kept

    def _check_splits(self, train: ImageDataset, val: ImageDataset) -> None:
        if len(train.classes) < 2:
            raise DataError(
                f"need at least 2 classes, found {len(train.classes)} ({', '.join(train.classes)})"
            )
        if len(train) == 0 or len(val) == 0:
            raise DataError(
                f"empty {'training' if len(train) == 0 else 'validation'} set; add images"
            )
        only_val = sorted(set(val.targets) - set(train.targets))
        if only_val:
            names = ", ".join(train.classes[k] for k in only_val)
            hint = (
                f"increase train_size (now {self.train_size})"
                if self.train_size is not None
                else "add training images for it"
            )
            raise DataError(f"class(es) {names} appear only in the validation set; {hint}")
