"""Preprocessing: `parse_img_size` (the one check of an image size), `build_transform` (RGB PIL image ->
normalised tensor) and `transform_id` (a stable cache key for the same transform).

`TransformSpec` holds checked settings: `TransformSpec.check(...)` validates once, and its `transform()` /
`key()` trust what it holds, so a caller that keeps a spec (the data module) does not re-validate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from cdam_pl.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "parse_img_size",
    "TransformSpec",
    "build_transform",
    "transform_id",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


def parse_img_size(img_size: int | Sequence[int]) -> tuple[int, int]:
    """Normalise an image size (int or (H, W)) to a `(H, W)` tuple of positive ints.

    The one check of an image size: entry points (config, backbone, transforms, data module, CLI) call it;
    code that receives its result trusts it.
    """
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


def _check_interpolation(interpolation: str) -> str:
    """The lower-case key of `INTERPOLATIONS` that `interpolation` names."""
    key = str(interpolation).lower()
    if key not in INTERPOLATIONS:
        raise ConfigError(
            f"unknown interpolation {interpolation!r}; choose one of: {', '.join(INTERPOLATIONS)}"
        )
    return key


@dataclass(frozen=True)
class TransformSpec:
    """Checked preprocessing settings: `(H, W)`, per-channel mean and std, an `INTERPOLATIONS` key."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    @classmethod
    def check(
        cls,
        img_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bicubic",
    ) -> TransformSpec:
        """Validate and normalise the settings (a one-line `ConfigError` for a bad one)."""
        size = parse_img_size(img_size)
        key = _check_interpolation(interpolation)
        return cls(
            size,
            _check_stats("mean", mean, positive=False),
            _check_stats("std", std, positive=True),
            key,
        )

    def transform(self, augment: bool = False) -> v2.Compose:
        """Transform from an RGB PIL image to a normalised float tensor of shape [3, H, W].

        Eval: `Resize((H, W))` (exact size, so the ViT patch grid is fixed). Augment:
        `RandomResizedCrop((H, W))` + `RandomHorizontalFlip`.
        """
        mode = INTERPOLATIONS[self.interpolation]
        if augment:
            geometry = [
                v2.RandomResizedCrop(self.size, interpolation=mode, antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        else:
            geometry = [v2.Resize(self.size, interpolation=mode, antialias=True)]
        return v2.Compose(
            [
                *geometry,
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(self.mean), std=list(self.std)),
            ]
        )

    def key(self, augment: bool = False) -> str:
        """Stable string describing `transform(augment)` (a cache key)."""
        h, w = self.size
        fmt = lambda vals: ",".join(format(v, ".8g") for v in vals)  # noqa: E731
        geometry = "rrcrop+hflip" if augment else "resize"
        return (
            f"rgb8|{geometry}:{h}x{w}:{self.interpolation}|tensor01|"
            f"norm:{fmt(self.mean)}/{fmt(self.std)}|v1"
        )


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
    return TransformSpec.check(img_size, mean, std, interpolation).transform(augment)


def transform_id(
    img_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
    augment: bool = False,
) -> str:
    """Stable string describing `build_transform(...)` with the same arguments (a cache key)."""
    return TransformSpec.check(img_size, mean, std, interpolation).key(augment)
