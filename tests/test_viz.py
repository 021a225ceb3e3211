"""Tests for cdam_pl.viz: colour semantics, clipping, resampling, shapes, files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from cdam_pl import viz


def _rgb(px):
    return [int(c) for c in px]


# ----------------------------------------------------------------------------- colorize


def test_colorize_zero_is_neutral_positive_red_negative_blue():
    v = 2.0
    m = np.array([[0.0, v, -v]])
    out = viz.colorize(m, vmax=v)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8

    r, g, b = _rgb(out[0, 0])
    assert max(r, g, b) - min(r, g, b) <= 12, f"0 not neutral: {(r, g, b)}"
    assert min(r, g, b) >= 200, f"0 should be near white/grey: {(r, g, b)}"

    r, g, b = _rgb(out[0, 1])
    assert r > g + 60 and r > b + 60, f"+v not red-dominant: {(r, g, b)}"

    r, g, b = _rgb(out[0, 2])
    assert b > r + 60 and b > g + 20, f"-v not blue-dominant: {(r, g, b)}"


def test_colorize_sign_and_saturation_beyond_vmax():
    m = np.array([[0.5, -0.5, 1.0, -1.0, 5.0, -5.0]])
    out = viz.colorize(m, vmax=1.0).astype(int)
    assert out[0, 0, 0] > out[0, 0, 2] and out[0, 1, 2] > out[0, 1, 0]  # half-strength keeps the sign
    # values beyond vmax saturate to the end colours
    np.testing.assert_array_equal(out[0, 4], out[0, 2])
    np.testing.assert_array_equal(out[0, 5], out[0, 3])
    # stronger evidence is further from the neutral colour
    neutral = viz.colorize(np.zeros((1, 1)), vmax=1.0)[0, 0].astype(int)
    dist = np.linalg.norm(out[0] - neutral, axis=-1)
    assert dist[2] > dist[0] > 0 and dist[3] > dist[1] > 0


def test_colorize_default_vmax_uses_quantile_clipping():
    # 999 tokens at +/-1 and one huge outlier: without clipping everything would be ~neutral.
    rng = np.random.default_rng(0)
    m = np.sign(rng.standard_normal((10, 100)))
    m[0, 0] = 1e6
    before = m.copy()
    neutral = viz.colorize(np.zeros((1, 1)))[0, 0].astype(int)
    clipped = viz.colorize(m, q=0.01).astype(int)
    unclipped = viz.colorize(m, q=0.0).astype(int)
    pos = m == 1.0
    assert (clipped[pos][:, 0] - clipped[pos][:, 2] > 50).all(), "ordinary positive tokens should be red"
    assert (np.abs(unclipped[pos] - neutral).max(axis=-1) <= 2).all()  # what clipping avoids
    np.testing.assert_array_equal(m, before)


def test_colorize_all_zero_map_has_no_nan_and_is_neutral():
    m = torch.zeros(4, 5)
    with np.errstate(all="raise"):
        out = viz.colorize(m)
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    assert (out == out[0, 0]).all()
    r, g, b = _rgb(out[0, 0])
    assert max(r, g, b) - min(r, g, b) <= 12


# ----------------------------------------------------------------------------- display_range


def test_display_range_ignores_outlier_and_leaves_input_unchanged():
    m = np.linspace(-1.0, 1.0, 10_000).reshape(100, 100)
    m[3, 7] = 1000.0
    before = m.copy()
    v = viz.display_range(m, q=0.001)
    assert 0.99 <= v <= 1.0 + 1e-9, v
    np.testing.assert_array_equal(m, before)
    # q=0 means no clipping: the outlier sets the range.
    assert viz.display_range(m, q=0.0) == pytest.approx(1000.0)


def test_display_range_tensor_input_unchanged_and_all_zero_is_one():
    t = torch.tensor([[0.5, -3.0], [1.0, 2.0]], requires_grad=True)
    before = t.detach().clone()
    assert viz.display_range(t, q=0.0) == pytest.approx(3.0)
    assert torch.equal(t.detach(), before)
    assert viz.display_range(np.zeros((3, 3))) == 1.0
    assert viz.display_range(np.full((2, 2), np.nan)) == 1.0


def test_display_range_sparse_map_falls_back_to_max():
    m = np.zeros((50, 50))
    m[10, 10] = -0.25  # quantile of |m| is 0, but the map is not all-zero
    assert viz.display_range(m) == pytest.approx(0.25)


# ----------------------------------------------------------------------------- upsample


def test_upsample_nearest_non_square_keeps_blocks_exactly():
    grid = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    up = viz.upsample(grid, (20, 30), mode="nearest")
    assert up.shape == (20, 30)
    for i in range(2):
        for j in range(3):
            block = up[i * 10 : (i + 1) * 10, j * 10 : (j + 1) * 10]
            assert (block == grid[i, j].item()).all()
    # Input unchanged.
    assert torch.equal(grid, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))


def test_upsample_bilinear_stays_within_range_and_preserves_constant():
    grid = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, -1.0]])
    up = viz.upsample(grid, (14, 21), mode="bilinear")
    assert up.shape == (14, 21)
    assert up.min() >= -1.0 - 1e-9 and up.max() <= 1.0 + 1e-9
    np.testing.assert_allclose(viz.upsample(np.full((2, 3), 0.7), (9, 5), mode="bilinear"), 0.7)


def test_upsample_rejects_bad_mode_and_shape():
    with pytest.raises(ValueError):
        viz.upsample(np.zeros((2, 2)), (4, 4), mode="bicubic")
    with pytest.raises(ValueError):
        viz.upsample(np.zeros(4), (4, 4))


# ----------------------------------------------------------------------------- images / overlay


def test_to_uint8_image_unnormalises_chw_tensor():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = torch.tensor([0.2, 0.5, 0.9])
    img01 = rgb.view(3, 1, 1).expand(3, 4, 6)  # CHW in [0, 1]
    normed = (img01 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    before = normed.clone()
    out = viz.to_uint8_image(normed, mean=mean, std=std)
    assert out.shape == (4, 6, 3) and out.dtype == np.uint8
    expected = np.round(rgb.numpy().astype(np.float64) * 255)
    np.testing.assert_allclose(out[2, 3].astype(float), expected, atol=1)  # float32 round-off
    assert torch.equal(normed, before)


@pytest.mark.parametrize(
    "image",
    [
        np.full((32, 48, 3), 128, np.uint8),
        np.full((32, 48, 3), 0.5, np.float32),
        torch.full((3, 32, 48), 0.5),
    ],
    ids=["uint8-hwc", "float-hwc", "tensor-chw"],
)
def test_overlay_shape_dtype_match_image(image):
    grid = torch.randn(2, 3)
    out = viz.overlay(image, grid)
    assert out.shape == (32, 48, 3)
    assert out.dtype == np.uint8


def test_overlay_blends_and_does_not_touch_inputs():
    img = np.zeros((20, 30, 3), np.uint8)
    grid = np.array([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    img_before, grid_before = img.copy(), grid.copy()
    out = viz.overlay(img, grid, alpha=0.5, mode="nearest", vmax=1.0)
    heat = viz.colorize(viz.upsample(grid, (20, 30), "nearest"), vmax=1.0)
    np.testing.assert_allclose(out.astype(int), np.round(heat * 0.5).astype(int), atol=1)
    assert out[5, 5, 0] > out[5, 5, 2]  # positive column reddish
    assert out[5, 25, 2] > out[5, 25, 0]  # negative column bluish
    np.testing.assert_array_equal(img, img_before)
    np.testing.assert_array_equal(grid, grid_before)
    # alpha=0 gives back the image exactly.
    np.testing.assert_array_equal(viz.overlay(img, grid, alpha=0.0), img)


def test_overlay_all_zero_map_no_nan():
    img = np.full((16, 16, 3), 0.3, np.float64)
    out = viz.overlay(img, np.zeros((4, 4)))
    assert out.dtype == np.uint8
    assert np.isfinite(out.astype(float)).all()


# ----------------------------------------------------------------------------- figures


def test_panel_returns_uint8_hwc_and_grows_with_maps():
    img = torch.rand(3, 64, 64)
    maps = [torch.randn(4, 4) for _ in range(3)]
    one = viz.panel(img, maps[:1], ["cdam"], suptitle="class 3")
    three = viz.panel(img, maps, ["a", "b", "c"], suptitle="class 3")
    for out in (one, three):
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
        assert out.std() > 0  # something was drawn
    assert three.shape[1] > one.shape[1]


@pytest.mark.parametrize("vmax", ["shared", "per_map", 0.5])
def test_panel_vmax_modes_and_no_colorbar(vmax):
    img = np.full((32, 40, 3), 200, np.uint8)
    maps = [np.zeros((2, 3)), np.arange(6.0).reshape(2, 3) - 2.5]
    out = viz.panel(img, maps, ["zero", "ramp"], vmax=vmax, colorbar=False, mode="nearest")
    assert out.dtype == np.uint8 and out.shape[2] == 3


def test_panel_title_count_checked():
    with pytest.raises(ValueError):
        viz.panel(np.zeros((8, 8, 3), np.uint8), [np.zeros((2, 2))], ["a", "b", "c"])


def test_panel_thread_safe():
    img = np.full((32, 32, 3), 100, np.uint8)
    results, errors = [], []

    def work():
        try:
            results.append(viz.panel(img, [np.eye(4)], ["eye"]).shape)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1


def _runs(flags):
    """[(first, last)] of the runs of True in a 1-D bool array."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]])
    return list(zip(starts.tolist(), ends.tolist()))


def _box(out, colour):
    """(top, bottom, left, right) of the pixels of exactly this colour, or None."""
    ys, xs = np.nonzero((out == np.asarray(colour, np.uint8)).all(-1))
    if ys.size == 0:
        return None
    return ys.min(), ys.max(), xs.min(), xs.max()


def _text_mask(out):
    """Dark grey/black pixels: anti-aliased black text (titles, tick labels)."""
    o = out.astype(int)
    return (o.max(-1) < 100) & (o.max(-1) - o.min(-1) < 12)


_IMG = (210, 190, 60)  # an image colour that anti-aliased black text never has


def _panel_colours(img, values):
    """The colour each constant map gets in a panel (overlay of a uniform image, vmax=1)."""
    return [tuple(viz.overlay(img[:1, :1], np.full((1, 1), v), vmax=1.0)[0, 0]) for v in values]


@pytest.mark.parametrize("dpi", [100, 150])
def test_panel_cells_side_by_side_with_image_aspect(dpi):
    img = np.full((32, 48, 3), _IMG, np.uint8)  # aspect 2:3
    values = [1.0, -1.0, 0.5]
    out = viz.panel(img, [np.full((2, 3), v) for v in values], ["pos", "neg", "half"], suptitle="s", vmax=1.0,
                    colorbar=False, dpi=dpi)
    boxes = [_box(out, _IMG)] + [_box(out, c) for c in _panel_colours(img, values)]
    assert all(b is not None for b in boxes)
    box_w = 2.4 * dpi  # cell_inches=2.4: the image fills its cell up to the gap between cells
    for top, bottom, left, right in boxes:
        w, h = right - left + 1, bottom - top + 1
        assert 0.9 * box_w <= w <= box_w, (w, box_w)
        assert abs(h / w - 32 / 48) < 0.02, (h, w)  # the image's aspect
        assert (top, bottom) == boxes[0][:2]  # one row
    # left to right in the order given, not overlapping, a gap between neighbours
    for (_, _, _, right), (_, _, left, _) in zip(boxes, boxes[1:]):
        assert left > right + 1
    # everything inside the picture, with a margin
    assert boxes[0][2] > 0 and boxes[-1][3] < out.shape[1] - 1 and boxes[0][1] < out.shape[0] - 1


def test_panel_size_scales_with_dpi_and_cells():
    img = np.full((40, 40, 3), _IMG, np.uint8)
    maps = [np.eye(4)] * 3
    small = viz.panel(img, maps, ["a", "b", "c"], suptitle="s", dpi=60)
    big = viz.panel(img, maps, ["a", "b", "c"], suptitle="s", dpi=120)
    assert abs(big.shape[0] / small.shape[0] - 2) < 0.05 and abs(big.shape[1] / small.shape[1] - 2) < 0.05
    # one more map adds about one cell (2.4 inches) of width and nothing to the height
    four = viz.panel(img, maps + [np.eye(4)], ["a", "b", "c", "d"], suptitle="s", dpi=60)
    assert four.shape[0] == small.shape[0]
    assert abs((four.shape[1] - small.shape[1]) - 2.4 * 60) <= 2


def test_panel_long_titles_wrap_inside_their_cells():
    img = np.full((32, 32, 3), _IMG, np.uint8)
    values = [1.0, -1.0]
    long = ["Sneaker  logit 7.31  p=0.93", "a much longer title than a single 2.4-inch cell has room for, at 9 pt"]
    out = viz.panel(img, [np.full((2, 2), v) for v in values], long, vmax=1.0, colorbar=False,
                    suptitle="img_0042.png (true Sneaker), after 3 epochs")
    short = viz.panel(img, [np.full((2, 2), v) for v in values], ["a", "b"], vmax=1.0, colorbar=False,
                      suptitle="img_0042.png (true Sneaker), after 3 epochs")
    assert out.shape[1] == short.shape[1]  # wrapped, not widened
    assert out.shape[0] > short.shape[0]  # the wrapped title gets its lines
    boxes = [_box(out, _IMG)] + [_box(out, c) for c in _panel_colours(img, values)]
    top = boxes[0][0]
    text = _text_mask(out)
    assert not text[top:].any()  # no title over the images
    # every title pixel is over its own cell (or the gap half next to it), never over a neighbour
    cols = np.flatnonzero(text[:top].any(0))
    assert cols.size
    gap = boxes[1][2] - boxes[0][3]
    assert all(any(left - gap / 2 <= c <= right + gap / 2 for _, _, left, right in boxes) for c in cols)
    # and not clipped: white margin all around
    assert not text[[0, -1]].any() and not text[:, [0, -1]].any()


@pytest.mark.parametrize("vmax, bars", [("shared", 1), ("per_map", 2), (0.5, 1)])
def test_panel_colour_bars_right_of_maps_with_tick_labels(vmax, bars):
    img = np.full((32, 32, 3), _IMG, np.uint8)
    maps = [np.full((2, 2), 0.3), np.arange(4.0).reshape(2, 2) - 1.5]
    out = viz.panel(img, maps, ["a", "b"], vmax=vmax, mode="nearest")
    o = out.astype(int)
    deep_red = (o[..., 0] > 90) & (o[..., 1] < 30) & (o[..., 2] < 70)  # the top of RdBu_r; overlays are paler
    runs = [r for r in _runs(deep_red.sum(0) >= 3)]
    assert len(runs) == bars, runs
    # each bar has tick labels just right of it
    text = _text_mask(out)
    for _, right in runs:
        assert text[:, right + 1 : right + 40].any()
    # without colour bars there is none, and the picture is narrower
    plain = viz.panel(img, maps, ["a", "b"], vmax=vmax, mode="nearest", colorbar=False)
    p = plain.astype(int)
    assert not ((p[..., 0] > 90) & (p[..., 1] < 30) & (p[..., 2] < 70)).sum(0).any()
    assert plain.shape[1] < out.shape[1]


def test_panel_per_map_bar_sits_between_its_map_and_the_next():
    img = np.full((32, 32, 3), _IMG, np.uint8)
    values = [1.0, -1.0]
    out = viz.panel(img, [np.full((2, 2), v) for v in values], ["pos", "neg"], vmax="per_map")
    # per_map: a constant map's display range is its own |value|, so it is drawn at +-1 of its range
    cells = [_box(out, c) for c in _panel_colours(img, values)]
    o = out.astype(int)
    runs = _runs(((o[..., 0] > 90) & (o[..., 1] < 30) & (o[..., 2] < 70)).sum(0) >= 3)
    assert len(runs) == 2
    assert cells[0][3] < runs[0][0] and runs[0][1] < cells[1][2] and cells[1][3] < runs[1][0]


def test_panel_tiny_range_offset_text_fits():
    img = np.full((32, 32, 3), _IMG, np.uint8)
    out = viz.panel(img, [np.full((2, 2), 3e-6)], ["tiny"], suptitle="s", vmax="per_map")
    text = _text_mask(out)
    assert not text[[0, -1]].any() and not text[:, [0, -1]].any()
    map_box = _box(out, _panel_colours(img, [1.0])[0])
    # the factor (1e-6) above the bar stays off the map
    assert not text[map_box[0] : map_box[1] + 1, map_box[2] : map_box[3] + 1].any()


def test_colorize_matches_matplotlib_colormap():
    import matplotlib

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-1.2, 1.2, 5000), np.linspace(-1, 1, 513), [0.0, 1.0, -1.0]])[None]
    for name in ("RdBu_r", "viridis"):
        ref = np.round(matplotlib.colormaps[name]((np.clip(x, -1, 1) + 1) * 0.5)[..., :3] * 255).astype(np.uint8)
        np.testing.assert_array_equal(viz.colorize(x, vmax=1.0, cmap=name), ref)


def test_strip_cells_in_grid_order():
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    cells = [np.full((20, 30, 3), c, np.uint8) for c in colours]
    out = viz.strip([[cells[0], cells[1]], [cells[2], cells[3]]], ["r0", "r1"], ["c0", "c1"], suptitle="s",
                    colorbar_vmax=1.0)
    b = [_box(out, c) for c in colours]
    assert all(x is not None for x in b)
    for top, bottom, left, right in b:
        assert abs((bottom - top + 1) / (right - left + 1) - 20 / 30) < 0.02
    assert b[0][3] < b[1][2] and b[2][3] < b[3][2]  # columns
    assert b[0][1] < b[2][0] and b[1][1] < b[3][0]  # rows
    assert b[0][2] == b[2][2] and b[0][0] == b[1][0]  # aligned
    text = _text_mask(out)
    assert text[b[0][0] : b[0][1], : b[0][2]].any()  # row title left of the first row
    assert not text[[0, -1]].any() and not text[:, [0, -1]].any()


def test_strip_grid_grows_with_rows_and_cols():
    cell = viz.overlay(np.full((24, 24, 3), 0.5), np.eye(3))
    small = viz.strip([[cell, cell]], ["cdam"], ["ep 0", "ep 1"])
    wide = viz.strip([[cell] * 4], ["cdam"], [f"ep {i}" for i in range(4)])
    tall = viz.strip([[cell, cell], [cell, None]], ["cdam", "attn"], ["ep 0", "ep 1"], colorbar_vmax=1.0)
    for out in (small, wide, tall):
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert wide.shape[1] > small.shape[1]
    assert tall.shape[0] > small.shape[0]


def test_strip_title_count_checked():
    cell = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        viz.strip([[cell, cell]], ["r"], ["only one"])


# ----------------------------------------------------------------------------- files


def test_save_png_roundtrip_atomic(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    dest = tmp_path / "a" / "b" / "map.png"
    returned = viz.save_png(arr, dest)
    assert returned == dest and dest.exists()
    with Image.open(dest) as im:
        back = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(back, arr)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["map.png"]  # no temp file left

    # Overwrite in place, still no leftovers.
    viz.save_png(arr[::-1].copy(), dest)
    with Image.open(dest) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), arr[::-1])
    assert sorted(p.name for p in dest.parent.iterdir()) == ["map.png"]


def test_save_png_failure_leaves_no_temp(tmp_path, monkeypatch):
    dest = tmp_path / "x.png"
    viz.save_png(np.zeros((4, 4, 3), np.uint8), dest)
    old = dest.read_bytes()

    def boom(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        viz.save_png(np.full((4, 4, 3), 255, np.uint8), dest)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # temp removed
    assert dest.read_bytes() == old  # previous file intact, never half-written


def test_save_png_of_panel(tmp_path):
    out = viz.panel(np.full((16, 16, 3), 0.5), [np.zeros((2, 2))], ["zero map"])
    p = viz.save_png(out, tmp_path / "panel.png")
    with Image.open(p) as im:
        assert im.size == (out.shape[1], out.shape[0])
