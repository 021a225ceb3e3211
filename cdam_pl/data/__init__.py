"""Images, datasets and the Lightning data module.

* `load_image` opens any common image file as 8-bit RGB, or raises a one-line `DataError` (`images`).
* `list_images` expands files, folders and globs into a sorted list of image files (`images`).
* `parse_img_size` checks an image size; `build_transform` / `transform_id` make the preprocessing pipeline and a
  stable key for it (`transforms`).
* `ImageFolderDataset`, `FashionMNISTDataset`, `DigitsDataset` yield `(tensor, label)` and expose
  `.classes`, `.targets` and `.ids` (a stable per-sample identifier) (`datasets`).
* `stratified_subset` / `stratified_split` pick class-balanced, seeded index sets (`splits`).
* `ImageDataModule` ties it together for Lightning (`datamodule`).

Inside `cdam_pl`, import a name from the module that defines it; this face is for users and tests.
"""

from cdam_pl.data.datamodule import ImageDataModule
from cdam_pl.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    DigitsDataset,
    FashionMNISTDataset,
    ImageDataset,
    ImageFolderDataset,
    validate_images,
)
from cdam_pl.data.images import IMAGE_EXTENSIONS, check_image, list_images, load_image, path_text
from cdam_pl.data.splits import stratified_split, stratified_subset
from cdam_pl.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    build_transform,
    parse_img_size,
    transform_id,
)

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
