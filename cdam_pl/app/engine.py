"""The web demo's engine, independent of HTTP: decode uploads, explain them once (cached), render what the page
shows.

Cost model (`DemoEngine`): an upload runs ONE `CDAM.explain` pass that yields the logits, the attention map and the
vanilla CDAM of every class of the head (1,000 classes cost about one plain forward: the engine takes all targets
from one product per image), all kept per image in a bounded LRU keyed by the hash of the decoded pixels. Clicking a
class then only renders an overlay from the cache. A concept added later, or a Smooth/Integrated map, is computed on
first request, for that target only
(Smooth and Integrated cost about n_samples times a vanilla map per target, so doing every class up front would make
the first click wait for all of them), and cached the same way. Uploads live in memory only; nothing is written to
disk. User mistakes raise a `CdamError` with a one-line message: `NotFoundError` for an image, example or concept
that is not there (any more), `RequestError` for an unknown target or method, `DataError` for bad image data; the
server turns them into answers.
"""
from __future__ import annotations

import hashlib
import io
import re
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from cdam_pl.app.examples import Example
from cdam_pl.data.images import error_reason, to_rgb
from cdam_pl.data.transforms import build_transform
from cdam_pl.errors import DataError, NotFoundError, RequestError
from cdam_pl.explain.cdam import CDAM, concept_vectors
from cdam_pl.explain.registry import METHODS
from cdam_pl.store.reader import npz_bytes
from cdam_pl.viz.figures import panel
from cdam_pl.viz.maps import DISPLAY_Q, display_range, overlay

__all__ = ["VARIANTS", "DemoEngine", "decode_image"]

# The page's method switch: the registry's methods computed by the CDAM engine, by their engine variant.
VARIANTS = {m.variant: m for m in METHODS.values() if m.variant is not None}
TOP_K = 5
MAX_CONCEPT_IMAGES = 5
# Formats a browser user would upload; PIL's rarer plugins (EPS, ...) are never reached with untrusted bytes.
UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")


# ---------------------------------------------------------------------------------------------------------------
# Uploaded bytes -> RGB image
# ---------------------------------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str = "the upload", max_pixels: int | None = None) -> Image.Image:
    """Uploaded bytes -> fully loaded 8-bit RGB PIL image, converted exactly as `cdam_pl.data.images.load_image` does
    (EXIF orientation applied; grayscale, palette, 16-bit and alpha images converted, alpha over white).

    max_pixels: images with more pixels are refused before decoding (default: PIL's decompression-bomb limit).
    Raises a one-line `DataError` naming `name` for empty, non-image, corrupt or oversized data.
    """
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
        rgb = to_rgb(im)
        return rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, MemoryError, ...)
        raise DataError(" ".join(f"cannot read {name}: {error_reason(exc)}; choose a JPEG, PNG, GIF, BMP, TIFF or WebP "
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


def size_text(n: int) -> str:
    """A byte count for a message: '1.5 MB', '40 KB'."""
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def _safe_name(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:limit] or "image"


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

    def __init__(self, model, *, examples: Sequence[Example] = (), cache_size: int = 32,
                 n_samples: int = 50, n_steps: int = 50, noise: float | None = None, seed: int = 0,
                 max_upload_bytes: int = 20 * 2**20, max_pixels: int | None = None, max_concepts: int = 16,
                 display_size: int = 320, device: str | torch.device = "cpu"):
        self.model = model
        self.backbone, self.head, self.classes = model.backbone, model.head, list(model.classes)
        self.device = torch.device(device)
        self.cdam = CDAM(self.backbone, self.head)
        self.img_size = tuple(self.backbone.img_size)
        self.transform = build_transform(self.img_size, **self.backbone.data_config)
        self.cache_size, self.max_concepts = max(1, int(cache_size)), max(1, int(max_concepts))
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
            "variants": [{"id": k, "label": m.label} for k, m in VARIANTS.items()],
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
        """RGB image -> summary; one CDAM pass gives logits, attention and every class's vanilla map."""
        key = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:16]
        with self._state:
            if key in self._images:
                self._images.move_to_end(key)
                self._images[key].name = name  # same pixels, maybe another file name: show the latest
                return self.summary(key, cached=True)
        x = self.transform(image).unsqueeze(0).to(self.device)  # [1, 3, H, W]
        with self._compute:
            with self._state:
                concepts = list(self._concepts.values())
            vectors = torch.stack([c.vector for c in concepts]) if concepts else None
            t0 = time.perf_counter()
            ex = self.cdam.explain(x, targets=list(range(len(self.classes))), concepts=vectors, attention=True)
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
            "classes_explained": sum(v == "vanilla" and t[0] == "c" for v, t in img.maps),  # in that first pass
            "input_size": list(img.x.shape[2:]), "grid": [int(gh), int(gw)],
            "top": [{"target": f"c{c}", "index": int(c), "name": self.classes[c], "prob": float(img.probs[c]),
                     "logit": float(img.logits[c])} for c in top],
        }

    # --- concepts ------------------------------------------------------------------------------------------------
    def add_concept(self, name: str, files: Sequence[tuple[str, bytes]]) -> dict[str, Any]:
        """A concept from 1-5 example images: its vector is their mean embedding (`concept_vectors`)."""
        name = " ".join((name or "").split())[:40] or f"concept {self._next_concept}"
        if not files:
            raise DataError(f"concept '{name}' has no example images; choose 1 to {MAX_CONCEPT_IMAGES} images")
        if len(files) > MAX_CONCEPT_IMAGES:
            raise DataError(f"concept '{name}' got {len(files)} images; choose at most {MAX_CONCEPT_IMAGES}")
        big = next((f for f, data in files if len(data) > self.max_upload_bytes), None)
        if big is not None:
            raise DataError(f"concept example '{big}' is larger than the limit of {size_text(self.max_upload_bytes)}; "
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
            "title": f"{VARIANTS[variant].label}: {label}", "computed": computed,
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
                raise NotFoundError("that concept is no longer defined; add it again")
            # The method's parameters from this demo's settings, its seed turned into a generator: the same image
            # always gets the same map, whatever else was asked.
            method = VARIANTS[variant]
            given = {"n_samples": self.n_samples, "n_steps": self.n_steps, "noise": self.noise, "seed": self.seed}
            kwargs = method.kwargs(method.params_from(given), self.device)
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
        img = self._image(image_id)
        grid = self.map(image_id, target, variant)
        return self._rendered(img, ("overlay", variant, target), lambda: overlay(img.display, grid, q=DISPLAY_Q))

    def attention_png(self, image_id: str) -> bytes:
        img = self._image(image_id)
        return self._rendered(img, ("attention",), lambda: overlay(img.display, img.attention.mean(0), q=DISPLAY_Q))

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
        img = self._image(image_id)
        grid = self.map(image_id, target, variant)
        _, label = self._label(target)
        top = int(np.argmax(img.logits))
        title = f"{img.name} | predicted: {self.classes[top]} ({img.probs[top]:.1%})"
        pic = panel(img.display, [grid, img.attention.mean(0)],
                        [f"{VARIANTS[variant].label}: {label}", "attention (head mean)"], suptitle=title,
                        vmax="per_map", q=DISPLAY_Q, image_title="image")
        return _png(pic, compress_level=6)  # a file to keep: smaller beats faster

    def raw_npz(self, image_id: str, target: str, variant: str = "vanilla") -> bytes:
        """map [gh, gw] (signed, unclipped), attention [heads, gh, gw], logits [C] and what they refer to."""
        img = self._image(image_id)
        grid = self.map(image_id, target, variant)
        _, label = self._label(target)
        return npz_bytes({"map": grid.astype(np.float32), "attention": img.attention.astype(np.float32),
                          "logits": img.logits.astype(np.float32), "classes": np.array(self.classes, dtype=str),
                          "target": np.array(target), "label": np.array(label), "variant": np.array(variant),
                          "image": np.array(img.name), "input_size": np.array(img.x.shape[2:], dtype=np.int64)})

    def download_name(self, image_id: str, target: str, variant: str, suffix: str) -> str:
        img = self._image(image_id)
        return f"{_safe_name(Path(img.name).stem)}_{_safe_name(self._label(target)[1])}_{variant}{suffix}"

    # --- helpers -------------------------------------------------------------------------------------------------
    def _image(self, image_id: str) -> _Image:
        with self._state:
            img = self._images.get(image_id or "")
            if img is None:
                raise NotFoundError("this image is no longer in the server's cache (or never was); "
                                    "upload or pick it again")
            self._images.move_to_end(image_id)
            return img

    def _example(self, example_id: str) -> Example:
        if example_id not in self.examples:
            raise NotFoundError(f"no example named {example_id!r}; pick one of the thumbnails")
        return self.examples[example_id]

    @staticmethod
    def _check_variant(variant: str) -> None:
        if variant not in VARIANTS:
            raise RequestError(f"unknown method {variant!r}; choose one of {', '.join(VARIANTS)}")

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
            raise NotFoundError("that concept is no longer defined; add it again")
        raise RequestError(f"unknown target {target!r}; click a class or a concept")


def _display_range(grid: np.ndarray) -> float:
    return float(display_range(grid, DISPLAY_Q))

