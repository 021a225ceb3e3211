"""`ImageDataModule`: train/val datasets and loaders for Lightning, built from a dataset name and the
backbone's preprocessing (`ImageDataModule.from_config` maps a config's `data` section onto it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from cdam_pl.data.datasets import (
    DATASET_NAMES,
    DigitsDataset,
    FashionMNISTDataset,
    ImageDataset,
    ImageFolderDataset,
    validate_images,
)
from cdam_pl.data.splits import check_count, check_val_split, stratified_split, stratified_subset
from cdam_pl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec
from cdam_pl.errors import ConfigError, DataError

__all__ = ["CONFIG_KEYS", "ImageDataModule"]

CONFIG_KEYS: tuple[str, ...] = (
    "name", "root", "train_dir", "val_dir", "val_split", "train_size", "val_size",
    "batch_size", "num_workers", "augment",
)
"""Keys of a config's `data` section that are `ImageDataModule` arguments (see `from_config`)."""


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
        val_split = check_val_split(val_split)
        for field, value in (("train_size", train_size), ("val_size", val_size)):
            if value is not None:
                check_count(field, value)
        self.batch_size = check_count("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.name = key
        self.root = root
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.val_split = val_split
        self.train_size = train_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.augment = bool(augment)
        spec = TransformSpec.check(img_size, mean, std, interpolation)
        self.img_size = spec.size
        self.mean = spec.mean
        self.std = spec.std
        self.interpolation = spec.interpolation
        self.seed = int(seed)
        self.validate = bool(validate)
        self.eval_transform = spec.transform()
        self.train_transform = spec.transform(augment=True) if self.augment else self.eval_transform
        self.eval_transform_id = spec.key()
        self.train_dataset: ImageDataset | None = None
        self.val_dataset: ImageDataset | None = None
        self._classes: list[str] | None = None

    @classmethod
    def from_config(
        cls,
        data: Mapping[str, Any],
        data_config: Mapping[str, Any],
        img_size: int | Sequence[int],
        seed: int = 0,
        **overrides: Any,
    ) -> ImageDataModule:
        """The data module a config's `data` section describes, preprocessed as a backbone expects.

        data: the `data` section (a DictConfig or a plain dict, e.g. from a checkpoint; a missing key takes
        the constructor's default). data_config: the backbone's `data_config` (mean, std, interpolation).
        img_size: the backbone's `img_size`. overrides: constructor arguments that replace the section's
        (e.g. `batch_size=1, validate=False`).
        """
        args = {key: data[key] for key in CONFIG_KEYS if key in data}
        args.update(
            img_size=img_size,
            mean=data_config["mean"],
            std=data_config["std"],
            interpolation=data_config["interpolation"],
            seed=seed,
        )
        args.update(overrides)
        return cls(**args)

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
