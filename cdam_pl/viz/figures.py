"""Figures of token maps as uint8 RGB arrays: a panel (image + overlays, titled, with colour bars), a strip
(a titled grid of pictures) and a confusion-matrix picture.

Figures use ``matplotlib.figure.Figure`` with the Agg canvas directly, never ``pyplot``: no global state, no
windows, safe to call from worker threads.
"""

from __future__ import annotations

import textwrap
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cdam_pl.viz._arrays import as_grid, colormap, to_numpy
from cdam_pl.viz.maps import DEFAULT_CMAP, DEFAULT_Q, display_range, overlay, resolve_vmax, to_uint8_image

__all__ = ["panel", "strip", "confusion_image"]


# Figures are laid out explicitly, in inches, from measured text sizes (titles, colour-bar tick labels) instead of
# matplotlib's constrained layout, which re-solves the layout on every draw and costs most of the drawing time.
# Only text and colour bars are drawn by matplotlib; the images (which never overlap anything) are resampled
# nearest-neighbour and pasted into the rendered pixels at their cells, which is what `imshow(interpolation=
# "nearest")` would draw there, without its per-image Axes and RGBA resampling pipeline.

_TITLE_FONTSIZE = 9  # per-cell titles (panel), column and row titles (strip)
_SUPTITLE_FONTSIZE = 10
_CBAR_FONTSIZE = 7  # colour-bar tick labels
_MARGIN = 0.06  # inches of white around the content
_GAP = 0.1  # inches between neighbouring cells; a cell is `cell_inches` wide including it
_TITLE_PAD = 0.05  # inches between a title and its image
_CBAR_WIDTH = 0.12  # inches
_CBAR_PAD = 0.08  # inches between an image and its colour bar
_CBAR_SHRINK = 0.9  # a colour bar is this fraction of the height of what it belongs to, centred on it


def _resize_nearest(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [h, w, 3], nearest neighbour on pixel centres (as Agg's 'nearest' resampling)."""
    ih, iw = image.shape[:2]
    if (ih, iw) == (h, w):
        return image
    rows = np.minimum(((np.arange(h) + 0.5) * (ih / h)).astype(np.intp), ih - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (iw / w)).astype(np.intp), iw - 1)
    return image.take(rows, axis=0).take(cols, axis=1)


class _Layout:
    """A Figure on an Agg canvas, laid out by hand in inches from the bottom-left corner.

    Artists are created first (text can be measured at any figure size), then placed, and :meth:`finish` sets the
    figure size, converts the placements to figure coordinates and draws.
    """

    def __init__(self, dpi: int):
        self.fig = Figure(figsize=(1.0, 1.0), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        self.renderer = self.canvas.get_renderer()  # a 1x1 inch buffer, only to measure text with
        self.dpi = float(self.fig.dpi)
        self._axes: list[tuple[Any, tuple[float, float, float, float]]] = []
        self._texts: list[tuple[Any, float, float]] = []
        self._images: list[tuple[np.ndarray, tuple[float, float, float, float]]] = []
        self._suptitle = None

    def size(self, text) -> tuple[float, float]:
        """(width, height) in inches of a Text artist as drawn (rotation and line breaks included)."""
        if not text.get_text():
            return 0.0, 0.0
        bb = text.get_window_extent(self.renderer)
        return bb.width / self.dpi, bb.height / self.dpi

    def text(self, s: Any, fontsize: float, max_len: float, **kw) -> tuple[Any, float, float]:
        """A figure text, wrapped at spaces to fit ``max_len`` inches along its reading direction if it can be.

        Returns ``(text, width, height)`` (inches, as drawn). A text that cannot be wrapped short enough (a long
        word) keeps its size and the caller makes room for it.
        """
        s = str(s)
        t = self.fig.text(0.0, 0.0, s, fontsize=fontsize, **kw)
        w, h = self.size(t)
        vertical = kw.get("rotation", 0) in (90, 270, "vertical")
        length = h if vertical else w
        if length <= max_len:
            return t, w, h
        lines = s.split("\n")
        chars = max(len(line) for line in lines)
        for _ in range(6):
            chars = int(chars * min(max_len / length, 0.95))
            if chars < 1:
                break
            t.set_text("\n".join(textwrap.fill(line, chars, break_long_words=False, break_on_hyphens=False) or line
                                 for line in lines))
            w, h = self.size(t)
            length = h if vertical else w
            if length <= max_len:
                break
        return t, w, h

    def colorbar(self, v: float, cmap: str, height: float) -> tuple[Any, float, float]:
        """A vertical colour bar for ``[-v, v]``, ``height`` inches tall, in an axes of its own (placed later).

        Returns ``(cax, right, top)``: how far (inches) its ticks and tick labels reach right of the bar, and its
        offset text (e.g. ``1e-5``) above it.
        """
        # How many ticks a bar gets depends on its height, so the ticks are worked out at its final height.
        self.fig.set_size_inches(1.0, height)
        cax = self.fig.add_axes((0.0, 0.0, _CBAR_WIDTH, 1.0))
        cax.tick_params(labelsize=_CBAR_FONTSIZE)
        sm = ScalarMappable(norm=Normalize(vmin=-v, vmax=v), cmap=colormap(cmap))
        self.fig.colorbar(sm, cax=cax)
        # The tick labels the draw will make (same locator and formatter), measured as text: as exact as the axis'
        # tight bbox (ticks on the right, labels of the 7-pt size) at a third of its cost.
        axis = cax.yaxis
        lo, hi = sorted(axis.get_view_interval())
        eps = 1e-9 * (hi - lo)
        locs = [t for t in axis.get_majorticklocs() if lo - eps <= t <= hi + eps]
        fmt = axis.get_major_formatter()
        probe = self.fig.text(0.0, 0.0, "", fontsize=_CBAR_FONTSIZE)
        label_w = 0.0
        for s in fmt.format_ticks(locs):
            probe.set_text(s)
            label_w = max(label_w, self.size(probe)[0])
        probe.remove()
        rc = matplotlib.rcParams
        right = label_w + (rc["ytick.major.size"] + rc["ytick.major.pad"]) / 72.0 if locs else 0.0
        top = 0.0
        if fmt.get_offset():  # a common factor such as 1e-5, drawn above the bar
            # Above the bar and towards the tick labels (matplotlib right-aligns it, over the image on the left),
            # in the size of the tick labels.
            off = axis.offsetText
            off.set(x=0.0, horizontalalignment="left", fontsize=_CBAR_FONTSIZE, text=fmt.get_offset())
            ow, oh = self.size(off)
            right = max(right, ow - _CBAR_WIDTH)
            top = oh + axis.OFFSETTEXTPAD / 72.0
        return cax, right, top

    def suptitle(self, s: str | None, right: float) -> tuple[float, float, float]:
        """A figure title over content that ends ``right`` inches from the left edge, placed by :meth:`finish`.

        Returns ``(width, shift, height)``: the figure width, how far to shift the content right to centre it under
        a title wider than itself, and the height the title adds above the content (0 without a title).
        """
        width = right + _MARGIN
        if not s:
            return width, 0.0, 0.0
        t, w, h = self.text(s, _SUPTITLE_FONTSIZE, width - 2 * _MARGIN, ha="center", va="top")
        self._suptitle = t
        full = max(width, w + 2 * _MARGIN)
        return full, (full - width) / 2, _GAP + h

    def place_axes(self, ax, left: float, bottom: float, width: float, height: float) -> None:
        self._axes.append((ax, (left, bottom, width, height)))

    def place_text(self, text, x: float, y: float) -> None:
        self._texts.append((text, x, y))

    def place_image(self, image: np.ndarray, left: float, bottom: float, width: float, height: float) -> None:
        """An RGB uint8 image stretched over a box (inches)."""
        self._images.append((image, (left, bottom, width, height)))

    def finish(self, width: float, height: float) -> np.ndarray:
        """Set the figure size (inches, rounded up to whole pixels), place everything, draw -> uint8 [H, W, 3]."""
        if self._suptitle is not None:
            self.place_text(self._suptitle, width / 2, height - _MARGIN)
        pw, ph = int(np.ceil(width * self.dpi - 1e-6)), int(np.ceil(height * self.dpi - 1e-6))
        width, height = pw / self.dpi, ph / self.dpi
        self.fig.set_size_inches(width, height)
        for ax, (x, y, w, h) in self._axes:
            ax.set_position((x / width, y / height, w / width, h / height))
        for t, x, y in self._texts:
            t.set_position((x / width, y / height))
        out = _render(self.fig)
        ph, pw = out.shape[:2]  # as the canvas rounded it (the same, barring float fuzz)
        for im, (x, y, w, h) in self._images:
            x0, x1 = round(x * self.dpi), round((x + w) * self.dpi)
            y0, y1 = ph - round((y + h) * self.dpi), ph - round(y * self.dpi)  # rows from the top
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, pw), min(y1, ph)
            if x1 > x0 and y1 > y0:
                out[y0:y1, x0:x1] = _resize_nearest(im, y1 - y0, x1 - x0)
        return out


def _render(fig) -> np.ndarray:
    """Draw a Figure on an Agg canvas -> uint8 [H, W, 3], then drop the canvas' pixel buffer.

    The figure itself is left to the garbage collector: ``fig.clear()`` re-initialises every axes just to throw it
    away and costs as much as drawing.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    try:
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())  # [H, W, 4], view into the canvas buffer
        return np.ascontiguousarray(rgba[..., :3]).copy()
    finally:
        canvas.renderer = None  # the largest buffer, freed now rather than when the figure is collected
        canvas._lastKey = None


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
    q: float = DEFAULT_Q,
    image_title: str = "image",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cmap: str = DEFAULT_CMAP,
    cell_inches: float = 2.4,
    max_columns: int | None = None,
) -> np.ndarray:
    """One row: the image, then an overlay per map, each titled, with diverging colour bars.

    ``titles`` has one entry per map (or one per panel, image first). ``vmax="shared"`` uses one
    display range over all maps (comparable colours, one colour bar); ``"per_map"`` scales each
    map on its own (own colour bar each); a number fixes the range (e.g. to keep epochs
    comparable). Each image gets a cell ``cell_inches`` wide (its height follows the image's
    aspect), so the figure width grows with the number of maps; a title too long for its cell is
    wrapped. ``max_columns`` wraps the maps into rows of at most that many, under the first row's maps (the image
    stays alone in its column; a shared colour bar sits right of the first row). Returns uint8 ``[H, W, 3]``.
    """
    if max_columns is not None and int(max_columns) < 1:
        raise ValueError(f"max_columns must be >= 1, got {max_columns}")
    grids = [as_grid(m) for m in maps]
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
        vs = [resolve_vmax(vmax, np.zeros((1, 1)), q)] * len(grids)
    shared = not (isinstance(vmax, str) and vmax == "per_map")

    lay = _Layout(dpi)
    box_w = cell_inches - _GAP  # an image's width in its cell
    box_h = box_w * img.shape[0] / img.shape[1]
    pictures = [img] + [overlay(img, g, alpha=alpha, mode=mode, vmax=v, cmap=cmap) for g, v in zip(grids, vs)]
    heads = [lay.text(t, _TITLE_FONTSIZE, box_w, ha="center", va="bottom") for t in [image_title, *titles]]
    bar_h = _CBAR_SHRINK * box_h
    # the grid: row 0 = image, then maps; each later row continues the maps from column 1 (picture indices)
    per_row = max(1, len(grids) if max_columns is None else min(int(max_columns), len(grids)))
    rows = [list(range(min(1 + per_row, len(pictures))))]
    rows += [[None, *range(s, min(s + per_row, len(pictures)))] for s in range(1 + per_row, len(pictures), per_row)]

    bars: dict[int, tuple[Any, float, float]] = {}  # picture index -> colour bar right of it
    if colorbar and grids:
        for k in range(1, len(pictures)) if not shared else [rows[0][-1]]:
            bars[k] = lay.colorbar(vs[k - 1], cmap, bar_h)

    # left to right, inches from the left edge
    x = _MARGIN
    cells = []  # per column: (left of the image, centre of the cell)
    bar_left = {}  # picture index -> left of its colour bar
    for c in range(len(rows[0])):
        ks = [row[c] for row in rows if c < len(row) and row[c] is not None]
        cell = max([cell_inches] + [heads[k][1] + _GAP for k in ks])
        cells.append((x + (cell - box_w) / 2, x + cell / 2))
        x += cell
        with_bar = [k for k in ks if k in bars]
        for k in with_bar:
            bar_left[k] = cells[-1][0] + box_w + _CBAR_PAD
        if with_bar:
            x = bar_left[with_bar[0]] + _CBAR_WIDTH + max(bars[k][1] for k in with_bar) + _GAP / 2
    width, shift, sup_h = lay.suptitle(suptitle, x)

    # bottom to top, inches from the bottom edge: the last row's images start at the margin
    def above(row: list) -> float:  # room above a row's images: its titles, or a colour bar's offset text
        title_h = max(heads[k][2] for k in row if k is not None)
        offset_h = max((bars[k][2] for k in row if k in bars), default=0.0) - (box_h - bar_h) / 2
        return max(_TITLE_PAD + title_h, offset_h)

    bottoms = [_MARGIN]
    for row in rows[:0:-1]:
        bottoms.insert(0, bottoms[0] + box_h + above(row) + _GAP)
    height = bottoms[0] + box_h + above(rows[0]) + sup_h + _MARGIN

    for row, bottom in zip(rows, bottoms):
        for k, (left, centre) in zip(row, cells):
            if k is None:
                continue
            lay.place_image(pictures[k], left + shift, bottom, box_w, box_h)
            lay.place_text(heads[k][0], centre + shift, bottom + box_h + _TITLE_PAD)
            if k in bars:
                lay.place_axes(bars[k][0], bar_left[k] + shift, bottom + (box_h - bar_h) / 2, _CBAR_WIDTH, bar_h)
    return lay.finish(width, height)


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
    all cells were drawn with that fixed range). Cells are ``cell_inches`` wide and take the first
    image's aspect; a title too long for its cell is wrapped. Returns uint8 ``[H, W, 3]``.
    """
    rows = [[None if im is None else to_uint8_image(im) for im in row] for row in images_by_row]
    nrows = len(rows)
    ncols = max((len(r) for r in rows), default=0)
    if nrows == 0 or ncols == 0 or all(im is None for r in rows for im in r):
        raise ValueError("strip needs at least one image")
    if row_titles is not None and len(row_titles) != nrows:
        raise ValueError(f"got {nrows} rows but {len(row_titles)} row titles")
    if col_titles is not None and len(col_titles) != ncols:
        raise ValueError(f"got {ncols} columns but {len(col_titles)} column titles")

    first = next(im for r in rows for im in r if im is not None)
    lay = _Layout(dpi)
    box_w = cell_inches - _GAP
    box_h = box_w * first.shape[0] / first.shape[1]
    grid_h = nrows * box_h + (nrows - 1) * _GAP
    heads = [lay.text(t, _TITLE_FONTSIZE, box_w, ha="center", va="bottom") for t in col_titles or []]
    sides = [lay.text(t, _TITLE_FONTSIZE, box_h, ha="right", va="center", rotation=90) for t in row_titles or []]
    bar_h = _CBAR_SHRINK * grid_h
    bar = lay.colorbar(resolve_vmax(colorbar_vmax, np.zeros((1, 1)), 0.0), cmap, bar_h) if colorbar_vmax else None

    # left to right
    x = _MARGIN + (max(w for _, w, _ in sides) + _TITLE_PAD if sides else 0.0)
    cells = []  # (left of the images, centre of the column)
    for c in range(ncols):
        cell = max(cell_inches, heads[c][1] + _GAP if heads else 0.0)
        cells.append((x + (cell - box_w) / 2, x + cell / 2))
        x += cell
    if bar is not None:
        bar_left = cells[-1][0] + box_w + _CBAR_PAD
        x = bar_left + _CBAR_WIDTH + bar[1] + _GAP / 2
    width, shift, sup_h = lay.suptitle(suptitle, x)

    # bottom to top
    above = max(_TITLE_PAD + max(h for _, _, h in heads) if heads else 0.0,
                bar[2] - (grid_h - bar_h) / 2 if bar is not None else 0.0)
    height = _MARGIN + grid_h + above + sup_h + _MARGIN
    top = _MARGIN + grid_h  # top edge of the first row

    for r, row in enumerate(rows):
        y = top - (r + 1) * box_h - r * _GAP  # bottom edge of row r
        for c, im in enumerate(row):
            if im is not None:
                lay.place_image(im, cells[c][0] + shift, y, box_w, box_h)
        if sides:
            lay.place_text(sides[r][0], cells[0][0] + shift - _TITLE_PAD, y + box_h / 2)
    for (t, _, _), (_, centre) in zip(heads, cells):
        lay.place_text(t, centre + shift, top + _TITLE_PAD)
    if bar is not None:
        lay.place_axes(bar[0], bar_left + shift, _MARGIN + (grid_h - bar_h) / 2, _CBAR_WIDTH, bar_h)
    return lay.finish(width, height)


def confusion_image(confusion: Any, classes: Sequence[str], dpi: int = 100) -> np.ndarray:
    """Confusion matrix [C, C] (rows = true, cols = predicted) as a row-normalised heat map, uint8 HWC."""
    cm = to_numpy(confusion).astype(np.float64)
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
