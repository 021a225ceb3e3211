"""A local web demo: pick or upload an image, see the head's top-5, click a class for its CDAM overlay beside the
attention map, define a concept from 1-5 example images, switch vanilla/Smooth/Integrated CDAM, download the panel
PNG and the raw map.

    python -m cdam_pl.app runs/demo/version_0/checkpoints/last.ckpt --port 8000     # then open the printed URL

Why the standard library (`http.server`) and one plain page rather than Gradio or FastAPI: the demo must work with
no network at all and never send a request off the machine. Gradio pulls in a large dependency tree and by default
loads fonts and scripts from CDNs and reports analytics; FastAPI would add three packages for what is a handful of
routes. Here the server is `ThreadingHTTPServer` bound to 127.0.0.1, the page is one HTML file, one script and one
style sheet shipped in `cdam_pl/static/` (system fonts, no external URL anywhere), and nothing new to install.

Cost model (`DemoEngine`): an upload runs ONE `CDAM.explain` pass that yields the logits, the attention map and the
vanilla CDAM of every class (or of the top `eager_classes` when the head has more), all kept per image in a bounded
LRU keyed by the hash of the decoded pixels. Clicking a class then only renders an overlay from the cache. A class
outside the eager set, a concept, or a Smooth/Integrated map is computed on first request, for that target only
(Smooth and Integrated cost about n_samples times a vanilla map per target, so doing every class up front would make
the first click wait for all of them), and cached the same way. Uploads live in memory only; nothing is written to
disk. User mistakes (not an image, empty, too large, too many pixels, a concept without examples) come back as a
one-line message shown in the page; an unexpected error answers 500 with a message and the server keeps running.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import threading
import time
import traceback
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from cdam_pl.errors import CdamError, DataError

__all__ = [
    "VARIANTS",
    "DemoEngine",
    "DemoServer",
    "decode_image",
    "demo_examples",
    "make_server",
    "serve",
    "main",
]

VARIANTS = {"vanilla": "CDAM", "smooth": "Smooth CDAM", "integrated": "Integrated CDAM"}
DISPLAY_Q = 0.01  # display-only quantile clipping of the colour range (ViT grids often have one outlier token)
TOP_K = 5
MAX_CONCEPT_IMAGES = 5
# Formats a browser user would upload; PIL's rarer plugins (EPS, ...) are never reached with untrusted bytes.
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}


class HttpError(CdamError):
    """A user error with its HTTP status (the message is shown in the page)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


# ---------------------------------------------------------------------------------------------------------------
# Uploaded bytes -> RGB image
# ---------------------------------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str = "the upload", max_pixels: int | None = None) -> Image.Image:
    """Uploaded bytes -> fully loaded 8-bit RGB PIL image, converted exactly as `cdam_pl.data.load_image` does
    (EXIF orientation applied; grayscale, palette, 16-bit and alpha images converted, alpha over white).

    max_pixels: images with more pixels are refused before decoding (default: PIL's decompression-bomb limit).
    Raises a one-line `DataError` naming `name` for empty, non-image, corrupt or oversized data.
    """
    from cdam_pl.data import _reason, _to_rgb  # the conversions load_image applies, reused rather than copied

    if not data:
        raise DataError(f"{name} is empty (0 bytes); choose an image file")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS) as im:
            if limit and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the limit of {limit} pixels")
            im.load()
            im = ImageOps.exif_transpose(im)  # a detached copy
        rgb = _to_rgb(im)
        return rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, MemoryError, ...)
        raise DataError(" ".join(f"cannot read {name}: {_reason(exc)}; choose a JPEG, PNG, GIF, BMP, TIFF or WebP "
                                 "image".split())) from None


def _png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes; level 1 encodes ~5x faster than PIL's default for ~10% more bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _fit(img: Image.Image, box: int) -> np.ndarray:
    """Resize so the longer side is `box` px (aspect kept): pixel blocks for small images, Lanczos otherwise."""
    scale = box / max(img.width, img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
    return np.asarray(img.resize(size, resample), dtype=np.uint8).copy()  # [h, w, 3]


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _safe_name(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "image"


# ---------------------------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    id: str
    name: str
    source: str  # "scikit-image" or "validation"
    image: Image.Image  # RGB


def _skimage_examples() -> list[Example]:
    try:
        from skimage import data as skdata
    except ImportError:
        return []
    photos = [("chelsea", "chelsea (cat)"), ("coffee", "coffee (cup)"), ("astronaut", "astronaut")]
    return [Example(key, label, "scikit-image", Image.fromarray(getattr(skdata, key)()).convert("RGB"))
            for key, label in photos]


def _validation_examples(config: dict[str, Any], backbone, n: int) -> list[Example]:
    """Up to n validation images of distinct classes, from the data the head was validated on (empty when that data
    is not on this machine)."""
    from cdam_pl.data import ImageDataModule

    d = dict(config.get("data") or {})
    if n <= 0 or not d.get("name"):
        return []
    dc = backbone.data_config
    dm = ImageDataModule(
        name=d["name"], root=d.get("root"), train_dir=d.get("train_dir"), val_dir=d.get("val_dir"),
        val_split=d.get("val_split", 0.2), train_size=d.get("train_size"), val_size=d.get("val_size"),
        batch_size=1, num_workers=0, img_size=backbone.img_size, mean=dc["mean"], std=dc["std"],
        interpolation=dc["interpolation"], seed=int(config.get("seed", 0)), validate=False,
    )
    dm.setup()
    val = dm.val_dataset
    out, seen = [], set()
    for i, label in enumerate(val.targets):
        if label in seen:
            continue
        seen.add(label)
        out.append(Example(f"val-{i}", f"validation #{i} (true: {val.classes[label]})", "validation",
                           val.load_image(i)))
        if len(out) == n:
            break
    return out


def demo_examples(config: dict[str, Any], backbone, n_validation: int = 4,
                  warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Example]:
    """The bundled scikit-image photos plus a few of the checkpoint's validation images where available."""
    out = _skimage_examples()
    try:
        out += _validation_examples(config, backbone, n_validation)
    except Exception as e:  # the data moved, is not installed here, ...: the demo works without it
        warn(f"note: no validation examples ({' '.join(str(e).split())[:200]})")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The engine: images, cached explanations, rendering
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Image:
    id: str
    name: str
    x: Tensor  # [1, 3, H, W] model input
    display: np.ndarray  # [h, w, 3] uint8, the picture overlays are drawn on (original aspect)
    logits: np.ndarray  # [C]
    probs: np.ndarray  # [C]
    attention: np.ndarray  # [heads, gh, gw]
    seconds: float  # time of the first explanation pass
    maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (variant, target) -> [gh, gw]
    scores: dict[str, float] = field(default_factory=dict)  # concept target -> similarity
    pngs: dict[tuple[str, ...], bytes] = field(default_factory=dict)  # rendered pictures, by what they show


@dataclass
class _Concept:
    id: str
    name: str
    vector: Tensor  # [D]
    n_images: int


class DemoEngine:
    """Everything the page asks for, independent of HTTP: decode, explain (cached), render.

    Targets are strings: "c<k>" for class k, "k<id>" for a concept. Maps are signed CDAM grids [gh, gw].
    """

    def __init__(self, model, *, examples: Sequence[Example] = (), cache_size: int = 32, eager_classes: int = 100,
                 n_samples: int = 50, n_steps: int = 50, noise: float | None = None, seed: int = 0,
                 max_upload_bytes: int = 20 * 2**20, max_pixels: int | None = None, max_concepts: int = 16,
                 display_size: int = 320, device: str | torch.device = "cpu"):
        from cdam_pl.data import build_transform
        from cdam_pl.explain import CDAM

        self.model = model
        self.backbone, self.head, self.classes = model.backbone, model.head, list(model.classes)
        self.device = torch.device(device)
        self.cdam = CDAM(self.backbone, self.head)
        self.img_size = tuple(self.backbone.img_size)
        self.transform = build_transform(self.img_size, **self.backbone.data_config)
        self.cache_size, self.max_concepts = max(1, int(cache_size)), max(1, int(max_concepts))
        self.eager_classes = max(1, int(eager_classes))
        self.n_samples, self.n_steps, self.noise, self.seed = int(n_samples), int(n_steps), noise, int(seed)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_pixels = max_pixels
        self.display_size = int(display_size)
        self.examples = {e.id: e for e in examples}
        self.explain_calls = 0  # number of CDAM passes run (the cache's effect is visible here)
        self._images: OrderedDict[str, _Image] = OrderedDict()
        self._concepts: OrderedDict[str, _Concept] = OrderedDict()
        self._next_concept = 1
        self._state = threading.RLock()  # guards the dicts (held briefly)
        self._compute = threading.Lock()  # one model pass at a time (the CPU cores are shared anyway)

    # --- facts for the page --------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        ident = self.backbone.identity
        return {
            "model": {"backbone": ident.get("name"), "weights": ident.get("weights"), "img_size": list(self.img_size),
                      "patch_size": self.backbone.patch_size, "head": self.model.meta.get("head", {}).get("kind")},
            "classes": self.classes,
            "variants": [{"id": k, "label": v} for k, v in VARIANTS.items()],
            "examples": [{"id": e.id, "name": e.name, "source": e.source} for e in self.examples.values()],
            "concepts": [self._concept_info(c) for c in self._concepts.values()],
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_concept_images": MAX_CONCEPT_IMAGES},
        }

    def example_thumbnail(self, example_id: str, box: int = 96) -> bytes:
        return _png(_fit(self._example(example_id).image, box))

    # --- images --------------------------------------------------------------------------------------------------
    def add_upload(self, data: bytes, name: str) -> dict[str, Any]:
        """Decode uploaded bytes and explain them (or find them in the cache) -> the image's summary."""
        return self.add_image(decode_image(data, f"'{name}'", self.max_pixels), name)

    def add_example(self, example_id: str) -> dict[str, Any]:
        ex = self._example(example_id)
        return self.add_image(ex.image, ex.name)

    def add_image(self, image: Image.Image, name: str) -> dict[str, Any]:
        """RGB image -> summary; one CDAM pass gives logits, attention and the eager classes' vanilla maps."""
        key = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:16]
        with self._state:
            if key in self._images:
                self._images.move_to_end(key)
                self._images[key].name = name  # same pixels, maybe another file name: show the latest
                return self.summary(key, cached=True)
        x = self.transform(image).unsqueeze(0).to(self.device)  # [1, 3, H, W]
        k = min(len(self.classes), self.eager_classes)
        with self._compute:
            with self._state:
                concepts = list(self._concepts.values())
            vectors = torch.stack([c.vector for c in concepts]) if concepts else None
            t0 = time.perf_counter()
            ex = self.cdam.explain(x, targets=lambda logits: logits.topk(k, dim=1).indices, concepts=vectors,
                                   attention=True)
            self.explain_calls += 1
            seconds = time.perf_counter() - t0
        logits = ex.logits[0].float().cpu()
        entry = _Image(key, name, x, _fit(image, self.display_size), logits.numpy(),
                       logits.softmax(0).numpy(), ex.attention[0].float().cpu().numpy(), seconds)
        for j, c in enumerate(ex.targets[0].tolist()):
            entry.maps[("vanilla", f"c{c}")] = ex.class_maps[0, j].cpu().numpy()
        for j, c in enumerate(concepts):
            entry.maps[("vanilla", f"k{c.id}")] = ex.concept_maps[0, j].cpu().numpy()
            entry.scores[f"k{c.id}"] = float(ex.concept_scores[0, j])
        with self._state:
            self._images[key] = entry
            while len(self._images) > self.cache_size:
                self._images.popitem(last=False)
        return self.summary(key, cached=False)

    def summary(self, image_id: str, cached: bool = True) -> dict[str, Any]:
        img = self._image(image_id)
        top = np.argsort(-img.logits, kind="stable")[:min(TOP_K, len(self.classes))]
        gh, gw = img.attention.shape[1:]
        return {
            "id": img.id, "name": img.name, "cached": cached, "seconds": round(img.seconds, 4),
            "input_size": list(img.x.shape[2:]), "grid": [int(gh), int(gw)],
            "top": [{"target": f"c{c}", "index": int(c), "name": self.classes[c], "prob": float(img.probs[c]),
                     "logit": float(img.logits[c])} for c in top],
        }

    # --- concepts ------------------------------------------------------------------------------------------------
    def add_concept(self, name: str, files: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
        """A concept from 1-5 example images: its vector is their mean embedding (`concept_vectors`)."""
        from cdam_pl.explain import concept_vectors

        name = " ".join((name or "").split())[:40] or f"concept {self._next_concept}"
        if not files:
            raise DataError(f"concept '{name}' has no example images; choose 1 to {MAX_CONCEPT_IMAGES} images")
        if len(files) > MAX_CONCEPT_IMAGES:
            raise DataError(f"concept '{name}' got {len(files)} images; choose at most {MAX_CONCEPT_IMAGES}")
        big = next((f for f, data in files if len(data) > self.max_upload_bytes), None)
        if big is not None:
            raise DataError(f"concept example '{big}' is larger than the limit of {_size(self.max_upload_bytes)}; "
                            "choose a smaller image")
        tensors = [self.transform(decode_image(data, f"concept example '{fname}'", self.max_pixels)).to(self.device)
                   for fname, data in files]
        with self._compute:
            _, vectors = concept_vectors(self.backbone, {name: tensors})
        with self._state:
            cid = str(self._next_concept)
            self._next_concept += 1
            self._concepts[cid] = _Concept(cid, name, vectors[0].detach(), len(tensors))
            while len(self._concepts) > self.max_concepts:
                self._concepts.popitem(last=False)
            return self._concept_info(self._concepts[cid])

    @staticmethod
    def _concept_info(c: _Concept) -> dict[str, Any]:
        return {"target": f"k{c.id}", "name": c.name, "n_images": c.n_images}

    # --- maps ----------------------------------------------------------------------------------------------------
    def explain(self, image_id: str, target: str, variant: str = "vanilla") -> dict[str, Any]:
        """Make sure the map exists (computing it if needed) -> what the page shows about it."""
        img = self._image(image_id)
        self._check_variant(variant)
        t0 = time.perf_counter()
        grid, computed = self._ensure(img, target, variant)
        q = urllib.parse.urlencode({"image": img.id, "target": target, "variant": variant})
        kind, label = self._label(target)
        out = {
            "image": img.id, "target": target, "variant": variant, "kind": kind, "label": label,
            "title": f"{VARIANTS[variant]}: {label}", "computed": computed,
            "seconds": round(time.perf_counter() - t0, 4),
            "vmax": _display_range(grid), "attention_vmax": _display_range(img.attention.mean(0)),
            "overlay": f"/api/overlay.png?{q}", "attention": f"/api/attention.png?image={img.id}",
            "input": f"/api/input.png?image={img.id}", "panel": f"/api/panel.png?{q}", "raw": f"/api/map.npz?{q}",
        }
        if kind == "class":
            c = int(target[1:])
            out.update(prob=float(img.probs[c]), logit=float(img.logits[c]))
        else:
            out.update(similarity=img.scores.get(target))
        return out

    def map(self, image_id: str, target: str, variant: str = "vanilla") -> np.ndarray:
        """Signed CDAM grid [gh, gw] of `target`; computed once per (image, variant, target), then cached."""
        return self._ensure(self._image(image_id), target, variant)[0]

    def _ensure(self, img: _Image, target: str, variant: str) -> tuple[np.ndarray, bool]:
        """-> (map [gh, gw], whether it had to be computed now)."""
        self._check_variant(variant)
        self._label(target)  # validates the target
        with self._state:
            if (variant, target) in img.maps:
                return img.maps[(variant, target)], False
        with self._compute:
            with self._state:
                if (variant, target) in img.maps:  # computed by a concurrent request meanwhile
                    return img.maps[(variant, target)], False
                concept = self._concepts.get(target[1:]) if target[0] == "k" else None
            if target[0] == "k" and concept is None:
                raise HttpError(404, "that concept is no longer defined; add it again")
            kwargs: dict[str, Any] = {}
            if variant == "smooth":
                kwargs = dict(n_samples=self.n_samples, noise=self.noise)
            elif variant == "integrated":
                kwargs = dict(n_steps=self.n_steps, noise=self.noise)
            if variant != "vanilla":  # seeded: the same image always gets the same map, whatever else was asked
                kwargs["generator"] = torch.Generator(device=self.device).manual_seed(self.seed)
            ex = self.cdam.explain(img.x, targets=[int(target[1:])] if concept is None else None,
                                   concepts=None if concept is None else concept.vector[None], variant=variant,
                                   **kwargs)
            self.explain_calls += 1
            grid = (ex.class_maps if concept is None else ex.concept_maps)[0, 0].cpu().numpy()
            with self._state:
                img.maps[(variant, target)] = grid
                if concept is not None:
                    img.scores[target] = float(ex.concept_scores[0, 0])
        return grid, True

    # --- pictures and files --------------------------------------------------------------------------------------
    def input_png(self, image_id: str) -> bytes:
        img = self._image(image_id)
        return self._rendered(img, ("input",), lambda: img.display)

    def overlay_png(self, image_id: str, target: str, variant: str = "vanilla") -> bytes:
        """The signed map over the image (red = evidence for, blue = against), colour range clipped at 1%."""
        from cdam_pl import viz

        img = self._image(image_id)
        grid = self.map(image_id, target, variant)
        return self._rendered(img, ("overlay", variant, target), lambda: viz.overlay(img.display, grid, q=DISPLAY_Q))

    def attention_png(self, image_id: str) -> bytes:
        from cdam_pl import viz

        img = self._image(image_id)
        return self._rendered(img, ("attention",), lambda: viz.overlay(img.display, img.attention.mean(0), q=DISPLAY_Q))

    def _rendered(self, img: _Image, key: tuple[str, ...], draw: Callable[[], np.ndarray]) -> bytes:
        """PNG of draw(), rendered once per image and key (clicking back to a class costs nothing)."""
        with self._state:
            png = img.pngs.get(key)
        if png is None:
            png = _png(draw())
            with self._state:
                img.pngs[key] = png
        return png

    def panel_png(self, image_id: str, target: str, variant: str = "vanilla") -> bytes:
        """The image, the CDAM overlay and the attention overlay, titled, each with its colour bar."""
        from cdam_pl import viz

        img = self._image(image_id)
        grid = self.map(image_id, target, variant)
        _, label = self._label(target)
        top = int(np.argmax(img.logits))
        title = f"{img.name} | predicted: {self.classes[top]} ({img.probs[top]:.1%})"
        pic = viz.panel(img.display, [grid, img.attention.mean(0)],
                        [f"{VARIANTS[variant]}: {label}", "attention (head mean)"], suptitle=title,
                        vmax="per_map", q=DISPLAY_Q, image_title="image")
        return _png(pic, compress_level=6)  # a file to keep: smaller beats faster

    def raw_npz(self, image_id: str, target: str, variant: str = "vanilla") -> bytes:
        """map [gh, gw] (signed, unclipped), attention [heads, gh, gw], logits [C] and what they refer to."""
        img = self._image(image_id)
        grid = self.map(image_id, target, variant)
        _, label = self._label(target)
        buf = io.BytesIO()
        np.savez(buf, map=grid.astype(np.float32), attention=img.attention.astype(np.float32),
                 logits=img.logits.astype(np.float32), classes=np.array(self.classes, dtype=str),
                 target=np.array(target), label=np.array(label), variant=np.array(variant),
                 image=np.array(img.name), input_size=np.array(img.x.shape[2:], dtype=np.int64))
        return buf.getvalue()

    def download_name(self, image_id: str, target: str, variant: str, suffix: str) -> str:
        img = self._image(image_id)
        return f"{_safe_name(Path(img.name).stem)}_{_safe_name(self._label(target)[1])}_{variant}{suffix}"

    # --- helpers -------------------------------------------------------------------------------------------------
    def _image(self, image_id: str) -> _Image:
        with self._state:
            img = self._images.get(image_id or "")
            if img is None:
                raise HttpError(404, "this image is no longer in the server's cache (or never was); "
                                     "upload or pick it again")
            self._images.move_to_end(image_id)
            return img

    def _example(self, example_id: str) -> Example:
        if example_id not in self.examples:
            raise HttpError(404, f"no example named {example_id!r}; pick one of the thumbnails")
        return self.examples[example_id]

    @staticmethod
    def _check_variant(variant: str) -> None:
        if variant not in VARIANTS:
            raise HttpError(400, f"unknown method {variant!r}; choose one of {', '.join(VARIANTS)}")

    def _label(self, target: str) -> tuple[str, str]:
        """'c3' -> ('class', name of class 3); 'k2' -> ('concept', 'concept: <name>')."""
        m = re.fullmatch(r"([ck])(\d{1,9})", target or "")
        if m and m.group(1) == "c" and int(m.group(2)) < len(self.classes):
            return "class", self.classes[int(m.group(2))]
        if m and m.group(1) == "k":
            with self._state:
                c = self._concepts.get(m.group(2))
            if c is not None:
                return "concept", f"concept: {c.name}"
            raise HttpError(404, "that concept is no longer defined; add it again")
        raise HttpError(400, f"unknown target {target!r}; click a class or a concept")


def _display_range(grid: np.ndarray) -> float:
    from cdam_pl.viz import display_range

    return float(display_range(grid, DISPLAY_Q))


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """multipart/form-data -> (text fields, [(filename, bytes)] of the file fields), with the standard library."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise HttpError(400, "expected a multipart/form-data upload")
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise HttpError(400, "could not read the multipart upload")
    fields, files = {}, []
    for part in msg.iter_parts():
        field_name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        payload = part.get_payload(decode=True) or b""
        if filename is not None:
            files.append((filename, payload))
        elif field_name:
            fields[str(field_name)] = payload.decode("utf-8", "replace")
    return fields, files


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server, bound to 127.0.0.1; `url` is where the page is."""

    daemon_threads = True

    def __init__(self, engine: DemoEngine, port: int = 0, quiet: bool = False):
        self.engine = engine
        self.quiet = quiet
        super().__init__(("127.0.0.1", int(port)), _Handler)
        self.port = int(self.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/"
        self._thread: threading.Thread | None = None

    def start(self) -> "DemoServer":
        """Serve from a background thread (for tests and embedding); `close()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="cdam-demo", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "cdam-pl-demo"
    DRAIN_LIMIT = 2**30  # bodies above the limit are read and dropped up to this size (so the browser sees the message)

    # --- plumbing ------------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            self._check_host()
            route = ROUTES.get((method, url.path))
            if route is None and method == "GET" and url.path.startswith("/static/"):
                route = _Handler._static
            if route is None:
                raise HttpError(404, f"no page {url.path!r} here; open / for the demo")
            route(self, query, url.path)
        except HttpError as e:
            self._json({"error": str(e)}, e.status)
        except CdamError as e:
            self._json({"error": str(e)}, 400)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away
        except Exception as e:  # a bug, not the user's fault: answer, log, keep serving
            traceback.print_exc(file=sys.stderr)
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            try:
                self._json({"error": f"internal error ({msg}); the server keeps running, see its log"}, 500)
            except OSError:
                pass

    def _check_host(self) -> None:
        """Only answer requests addressed to this machine (guards against DNS rebinding from other sites)."""
        host = (self.headers.get("Host") or "").strip().lower()
        if host and host not in (f"127.0.0.1:{self.server.port}", f"localhost:{self.server.port}"):
            raise HttpError(403, f"requests must address 127.0.0.1:{self.server.port}")

    def _send(self, body: bytes, content_type: str, status: int = 200, filename: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # The page may only talk to this server: no external script, style, font, image or connection.
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; "
                                                    "object-src 'none'; base-uri 'none'; form-action 'self'")
        if filename:
            self.send_header("Content-Disposition", f"attachment; filename=\"{filename}\"")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: Any, status: int = 200) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _body(self, limit: int) -> bytes:
        """The request body, at most `limit` bytes; bigger ones are drained and refused with a message."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "the upload had no Content-Length; send the file as a plain request body")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, f"bad Content-Length {length!r}") from None
        if n > limit:
            if n <= self.DRAIN_LIMIT:
                left = n
                while left > 0:
                    chunk = self.rfile.read(min(left, 2**20))
                    if not chunk:
                        break
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise HttpError(413, f"the upload is {_size(n)}, more than the limit of {_size(limit)}; "
                                 "choose a smaller image")
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise HttpError(400, "the upload was cut short; try again")
        return data

    # --- routes --------------------------------------------------------------------------------------------------
    def _index(self, query, path) -> None:
        self._static(query, "/static/index.html")

    def _static(self, query, path) -> None:
        name = path[len("/static/"):]
        if name not in STATIC_FILES:
            raise HttpError(404, f"no file {name!r}")
        body = (resources.files("cdam_pl") / "static" / name).read_bytes()
        self._send(body, f"{STATIC_FILES[name]}; charset=utf-8")

    def _info(self, query, path) -> None:
        self._json(self.server.engine.info())

    def _upload(self, query, path) -> None:
        data = self._body(self.server.engine.max_upload_bytes)
        name = (query.get("name") or "upload").strip()[:200] or "upload"
        self._json(self.server.engine.add_upload(data, name))

    def _example(self, query, path) -> None:
        self._json(self.server.engine.add_example(query.get("id", "")))

    def _example_png(self, query, path) -> None:
        self._send(self.server.engine.example_thumbnail(query.get("id", "")), "image/png")

    def _concept(self, query, path) -> None:
        engine = self.server.engine
        body = self._body(engine.max_upload_bytes * MAX_CONCEPT_IMAGES)
        fields, files = _parse_multipart(self.headers.get("Content-Type", ""), body)
        files = [(name, data) for name, data in files if name or data]  # an empty file field: nothing chosen
        self._json(engine.add_concept(fields.get("name", ""), files))

    def _explain(self, query, path) -> None:
        self._json(self.server.engine.explain(*self._target(query)))

    def _input_png(self, query, path) -> None:
        self._send(self.server.engine.input_png(query.get("image", "")), "image/png")

    def _overlay_png(self, query, path) -> None:
        self._send(self.server.engine.overlay_png(*self._target(query)), "image/png")

    def _attention_png(self, query, path) -> None:
        self._send(self.server.engine.attention_png(query.get("image", "")), "image/png")

    def _panel_png(self, query, path) -> None:
        engine, args = self.server.engine, self._target(query)
        self._send(engine.panel_png(*args), "image/png", filename=engine.download_name(*args, "_panel.png"))

    def _map_npz(self, query, path) -> None:
        engine, args = self.server.engine, self._target(query)
        self._send(engine.raw_npz(*args), "application/octet-stream", filename=engine.download_name(*args, "_map.npz"))

    @staticmethod
    def _target(query: dict[str, str]) -> tuple[str, str, str]:
        return query.get("image", ""), query.get("target", ""), query.get("variant", "vanilla")


ROUTES: dict[tuple[str, str], Callable[[_Handler, dict, str], None]] = {
    ("GET", "/"): _Handler._index,
    ("GET", "/index.html"): _Handler._index,
    ("GET", "/api/info"): _Handler._info,
    ("GET", "/api/example.png"): _Handler._example_png,
    ("POST", "/api/example"): _Handler._example,
    ("POST", "/api/upload"): _Handler._upload,
    ("POST", "/api/concept"): _Handler._concept,
    ("GET", "/api/explain"): _Handler._explain,
    ("GET", "/api/input.png"): _Handler._input_png,
    ("GET", "/api/overlay.png"): _Handler._overlay_png,
    ("GET", "/api/attention.png"): _Handler._attention_png,
    ("GET", "/api/panel.png"): _Handler._panel_png,
    ("GET", "/api/map.npz"): _Handler._map_npz,
}


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------


def make_server(checkpoint: str | Path, port: int = 0, *, weights: str | None = None, device: str = "cpu",
                examples: bool = True, quiet: bool = False, **engine_options: Any) -> DemoServer:
    """Load the checkpoint and bind the demo to 127.0.0.1:port (0 = any free port); not yet serving."""
    from cdam_pl.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, weights=weights, device=device)
    found = demo_examples(model.config, model.backbone) if examples else []
    engine = DemoEngine(model, examples=found, device=device, **engine_options)
    try:
        return DemoServer(engine, port, quiet=quiet)
    except OSError as e:
        raise CdamError(f"cannot listen on 127.0.0.1:{port} ({e.strerror or e}); "
                        "pass --port with another number (0 picks a free one)") from None


def serve(checkpoint: str | Path, port: int = 8000, *, weights: str | None = None, device: str = "cpu",
          examples: bool = True, quiet: bool = False, **engine_options: Any) -> int:
    """Run the demo on http://127.0.0.1:port/ until Ctrl-C. Raises CdamError for a bad checkpoint or a busy port."""
    server = make_server(checkpoint, port, weights=weights, device=device, examples=examples, quiet=quiet,
                         **engine_options)
    print(f"cdam-pl demo: {server.url}  ({len(server.engine.classes)} classes; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from cdam_pl.cli import run_cli

    p = argparse.ArgumentParser(prog="python -m cdam_pl.app", description="Local web demo: explain a trained "
                                "head's decisions with CDAM in the browser (served on 127.0.0.1 only).")
    p.add_argument("checkpoint", help="a checkpoint written by train.py (e.g. runs/NAME/version_0/checkpoints/last.ckpt)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000; 0 picks a free one)")
    p.add_argument("--weights", default=None, help="where the backbone weights are, if they moved since training")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-examples", action="store_true", help="do not offer the bundled example images")
    p.add_argument("--quiet", action="store_true", help="no request log")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {args.port}")
    return run_cli(lambda: serve(args.checkpoint, args.port, weights=args.weights, device=args.device,
                                 examples=not args.no_examples, quiet=args.quiet))


if __name__ == "__main__":
    sys.exit(main())
