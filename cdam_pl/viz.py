"""Pictures of token maps (CDAM scores, attention, ...) as uint8 RGB arrays.

Every public function returns a ``uint8`` numpy array of shape ``[H, W, 3]`` that can go
straight to TensorBoard (``writer.add_image(tag, arr, step, dataformats="HWC")``) or to a PNG
via :func:`save_png`.

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
* Figures (:func:`panel`, :func:`strip`) use ``matplotlib.figure.Figure`` with the Agg canvas
  directly, never ``pyplot``: no global state, no windows, safe to call from worker threads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cdam_pl.io import atomic_write

__all__ = [
    "DEFAULT_CMAP",
    "upsample",
    "display_range",
    "colorize",
    "to_uint8_image",
    "overlay",
    "panel",
    "strip",
    "save_png",
]

DEFAULT_CMAP = "RdBu_r"


# ----------------------------------------------------------------------------- helpers


def _to_numpy(x: Any) -> np.ndarray:
    """Copy a torch tensor (any device/dtype, with grad) or array-like into a new numpy array."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        torch = None
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy().copy()
    return np.array(x, copy=True)


def _as_grid(map_: Any) -> np.ndarray:
    """Map -> float64 array [gh, gw] (leading singleton dims such as [1, gh, gw] are dropped)."""
    m = _to_numpy(map_).astype(np.float64, copy=False)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D token map [gh, gw], got shape {tuple(m.shape)}")
    if m.size == 0:
        raise ValueError("token map is empty")
    return m


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {(h, w)}")
    return h, w


def _resolve_vmax(vmax: float | None, m: np.ndarray, q: float) -> float:
    if vmax is None:
        return display_range(m, q)
    v = float(vmax)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"vmax must be a positive finite number, got {vmax!r}")
    return v


# ----------------------------------------------------------------------------- maps


def upsample(map: Any, size: int | Sequence[int], mode: str = "nearest") -> np.ndarray:
    """Resize a score grid ``[gh, gw]`` to ``[H, W]`` (float64) to lay it over an image.

    ``size`` is ``(H, W)`` or an int for a square output. ``"nearest"`` keeps each token as a
    flat block (exact values, honest about the token resolution); ``"bilinear"`` (half-pixel
    centres, ``align_corners=False``) gives smooth overlays.
    """
    import torch
    import torch.nn.functional as F

    m = _as_grid(map)  # [gh, gw]
    h, w = _size_hw(size)
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    t = torch.from_numpy(m)[None, None]  # [1, 1, gh, gw]
    if mode == "nearest":
        out = F.interpolate(t, size=(h, w), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return out[0, 0].numpy().copy()  # [H, W]


def display_range(map: Any, q: float = 0.001) -> float:
    """Symmetric colour limit ``v``: the ``1 - q`` quantile of ``|map|`` (finite values only).

    Quantile clipping keeps a few extreme tokens from compressing everything else to the
    neutral colour. It is for display only; the input is not modified. Falls back to the max
    of ``|map|`` if the quantile is 0 (very sparse maps), and to 1.0 for an all-zero (or
    non-finite) map so callers can always divide by it.
    """
    if not 0.0 <= q < 1.0:
        raise ValueError(f"q must be in [0, 1), got {q!r}")
    a = np.abs(_to_numpy(map).astype(np.float64, copy=False)).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 1.0
    v = float(np.quantile(a, 1.0 - q))
    if v <= 0.0:
        v = float(a.max())
    return v if v > 0.0 else 1.0


def colorize(
    map: Any, vmax: float | None = None, q: float = 0.001, cmap: str = DEFAULT_CMAP
) -> np.ndarray:
    """Signed map ``[H, W]`` -> uint8 RGB ``[H, W, 3]`` with a zero-centred diverging colormap.

    Values are scaled to ``[-vmax, vmax]`` (``vmax`` from :func:`display_range` if None) and
    clipped, so 0 is the neutral middle colour, ``+vmax`` full red, ``-vmax`` full blue.
    NaNs are drawn as 0 (neutral).
    """
    m = _as_grid(map)  # [H, W]
    v = _resolve_vmax(vmax, m, q)
    x = np.nan_to_num(m, nan=0.0, posinf=v, neginf=-v)
    x = np.clip(x / v, -1.0, 1.0)  # [-1, 1]
    rgba = _cmap(cmap)((x + 1.0) * 0.5)  # [H, W, 4] floats in [0, 1]
    return np.round(rgba[..., :3] * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------- images


def to_uint8_image(image: Any, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """Any image -> uint8 RGB ``[H, W, 3]``.

    Accepts uint8 HWC, float ``[0, 1]`` HWC, a (normalised) CHW float torch tensor or array,
    optionally with a leading batch dim of 1, grey ``[H, W]`` or 1-channel, and RGBA (alpha
    dropped). If ``mean``/``std`` are given the image is un-normalised first
    (``x * std + mean`` per channel), e.g. to show a model's input tensor.
    """
    import torch

    is_tensor = isinstance(image, torch.Tensor)
    x = _to_numpy(image)
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
    q: float = 0.001,
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
    grid = _as_grid(map)  # [gh, gw]
    v = _resolve_vmax(vmax, grid, q)
    heat = colorize(upsample(grid, img.shape[:2], mode=mode), vmax=v, cmap=cmap)  # [H, W, 3]
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * heat.astype(np.float64)
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


# ----------------------------------------------------------------------------- figures


def _render(fig) -> np.ndarray:
    """Draw a Figure on an Agg canvas -> uint8 [H, W, 3], then release the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    try:
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())  # [H, W, 4], view into the canvas buffer
        return np.ascontiguousarray(rgba[..., :3]).copy()
    finally:
        fig.clear()


def _add_colorbar(fig, ax, v: float, cmap: str, label: str | None = None):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(vmin=-v, vmax=v), cmap=_cmap(cmap))
    cb = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02, shrink=0.9)
    cb.ax.tick_params(labelsize=7)
    if label:
        cb.set_label(label, fontsize=7)
    return cb


def panel(
    image: Any,
    maps: Sequence[Any],
    titles: Sequence[str],
    suptitle: str | None = None,
    vmax: str | float = "shared",
    mode: str = "bilinear",
    colorbar: bool = True,
    dpi: int = 100,
    *,
    alpha: float = 0.6,
    q: float = 0.001,
    image_title: str = "image",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cmap: str = DEFAULT_CMAP,
    cell_inches: float = 2.4,
) -> np.ndarray:
    """One row: the image, then an overlay per map, each titled, with diverging colour bars.

    ``titles`` has one entry per map (or one per panel, image first). ``vmax="shared"`` uses one
    display range over all maps (comparable colours, one colour bar); ``"per_map"`` scales each
    map on its own (own colour bar each); a number fixes the range (e.g. to keep epochs
    comparable). The figure width grows with the number of maps. Returns uint8 ``[H, W, 3]``.
    """
    from matplotlib.figure import Figure

    grids = [_as_grid(m) for m in maps]
    titles = list(titles)
    if len(titles) == len(grids) + 1:
        image_title, titles = titles[0], titles[1:]
    if len(titles) != len(grids):
        raise ValueError(f"got {len(grids)} maps but {len(titles)} titles")
    img = to_uint8_image(image, mean=mean, std=std)  # [H, W, 3]

    if isinstance(vmax, str) and vmax not in ("shared", "per_map"):
        raise ValueError(f"vmax must be 'shared', 'per_map' or a number, got {vmax!r}")
    if vmax == "per_map":
        vs = [display_range(g, q) for g in grids]
    elif vmax == "shared":
        all_scores = np.concatenate([g.ravel() for g in grids]) if grids else np.zeros(1)
        vs = [display_range(all_scores, q)] * len(grids)
    else:
        vs = [_resolve_vmax(vmax, np.zeros((1, 1)), q)] * len(grids)
    shared = not (isinstance(vmax, str) and vmax == "per_map")

    n = 1 + len(grids)
    aspect = img.shape[0] / img.shape[1]
    extra = 0.5 if (colorbar and grids) else 0.0
    per_cell_cb = colorbar and not shared
    width = cell_inches * n + (0.5 * len(grids) if per_cell_cb else extra)
    height = cell_inches * aspect + 0.45 + (0.3 if suptitle else 0.0)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]

    axes[0].imshow(img, interpolation="nearest")
    axes[0].set_title(image_title, fontsize=9)
    for ax, g, t, v in zip(axes[1:], grids, titles, vs):
        ax.imshow(overlay(img, g, alpha=alpha, mode=mode, vmax=v, cmap=cmap), interpolation="nearest")
        ax.set_title(t, fontsize=9)
        if per_cell_cb:
            _add_colorbar(fig, ax, v, cmap)
    for ax in axes:
        ax.set_axis_off()
    if colorbar and grids and shared:
        _add_colorbar(fig, list(axes[1:]), vs[0], cmap)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _render(fig)


def strip(
    images_by_row: Sequence[Sequence[Any]],
    row_titles: Sequence[str] | None = None,
    col_titles: Sequence[str] | None = None,
    *,
    suptitle: str | None = None,
    dpi: int = 100,
    cell_inches: float = 1.8,
    colorbar_vmax: float | None = None,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """A titled grid of images, e.g. a map's evolution: rows = map kinds (or runs), cols = epochs.

    ``images_by_row[r][c]`` is any image accepted by :func:`to_uint8_image` (typically an
    :func:`overlay`), or None for an empty cell; rows may be ragged. If ``colorbar_vmax`` is
    given, one diverging colour bar for ``[-colorbar_vmax, colorbar_vmax]`` is added (use it when
    all cells were drawn with that fixed range). Returns uint8 ``[H, W, 3]``.
    """
    from matplotlib.figure import Figure

    rows = [[None if im is None else to_uint8_image(im) for im in row] for row in images_by_row]
    nrows = len(rows)
    ncols = max((len(r) for r in rows), default=0)
    if nrows == 0 or ncols == 0:
        raise ValueError("strip needs at least one image")
    if row_titles is not None and len(row_titles) != nrows:
        raise ValueError(f"got {nrows} rows but {len(row_titles)} row titles")
    if col_titles is not None and len(col_titles) != ncols:
        raise ValueError(f"got {ncols} columns but {len(col_titles)} column titles")

    first = next(im for r in rows for im in r if im is not None)
    aspect = first.shape[0] / first.shape[1]
    width = cell_inches * ncols + (0.4 if row_titles else 0.0) + (0.6 if colorbar_vmax else 0.0)
    height = cell_inches * aspect * nrows + (0.3 if col_titles else 0.0) + (0.3 if suptitle else 0.0)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)  # [nrows, ncols]
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r, c]
            im = rows[r][c] if c < len(rows[r]) else None
            if im is not None:
                ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if r == 0 and col_titles is not None:
                ax.set_title(str(col_titles[c]), fontsize=9)
            if c == 0 and row_titles is not None:
                ax.set_ylabel(str(row_titles[r]), fontsize=9)
    if colorbar_vmax:
        _add_colorbar(fig, axes.ravel().tolist(), _resolve_vmax(colorbar_vmax, np.zeros((1, 1)), 0.0), cmap)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _render(fig)


# ----------------------------------------------------------------------------- files


def save_png(array: Any, path: str | os.PathLike) -> Path:
    """Write an image array as PNG atomically (temp file in the same dir + ``os.replace``).

    Readers (TensorBoard, a browser, a concurrent job) never see a half-written file. Parent
    directories are created. Non-uint8 / CHW input goes through :func:`to_uint8_image`.
    """
    from PIL import Image

    arr = _to_numpy(array)
    if not (arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)))):
        arr = to_uint8_image(arr)
    arr = np.ascontiguousarray(arr)
    return atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def confusion_image(confusion: Any, classes: Sequence[str], dpi: int = 100) -> np.ndarray:
    """Confusion matrix [C, C] (rows = true, cols = predicted) as a row-normalised heat map, uint8 HWC."""
    from matplotlib.figure import Figure

    cm = _to_numpy(confusion).astype(np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    c = len(classes)
    side = max(3.0, 0.45 * c + 1.5)
    fig = Figure(figsize=(side, side), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), labels=list(classes), rotation=90, fontsize=7)
    ax.set_yticks(range(c), labels=list(classes), fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _render(fig)
