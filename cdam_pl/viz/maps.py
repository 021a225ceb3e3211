"""Token maps (CDAM scores, attention, ...) as uint8 RGB pictures: resampling, colour range, colours, overlays, PNGs.

Every picture is a ``uint8`` numpy array of shape ``[H, W, 3]`` that can go straight to TensorBoard
(``writer.add_image(tag, arr, step, dataformats="HWC")``) or to a PNG via :func:`save_png`.

Conventions
-----------
* A *map* is a signed score grid ``[gh, gw]`` (one value per patch token; grids may be
  non-square). Positive = evidence for the target class, negative = counter-evidence.
* Maps are drawn with a zero-centred diverging colormap (``RdBu_r``): 0 is the neutral
  near-white middle colour, positive is red, negative is blue, scaled symmetrically to
  ``[-vmax, vmax]``.
* ``vmax`` defaults to a *display* range from quantile clipping (:func:`display_range`), so a
  single outlier token does not wash out the rest of the map. Clipping only affects the
  picture; inputs are never modified.
* Inputs may be torch tensors (any device, with or without grad) or numpy arrays; they are
  detached/copied, never changed in place.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cdam_pl.io import atomic_write
from cdam_pl.viz._arrays import as_grid, colormap, to_numpy

DEFAULT_CMAP = "RdBu_r"
# Default quantile of the functions here (0.1 % of |scores| may saturate): a mild guard for any map.
DEFAULT_Q = 0.001
# The quantile every picture of the package is drawn with (training callback, explain.py, web demo, benchmark).
# Display-only clipping: ViT token grids often have one outlier token whose score would otherwise compress every
# other token to the neutral colour, so the top 1 % of |scores| saturate. It sets the colour range of pictures only;
# stored scores are never clipped.
DISPLAY_Q = 0.01


# ----------------------------------------------------------------------------- colour tables


@functools.lru_cache(maxsize=16)
def _lut_uint8(name: str) -> np.ndarray:
    """A colormap's lookup table as uint8 RGB ``[N, 3]`` (read-only): its colours rounded to 0..255."""
    cm = colormap(name)
    lut = np.round(cm(np.arange(cm.N))[:, :3] * 255.0).astype(np.uint8)  # integer input = table rows
    lut.flags.writeable = False
    return lut


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {(h, w)}")
    return h, w


# ----------------------------------------------------------------------------- maps


def upsample(map: Any, size: int | Sequence[int], mode: str = "nearest") -> np.ndarray:
    """Resize a score grid ``[gh, gw]`` to ``[H, W]`` (float64) to lay it over an image.

    ``size`` is ``(H, W)`` or an int for a square output. ``"nearest"`` keeps each token as a
    flat block (exact values, honest about the token resolution); ``"bilinear"`` (half-pixel
    centres, ``align_corners=False``) gives smooth overlays.
    """
    m = as_grid(map)  # [gh, gw]
    h, w = _size_hw(size)
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    t = torch.from_numpy(m)[None, None]  # [1, 1, gh, gw]
    if mode == "nearest":
        out = F.interpolate(t, size=(h, w), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return out[0, 0].numpy().copy()  # [H, W]


def display_range(map: Any, q: float = DEFAULT_Q) -> float:
    """Symmetric colour limit ``v``: the ``1 - q`` quantile of ``|map|`` (finite values only).

    Quantile clipping keeps a few extreme tokens from compressing everything else to the
    neutral colour. It is for display only; the input is not modified. Falls back to the max
    of ``|map|`` if the quantile is 0 (very sparse maps), and to 1.0 for an all-zero (or
    non-finite) map so callers can always divide by it.
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"q must be in [0, 1), got {q!r}")
    a = np.abs(to_numpy(map).astype(np.float64, copy=False)).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    v = float(np.quantile(a, 1.0 - q))
    if v <= 0.0:
        v = float(a.max())
    return v if v > 0.0 else 1.0


def resolve_vmax(vmax: float | None, m: np.ndarray, q: float) -> float:
    """The colour limit to draw ``m`` with: ``vmax`` itself (a positive finite number), or ``display_range(m, q)``
    when it is None."""
    if vmax is None:
        return display_range(m, q)
    v = float(vmax)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"vmax must be a positive finite number, got {vmax!r}")
    return v


def colorize(
    map: Any, vmax: float | None = None, q: float = DEFAULT_Q, cmap: str = DEFAULT_CMAP
) -> np.ndarray:
    """Signed map ``[H, W]`` -> uint8 RGB ``[H, W, 3]`` with a zero-centred diverging colormap.

    Values are scaled to ``[-vmax, vmax]`` (``vmax`` from :func:`display_range` if None) and
    clipped, so 0 is the neutral middle colour, ``+vmax`` full red, ``-vmax`` full blue.
    NaNs are drawn as 0 (neutral).
    """
    m = as_grid(map)  # [H, W]
    v = resolve_vmax(vmax, m, q)
    x = np.nan_to_num(m, nan=0.0, posinf=v, neginf=-v)
    x = np.clip(x / v, -1.0, 1.0)  # [-1, 1]
    # What `Colormap.__call__` does with floats in [0, 1] (entry floor(x * N), x = 1 -> the last), but with the
    # table already rounded to uint8: the same colours without a float RGBA image per call.
    lut = _lut_uint8(cmap)
    n = lut.shape[0]
    idx = ((x + 1.0) * 0.5) * n
    return lut[np.clip(idx, 0, n - 1).astype(np.intp)]  # [H, W, 3] uint8


# ----------------------------------------------------------------------------- images


def to_uint8_image(image: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Any image -> uint8 RGB ``[H, W, 3]``.

    Accepts uint8 HWC, float ``[0, 1]`` HWC, a (normalised) CHW float torch tensor or array,
    optionally with a leading batch dim of 1, grey ``[H, W]`` or 1-channel, and RGBA (alpha
    dropped). If ``mean``/``std`` are given the image is un-normalised first
    (``x * std + mean`` per channel), e.g. to show a model's input tensor.
    """
    is_tensor = isinstance(image, torch.Tensor)
    x = to_numpy(image)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 2:
        x = x[..., None]  # [H, W, 1]
    if x.ndim != 3:
        raise ValueError(f"expected an image [H, W, C] or [C, H, W], got shape {tuple(x.shape)}")
    # Torch tensors are CHW by convention; arrays are HWC unless they clearly are CHW.
    chw = x.shape[0] in (1, 3, 4) and (is_tensor or x.shape[-1] not in (1, 3, 4))
    if chw:
        x = np.transpose(x, (1, 2, 0))  # [H, W, C]
    if x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got image of shape {tuple(x.shape)}")

    if x.dtype == np.uint8 and mean is None and std is None:
        out = x
    else:
        f = x.astype(np.float64)
        if x.dtype == np.uint8:
            f = f / 255.0
        if std is not None:
            f = f * np.asarray(std, dtype=np.float64).reshape(1, 1, -1)
        if mean is not None:
            f = f + np.asarray(mean, dtype=np.float64).reshape(1, 1, -1)
        f = np.nan_to_num(f, nan=0.0)
        out = np.round(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    if out.shape[-1] == 4:
        out = out[..., :3]
    elif out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out)  # [H, W, 3] uint8


def overlay(
    image: Any,
    map: Any,
    alpha: float = 0.6,
    mode: str = "bilinear",
    vmax: float | None = None,
    q: float = DEFAULT_Q,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """Blend a colorized token map over an image: ``(1 - alpha) * image + alpha * heat``.

    The map ``[gh, gw]`` is upsampled to the image size; ``vmax`` is computed on the token grid
    (not the interpolated one) when None. Returns uint8 ``[H, W, 3]`` of the image's size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    img = to_uint8_image(image, mean=mean, std=std)  # [H, W, 3]
    grid = as_grid(map)  # [gh, gw]
    v = resolve_vmax(vmax, grid, q)
    heat = colorize(upsample(grid, img.shape[:2], mode=mode), vmax=v, cmap=cmap)  # [H, W, 3]
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * heat.astype(np.float64)
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


# ----------------------------------------------------------------------------- files


def save_png(array: Any, path: str | os.PathLike) -> Path:
    """Write an image array as PNG atomically (temp file in the same dir + ``os.replace``).

    Readers (TensorBoard, a browser, a concurrent job) never see a half-written file. Parent
    directories are created. Non-uint8 / CHW input goes through :func:`to_uint8_image`.
    """
    arr = to_numpy(array)
    if not (arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)))):
        arr = to_uint8_image(arr)
    arr = np.ascontiguousarray(arr)
    # zlib level 1: 3.6x faster than PIL's default 6 on a photo panel (15 vs 55 ms) for 8% more bytes; PNG
    # encoding was the largest cost of explain.py's panels.
    return atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG", compress_level=1))
