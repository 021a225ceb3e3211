"""Datasets of `(transform(rgb_image), label)` samples with `.classes`, `.targets` and `.ids` (a stable
per-sample identifier): `ImageFolderDataset` (one subfolder per class), `FashionMNISTDataset` (the raw IDX files),
`DigitsDataset` (scikit-learn's 8x8 digits), and `validate_images` (find unreadable files up front).
"""

from __future__ import annotations

import copy
import gzip
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cdam_pl.data.images import IMAGE_EXTENSIONS, check_image, error_reason, load_image, path_text, walk_images
from cdam_pl.errors import ConfigError, DataError

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "ImageDataset",
    "ImageFolderDataset",
    "FashionMNISTDataset",
    "DigitsDataset",
    "validate_images",
]

DATASET_NAMES: tuple[str, ...] = ("imagefolder", "fashion_mnist", "digits")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

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

    def subset(self, indices: Sequence[int], transform: Any = _KEEP) -> ImageDataset:
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

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> ImageDataset:
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
            raise DataError(f"cannot list folder {self.root}: {error_reason(exc)}") from exc
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
            files = walk_images(folder)
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
        raise DataError(f"cannot read {path}: {error_reason(exc)}; reinstall the dataset") from exc
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
        # lazy: scikit-learn is slow to import and only this dataset needs it
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
