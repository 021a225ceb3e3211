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
