"""Real photos that ship inside installed packages, so they load without a download: scikit-image's, scikit-learn's
and matplotlib's sample images. None of them belongs to a class of a Fashion-MNIST head; the method benchmark, the
evaluation (class sensitivity, the examples figure) and the web demo's examples use them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from cdam_pl.errors import DataError

__all__ = ["PHOTOS", "Photo", "load_photo"]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load():
        from skimage import data

        arr = getattr(data, name)()
        return arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load():
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load():
        from matplotlib import cbook

        with cbook.get_sample_data(filename) as f:
            return np.asarray(Image.open(f).convert("RGB"))

    return load


@dataclass(frozen=True)
class Photo:
    label: str  # what it shows, for titles
    package: str  # the pip package that ships it
    load: Callable[[], np.ndarray]  # -> H x W x 3 (or H x W grey) uint8


# Ordered: the first four (scikit-image's colour photos) are the method benchmark's default set.
PHOTOS: dict[str, Photo] = {
    "chelsea": Photo("chelsea (cat)", "scikit-image", _skimage("chelsea")),
    "coffee": Photo("coffee (cup)", "scikit-image", _skimage("coffee")),
    "astronaut": Photo("astronaut", "scikit-image", _skimage("astronaut")),
    "rocket": Photo("rocket", "scikit-image", _skimage("rocket")),
    "motorcycle": Photo("motorcycle", "scikit-image", _skimage("stereo_motorcycle")),
    "china": Photo("china (temple)", "scikit-learn", _sklearn("china.jpg")),
    "flower": Photo("flower", "scikit-learn", _sklearn("flower.jpg")),
    "grace_hopper": Photo("grace hopper (portrait)", "matplotlib", _matplotlib("grace_hopper.jpg")),
}


def load_photo(name: str) -> Image.Image:
    """The photo `name` as an RGB PIL image; a one-line DataError for an unknown name or a missing package."""
    if name not in PHOTOS:
        raise DataError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    photo = PHOTOS[name]
    try:
        arr = photo.load()
    except ImportError:
        raise DataError(f"the photo {name!r} ships with {photo.package}: pip install {photo.package}") from None
    return Image.fromarray(arr).convert("RGB")
