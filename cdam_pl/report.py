"""explain.py's engine: explain any images with a trained head and write pictures, raw maps, a manifest and a gallery.

Pipeline: checkpoint -> (frozen backbone, head, class names) -> image files -> each image's input size (fixed, or
aspect-preserving with the patch grid following it) -> batches of equal size, loaded in threads one batch ahead ->
per batch ONE `CDAM.explain` forward for vanilla CDAM (class targets and concepts together) and the attention map,
then every other requested method -> per image a PNG panel and its rows in maps.npz -> manifest.json, index.html.

Methods are a registry: name -> `Method`, whose function takes `(cdam, images [B,3,H,W], targets [B,K], **params)`
(or the `(backbone, head, images, targets, **params)` convention of the comparison methods) and returns maps
[B, R, h, w] with R = K (one per target), K + M (targets, then concepts) for methods that accept `concepts=`,
or 1 for class-agnostic methods. The comparison methods of `cdam_pl.explain.registry` (rp, tam, ig, smoothgrad,
ixg) are registered from there, so explain.py and the benchmark run the same code. New methods plug in without
touching this file: a module in `cdam_pl/explain/` that defines `REPORT_METHODS = {"name": fn, ...}` is found at
run time (or call `register_method`). Parameters
named `n_samples`, `noise`, `n_steps` are set from the command line when given, `seed` (int) or `generator`
(a torch.Generator seeded at the start of every batch) from `--seed`; every keyword default is recorded.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import html
import importlib
import inspect
import json
import math
import os
import pkgutil
import platform
import re
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from cdam_pl.data import path_text
from cdam_pl.errors import CdamError, ConfigError, DataError

MANIFEST_FORMAT = "cdam-pl-explain/1"
TUNABLE = ("n_samples", "noise", "n_steps")  # parameters the command line sets for every method that takes them
_INPUT_PARAMS = {"cdam", "backbone", "head", "images", "targets", "concepts", "similarity", "generator"}
DISPLAY_Q = 0.01  # quantile clipping of the colour range (display only; ViT grids often have one outlier token)


# ---------------------------------------------------------------------------------------------------------------
# Method registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """An explanation method as explain.py runs it.

    fn: `(cdam, images [B,3,H,W], targets LongTensor [B,K], **params) -> [B, R, h, w]`, or with a first parameter
    named `backbone`: `(backbone, head, images, targets, **params)`. from_explanation: optional shortcut that reads
    the maps from the batch's shared `Explanation` (so vanilla CDAM and attention cost no extra forward).
    """

    name: str
    fn: Callable[..., Tensor]
    class_agnostic: bool = False  # one map per image (R = 1) whatever the targets
    help: str = ""
    from_explanation: Callable[[Any], Tensor] | None = None
    needs_attention: bool = False  # from_explanation reads Explanation.attention

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.fn)

    @property
    def takes_backbone(self) -> bool:
        return next(iter(self.signature.parameters), None) == "backbone"

    @property
    def takes_concepts(self) -> bool:
        return not self.class_agnostic and "concepts" in self.signature.parameters

    def params(self, options: dict[str, Any]) -> dict[str, Any]:
        """Effective parameters: command-line values where given, otherwise the function's keyword defaults."""
        out: dict[str, Any] = {}
        for name, p in self.signature.parameters.items():
            if name in _INPUT_PARAMS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if name == "seed" or (name in TUNABLE and options.get(name) is not None):
                out[name] = options[name]
            elif p.default is not p.empty and (p.default is None or isinstance(p.default, (bool, int, float, str))):
                out[name] = p.default
        if "generator" in self.signature.parameters:
            out["seed"] = options["seed"]
        return out

    def __call__(self, cdam, images: Tensor, targets: Tensor, *, concepts: Tensor | None, similarity: str,
                 options: dict[str, Any]) -> Tensor:
        sig = self.signature.parameters
        kwargs = {k: options[k] for k in (*TUNABLE, "seed") if k in sig and options.get(k) is not None}
        if "generator" in sig:
            kwargs["generator"] = torch.Generator(device=images.device).manual_seed(int(options["seed"]))
        if self.takes_concepts and concepts is not None:
            kwargs["concepts"] = concepts
            if "similarity" in sig:
                kwargs["similarity"] = similarity
        if self.takes_backbone:
            return self.fn(cdam.backbone, cdam.head, images, targets, **kwargs)
        return self.fn(cdam, images, targets, **kwargs)


METHODS: dict[str, Method] = {}
_IMPORT_PROBLEMS: list[str] = []
_DISCOVERED = False


def register_method(name: str, fn: Callable[..., Tensor] | None = None, *, class_agnostic: bool | None = None,
                    help: str | None = None, replace: bool = False):
    """Add a method under `name` (usable as a decorator). See `Method` for the function's signature.

    class_agnostic and help default to the function's `class_agnostic` attribute and its docstring's first line.
    """
    def add(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not re.fullmatch(r"[a-z][a-z0-9_\-]*", name):
            raise ValueError(f"method name {name!r} must be lower-case letters, digits, '-' or '_'")
        if name in METHODS and not replace:
            raise ValueError(f"method {name!r} is already registered")
        doc = (inspect.getdoc(f) or "").strip().splitlines()
        METHODS[name] = Method(name, f, bool(getattr(f, "class_agnostic", False) if class_agnostic is None
                                            else class_agnostic), help if help is not None else (doc[0] if doc else ""))
        return f

    return add(fn) if fn is not None else add


def unregister_method(name: str) -> None:
    METHODS.pop(name, None)


def available_methods() -> dict[str, Method]:
    """Built-in methods, the comparison methods of `cdam_pl.explain.registry`, and every `REPORT_METHODS` found in
    the modules of `cdam_pl.explain` (imported once, on first use)."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        import cdam_pl.explain as pkg

        _add_comparison_methods()

        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            try:
                module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            except ImportError as e:  # an optional dependency is missing: its methods are unavailable
                _IMPORT_PROBLEMS.append(f"{pkg.__name__}.{info.name} ({e})")
                continue
            for name, fn in dict(getattr(module, "REPORT_METHODS", {}) or {}).items():
                if name not in METHODS:  # built-ins keep their names
                    register_method(name, fn)
    return dict(METHODS)


def _class_and_concept_maps(ex) -> Tensor:
    """Explanation -> [B, K+M, gh, gw]: class maps, then concept maps."""
    parts = [m for m in (ex.class_maps, ex.concept_maps) if m is not None]
    return torch.cat(parts, dim=1)


def _cdam(cdam, images, targets, concepts=None, similarity="dot"):
    """Vanilla CDAM: gradient x token at the input of the last attention layer (signed)."""
    return _class_and_concept_maps(cdam.explain(images, targets=targets, concepts=concepts, similarity=similarity))


def _smooth(cdam, images, targets, concepts=None, similarity="dot", n_samples=50, noise=0.05, generator=None):
    """Smooth CDAM: mean CDAM over noisy copies of the last block's input (sigma = noise * range)."""
    ex = cdam.explain(images, targets=targets, concepts=concepts, similarity=similarity, variant="smooth",
                      n_samples=n_samples, noise=noise, generator=generator)
    return _class_and_concept_maps(ex)


def _integrated(cdam, images, targets, concepts=None, similarity="dot", n_steps=50, noise=0.0, generator=None):
    """Integrated CDAM: mean CDAM along the path 0 -> last block input (k/n_steps, k = 1..n_steps-1)."""
    ex = cdam.explain(images, targets=targets, concepts=concepts, similarity=similarity, variant="integrated",
                      n_steps=n_steps, noise=noise, generator=generator)
    return _class_and_concept_maps(ex)


def _head_mean_attention(ex) -> Tensor:
    return ex.attention.mean(dim=1, keepdim=True)  # [B, heads, gh, gw] -> [B, 1, gh, gw]


def _attention(cdam, images, targets):
    """Attention map: last block, CLS query -> each patch, mean over heads (class-agnostic)."""
    return _head_mean_attention(cdam.explain(images, attention=True))


METHODS.update({
    "cdam": Method("cdam", _cdam, help="vanilla CDAM (signed gradient x token at the last attention layer's input)",
                   from_explanation=_class_and_concept_maps),
    "smooth": Method("smooth", _smooth, help="Smooth CDAM (mean over --n-samples noisy copies; --noise, --seed)"),
    "integrated": Method("integrated", _integrated, help="Integrated CDAM (mean over --n-steps scaled inputs)"),
    "attention": Method("attention", _attention, class_agnostic=True, help="last-layer CLS attention, head mean "
                        "(class-agnostic: one map per image)", from_explanation=_head_mean_attention,
                        needs_attention=True),
})


# The comparison methods (RP, TAM, captum's IG/SmoothGrad/IxG) come from the one method registry the benchmark uses;
# its names for the engine's own methods are accepted as aliases of the shortcuts above.
ALIASES = {"smooth_cdam": "smooth", "integrated_cdam": "integrated", "am": "attention"}


def _add_comparison_methods() -> None:
    from cdam_pl.explain import registry

    for m in registry.METHODS.values():
        if m.name not in METHODS and m.name not in ALIASES:
            METHODS[m.name] = Method(m.name, m.fn, class_agnostic=not m.class_specific,
                                     help=f"{m.label}: {m.description}")


def parse_methods(spec: str | Sequence[str]) -> list[Method]:
    names = [n.strip().lower() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    names = [ALIASES.get(n.replace("-", "_"), n) for n in names]
    if not names:
        raise ConfigError("--methods is empty; give e.g. --methods cdam,attention")
    known = available_methods()
    unknown = [n for n in names if n not in known]
    if unknown:
        note = f" (not importable: {'; '.join(_IMPORT_PROBLEMS)})" if _IMPORT_PROBLEMS else ""
        raise ConfigError(f"unknown method {unknown[0]!r}; available: {', '.join(known)}{note}")
    return [known[n] for n in dict.fromkeys(names)]


# ---------------------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    """Which classes to explain: the top-n logits, or fixed class indices."""

    text: str
    top: int | None = None  # top-n by logit (pred = top-1)
    indices: tuple[int, ...] = ()

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [B, C] -> class indices [B, K]."""
        if self.top is not None:
            return logits.topk(self.top, dim=1).indices
        return torch.tensor(self.indices, dtype=torch.long, device=logits.device).expand(logits.shape[0], -1)


def _list_names(names: Sequence[str], limit: int = 100) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} classes in all)" if len(names) > limit else "")


def default_targets(classes: Sequence[str]) -> str:
    """What --targets means when not given: the top 3 classes, or all of them for a head with fewer."""
    return f"top{min(3, len(classes))}"


def parse_targets(spec: str, classes: Sequence[str]) -> TargetSpec:
    """`topN`, `pred` or comma-separated class names (case-insensitive; exact spelling wins over case-folding)."""
    text = spec.strip()
    exact = {c: i for i, c in enumerate(classes)}
    folded: dict[str, int] = {}
    for i, c in enumerate(classes):
        folded.setdefault(c.casefold(), i)
    m = re.fullmatch(r"top(\d+)", text.lower())
    if text.lower() == "pred" and text not in exact:
        return TargetSpec(text, top=1)
    if m and text not in exact and text.casefold() not in folded:
        n = int(m.group(1))
        if not 1 <= n <= len(classes):
            raise ConfigError(f"--targets {text}: the head has {len(classes)} classes; use top1..top{len(classes)}")
        return TargetSpec(text, top=n)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--targets is empty; use top3, pred or class names separated by commas")
    idx = []
    for name in names:
        i = exact.get(name, folded.get(name.casefold()))
        if i is None:
            close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown class {name!r}{hint}; valid classes: {_list_names(list(classes))}")
        idx.append(i)
    return TargetSpec(text, indices=tuple(dict.fromkeys(idx)))


# ---------------------------------------------------------------------------------------------------------------
# Image sizes, loading and batching
# ---------------------------------------------------------------------------------------------------------------


def keep_aspect_size(height: int, width: int, area: float, patch: int) -> tuple[int, int]:
    """(H, W) with the image's aspect ratio and about `area` pixels, each side a multiple of `patch` (>= patch)."""
    ratio = width / height
    h = math.sqrt(area / ratio)
    w = h * ratio
    return max(1, round(h / patch)) * patch, max(1, round(w / patch)) * patch


def check_img_size(size: Sequence[int], patch: int) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ConfigError(f"--img-size must be positive, got {h} {w}")
    if h % patch or w % patch:
        fix = lambda s: max(patch, round(s / patch) * patch)  # noqa: E731
        raise ConfigError(f"--img-size {h} {w} is not a multiple of the patch size {patch}; "
                          f"try --img-size {fix(h)} {fix(w)}")
    return h, w


def _displayed_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image as shown (EXIF orientation applied), from its header only."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():  # a decompression bomb raises here (and is skipped) instead of printing a warning
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


@dataclass
class _Item:
    index: int  # position in the sorted input list: the key prefix in maps.npz
    path: Path
    size: tuple[int, int]  # model input (H, W)


class _Sizer:
    """Input size of each image: fixed (checkpoint's or --img-size), or aspect-kept around the default area."""

    def __init__(self, default: tuple[int, int], patch: int, fixed: tuple[int, int] | None, keep_aspect: bool):
        self.default, self.patch, self.fixed, self.keep_aspect = default, patch, fixed, keep_aspect

    def __call__(self, path: Path) -> tuple[int, int]:
        if not self.keep_aspect:
            return self.fixed or self.default
        h, w = _displayed_size(path)
        return keep_aspect_size(h, w, self.default[0] * self.default[1], self.patch)

    def describe(self) -> dict[str, Any]:
        if self.keep_aspect:
            return {"mode": "keep-aspect", "area_of": list(self.default), "multiple_of": self.patch}
        return {"mode": "fixed" if self.fixed else "checkpoint", "size": list(self.fixed or self.default)}


class _Loader:
    """load_image (RGB, EXIF, modes converted) + the backbone's eval transform at an item's size -> [3, H, W]."""

    def __init__(self, mean, std, interpolation):
        from cdam_pl.data import build_transform

        self._build = lambda size: build_transform(size, mean, std, interpolation)
        self._transforms: dict[tuple[int, int], Any] = {}

    def __call__(self, path: Path, size: tuple[int, int]) -> tuple[Tensor | None, tuple[int, int] | None, str | None]:
        from cdam_pl.data import load_image

        try:
            img = load_image(path)
        except DataError as e:
            return None, None, str(e)
        if size not in self._transforms:
            self._transforms[size] = self._build(size)
        return self._transforms[size](img), (img.height, img.width), None


def _batches(items: list[_Item], batch_size: int) -> list[list[_Item]]:
    """Batches of equal input size: images grouped by size (groups in order of first appearance)."""
    groups: dict[tuple[int, int], list[_Item]] = {}
    for it in items:
        groups.setdefault(it.size, []).append(it)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _prefetched(batches: list[list[_Item]], load: _Loader, workers: int) -> Iterator[tuple[list[_Item], list]]:
    """Yield (batch, [(tensor|None, original size, error)]) while the next batch loads in worker threads."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        submit = lambda b: [pool.submit(load, it.path, it.size) for it in b]  # noqa: E731
        pending = submit(batches[0]) if batches else []
        for j, batch in enumerate(batches):
            current = pending
            pending = submit(batches[j + 1]) if j + 1 < len(batches) else []
            yield batch, [f.result() for f in current]


# ---------------------------------------------------------------------------------------------------------------
# Concepts
# ---------------------------------------------------------------------------------------------------------------


def parse_concepts(specs: Iterable[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder.strip():
            raise ConfigError(f"--concept {spec!r} is not NAME=DIR (e.g. --concept stripes=examples/stripes)")
        if name in out:
            raise ConfigError(f"--concept {name!r} is given twice; use one folder per concept name")
        path = Path(folder.strip()).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--concept {name}: folder {folder.strip()!r} not found; give a folder of example images")
        out[name] = path
    return out


def build_concepts(folders: dict[str, Path], backbone, sizer: _Sizer, load: _Loader, device, batch_size: int,
                   warn: Callable[[str], None]) -> tuple[list[str], Tensor | None, list[dict[str, Any]]]:
    """Concept vectors [M, D] (mean embedding of each folder's readable images) and what went into them."""
    from cdam_pl.data import list_images
    from cdam_pl.explain import concept_vectors

    if not folders:
        return [], None, []
    examples, info = {}, []
    for name, folder in folders.items():
        try:
            paths = list_images(folder)
        except DataError:
            raise DataError(f"--concept {name}: no images in {folder}; add example images of the concept") from None
        tensors, skipped = [], []
        for p in paths:
            try:
                size = sizer(p)
            except Exception:
                size = sizer.fixed or sizer.default
            x, _, err = load(p, size)
            if err:
                warn(f"skipped concept example {path_text(p)}: {err}")
                skipped.append({"path": path_text(p), "reason": err})
            else:
                tensors.append(x.to(device))
        if not tensors:
            raise DataError(f"--concept {name}: none of the {len(paths)} images in {folder} could be read")
        examples[name] = tensors
        info.append({"name": name, "folder": path_text(folder), "images": len(tensors), "skipped": skipped})
    names, vectors = concept_vectors(backbone, examples, batch_size=batch_size)
    return names, vectors, info


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")[:60] or "image"


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def render_panel(image: np.ndarray, rows: list[tuple[str, list[np.ndarray], list[str]]], suptitle: str) -> np.ndarray:
    """One picture per image, a row per method (and one per method for concepts): the image, then an overlay per
    map, one colour bar per row. The maps of a row share their colour range, so the targets of a method compare
    directly."""
    from cdam_pl import viz

    pics = [viz.panel(image, maps, titles, suptitle=suptitle if r == 0 else None, vmax="shared", q=DISPLAY_Q,
                      image_title=label) for r, (label, maps, titles) in enumerate(rows)]
    width = max(p.shape[1] for p in pics)
    pics = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pics]
    return np.concatenate(pics, axis=0)  # [sum of heights, W, 3]


def _save_panel(image: np.ndarray, rows, suptitle: str, path: Path) -> None:
    from cdam_pl import viz

    viz.save_png(render_panel(image, rows, suptitle), path)


def default_render_processes(n_images: int, cpus: int | None = None) -> int:
    """Drawing processes for a run: none for small runs or machines with fewer than 4 CPUs (there they compete
    with the model's threads: 64 photos on 2 cores took 8.7 s with 2 processes, 7.0 s drawing inline), else one
    per two CPUs, at most 8."""
    cpus = cpus or os.cpu_count() or 1
    return 0 if n_images < 16 or cpus < 4 else min(8, cpus // 2)


def _init_render_worker() -> None:
    """A drawing process: one torch thread (many processes x many threads would thrash), matplotlib loaded."""
    torch.set_num_threads(1)
    import matplotlib.figure  # noqa: F401

    from cdam_pl import viz  # noqa: F401


def _ready() -> None:
    """Submitted once per process at start-up, so the processes start while the model loads."""


class _PanelWriter:
    """Renders and saves panels, in worker processes for larger runs (drawing with matplotlib, not the model, is
    then the bottleneck); at most a few panels wait at a time, so memory stays bounded."""

    def __init__(self, processes: int):
        self.pool = None
        self.pending: list = []
        self.limit = 4 * max(1, processes)
        if processes > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            import matplotlib.font_manager  # noqa: F401  (builds matplotlib's font cache once, not once per process)

            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_render_worker)
            self.pending = [self.pool.submit(_ready) for _ in range(processes)]

    def submit(self, image: np.ndarray, rows, suptitle: str, path: Path) -> None:
        if self.pool is None:
            _save_panel(image, rows, suptitle, path)
            return
        self.pending.append(self.pool.submit(_save_panel, image, rows, suptitle, path))
        while len(self.pending) > self.limit:
            self.pending.pop(0).result()

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                for f in self.pending:
                    f.result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=wait, cancel_futures=not wait)


class _Results:
    """Everything a run keeps per image: its rows of maps.npz, its panel (unless panels is None), its manifest
    entry."""

    def __init__(self, out: Path, classes: list[str], concept_names: list[str], similarity: str,
                 methods: list[Method], params: dict[str, dict], backbone, n_inputs: int,
                 panels: _PanelWriter | None):
        self.out, self.classes, self.concept_names, self.similarity = out, classes, concept_names, similarity
        self.methods, self.params, self.panels = methods, params, panels
        self.dc = backbone.data_config
        self.grid_size = backbone.grid_size
        self.width = max(4, len(str(n_inputs)))
        self.arrays: dict[str, np.ndarray] = {}
        self.records: list[dict[str, Any]] = []

    def add_batch(self, items: list[tuple[_Item, tuple[int, int]]], images: Tensor, logits: Tensor, idx: Tensor,
                  scores: Tensor | None, maps: dict[str, np.ndarray]) -> None:
        """items: (item, original size) per image; images [B,3,H,W]; logits [B,C]; idx [B,K]; scores [B,M];
        maps: method -> [B, R, h, w]."""
        logits = logits.float().cpu()
        probs = logits.softmax(dim=1).numpy()
        logits = logits.numpy()
        idx = idx.cpu().numpy()
        scores = None if scores is None else scores.float().cpu().numpy()
        images = images.cpu()
        for b, (it, orig) in enumerate(items):
            self._add(it, orig, images[b], logits[b], probs[b], idx[b], None if scores is None else scores[b],
                      {name: m[b] for name, m in maps.items()})

    def _add(self, it: _Item, orig, image: Tensor, logits, probs, idx, scores, maps) -> None:
        i, classes = it.index, self.classes
        pred = int(logits.argmax())
        targets = [{"class": classes[c], "index": int(c), "logit": float(logits[c]), "probability": float(probs[c])}
                   for c in idx]
        concepts = [] if scores is None else [{"name": n, "score": float(s)}
                                              for n, s in zip(self.concept_names, scores)]
        self.arrays[f"{i}/logits"] = logits.astype(np.float32)
        self.arrays[f"{i}/targets"] = idx.astype(np.int64)
        if scores is not None:
            self.arrays[f"{i}/concept_scores"] = scores.astype(np.float32)

        rows, map_info = [], {}
        for m in self.methods:
            grid = np.ascontiguousarray(maps[m.name], dtype=np.float32)  # [R, h, w]
            if m.class_agnostic:
                labels = ["image"]
                rows.append((m.name, list(grid), ["class-agnostic"]))
            else:
                labels = [f"class:{t['class']}" for t in targets]
                rows.append((m.name, list(grid[:len(targets)]),
                             [f"{t['class']}\nlogit {_fmt(t['logit'])}, p {t['probability']:.2f}" for t in targets]))
                if m.takes_concepts and concepts:  # own row and colour range: similarities have another scale
                    labels += [f"concept:{c['name']}" for c in concepts]
                    rows.append((f"{m.name}: concepts", list(grid[len(targets):]),
                                 [f"concept {c['name']}\n{self.similarity} {_fmt(c['score'])}" for c in concepts]))
            key = f"{i}/{m.name}"
            self.arrays[key] = grid
            self.arrays[f"{key}/rows"] = np.array(labels)
            map_info[m.name] = {"key": key, "shape": list(grid.shape), "rows": labels, "params": self.params[m.name]}

        rel = None
        if self.panels is not None:
            rel = f"panels/{i:0{self.width}d}_{_safe_stem(it.path)}.png"
            picture = _to_display(image, self.dc)  # what the model saw, [H, W, 3] uint8
            self.panels.submit(picture, rows, f"{path_text(it.path.name)}: predicted {classes[pred]} "
                                              f"(p {probs[pred]:.2f})",
                               self.out / rel)
        self.records.append({
            "index": i, "path": path_text(it.path), "name": path_text(it.path.name), "panel": rel,
            "original_size": list(orig), "input_size": list(it.size), "grid": list(self.grid_size(*it.size)),
            "prediction": {"class": classes[pred], "index": pred, "logit": float(logits[pred]),
                           "probability": float(probs[pred])},
            "targets": targets, "concepts": concepts, "maps": map_info,
        })


def _to_display(image: Tensor, dc: dict[str, Any]) -> np.ndarray:
    from cdam_pl import viz

    return viz.to_uint8_image(image, mean=dc["mean"], std=dc["std"])


def _gallery_html(manifest: dict[str, Any]) -> str:
    """Static gallery: relative links to the panels, inline CSS, no external assets."""
    e = html.escape
    ck, bb = manifest["checkpoint"], manifest["backbone"]
    methods = ", ".join(m["name"] for m in manifest["methods"])
    figures = []
    for im in manifest["images"]:
        src = urllib.parse.quote(im["panel"])
        pred = im["prediction"]
        figures.append(
            f'<figure id="image-{im["index"]}"><a href="{src}"><img src="{src}" alt="{e(im["name"])}" '
            f'loading="lazy"></a><figcaption><b>{e(im["name"])}</b> &middot; predicted {e(pred["class"])} '
            f'(p {pred["probability"]:.2f}) &middot; <code>{e(im["path"])}</code></figcaption></figure>')
    skipped = "".join(f"<li><code>{e(s['path'])}</code>: {e(s['reason'])}</li>" for s in manifest["skipped"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CDAM explanations: {e(Path(ck["path"]).name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
figure {{ margin: 0 0 2em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.9em; margin-top: 0.3em; }} code {{ color: #555; }}
</style></head>
<body>
<h1>CDAM explanations</h1>
<p>checkpoint <code>{e(ck["path"])}</code> &middot; backbone {e(bb["name"])} ({e(str(bb["weights"]))})
&middot; methods {e(methods)} &middot; targets {e(manifest["targets"])}
&middot; {len(manifest["images"])} images explained, {len(manifest["skipped"])} skipped.
Red = evidence for the target, blue = against it; the maps of a row share one colour bar.
Raw maps: <a href="{e(manifest["maps"]["file"])}">{e(manifest["maps"]["file"])}</a>,
details: <a href="manifest.json">manifest.json</a>.</p>
{chr(10).join(figures)}
{f"<h2>Skipped</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("cdam-pl", "torch", "torchvision", "timm", "numpy", "pillow", "matplotlib", "lightning"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "source checkout (not pip-installed)" if dist == "cdam-pl" else "not installed"
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MAPS_LAYOUT = {
    "images": "str [N]: path of every explained image, in index order",
    "index": "int64 [N]: each image's index i (its position in the sorted input list; unreadable images leave gaps)",
    "classes": "str [C]: the head's class names",
    "concepts": "str [M]: concept names",
    "methods": "str [#methods]",
    "{i}/logits": "float32 [C]: raw head outputs of image i",
    "{i}/targets": "int64 [K]: class indices explained for image i",
    "{i}/concept_scores": "float32 [M]: similarity of image i to each concept (when concepts are given)",
    "{i}/{method}": "float32 [R, gh, gw]: signed token scores of image i (stored unclipped)",
    "{i}/{method}/rows": "str [R]: what each row explains: 'class:NAME', 'concept:NAME' or 'image' (class-agnostic)",
}


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    out_dir: Path
    explained: int
    skipped: list[dict[str, Any]]
    seconds: float
    images_per_second: float
    methods: list[str]
    files: dict[str, Path] = field(default_factory=dict)


def resolve_device(name: str | None) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"--device {name!r}: use cpu or cuda (or cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                              f"CUDA build {torch.version.cuda or 'none'}, no GPU visible); use --device cpu")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(name)


def _prepare_out(out_dir: Path, panels: bool) -> None:
    try:
        (out_dir / "panels" if panels else out_dir).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out {out_dir}: exists and is not a folder; choose another output folder") from None
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create it ({e.strerror}); choose another output folder") from None


def _check_shape(maps: Any, method: Method, b: int, rows: int) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 4 or maps.shape[0] != b or maps.shape[1] != rows:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise RuntimeError(f"method {method.name!r} returned {shape}; expected [B={b}, R={rows}, h, w]")


def _check_options(batch_size, similarity, img_size, keep_aspect, n_samples, n_steps, noise) -> None:
    from cdam_pl.explain.cdam import SIMILARITIES

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if similarity not in SIMILARITIES:
        raise ConfigError(f"--similarity {similarity!r}: choose one of {', '.join(SIMILARITIES)}")
    if img_size is not None and keep_aspect:
        raise ConfigError("--img-size and --keep-aspect exclude each other; pick one")
    for name, value, low in (("--n-samples", n_samples, 1), ("--n-steps", n_steps, 2)):
        if value is not None and value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if noise is not None and not (noise >= 0 and math.isfinite(noise)):
        raise ConfigError(f"--noise must be >= 0, got {noise}")


def _outside(paths: list[Path], out: Path) -> list[Path]:
    """Drop files inside the output folder (a rerun on '.' must not explain the last run's panels)."""
    root = out.resolve()
    kept = [p for p in paths if root not in p.resolve().parents]
    if not kept:
        raise DataError(f"all {len(paths)} input images lie inside the output folder {out}; "
                        "point INPUT elsewhere or choose another --out")
    return kept


def _plan(paths: list[Path], sizer: _Sizer, load: _Loader, warn) -> tuple[list[_Item], list[dict[str, Any]]]:
    """Every image's input size, from its header only; images whose header cannot be read are skipped here
    (other failures surface when the batch loads)."""
    items, skipped = [], []
    for i, p in enumerate(paths):
        try:
            items.append(_Item(i, p, sizer(p)))
        except Exception:
            _, _, err = load(p, sizer.default)
            if err is None:  # the header reader failed but the image loads: use the fixed size
                items.append(_Item(i, p, sizer.fixed or sizer.default))
                continue
            warn(f"skipped: {err}")
            skipped.append({"index": i, "path": path_text(p), "reason": err})
    return items, skipped


def explain_to_dir(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike = "explanations",
    *,
    targets: str | None = None,
    methods: str | Sequence[str] = "cdam",
    concepts: Iterable[str] = (),
    similarity: str = "dot",
    img_size: Sequence[int] | None = None,
    keep_aspect: bool = False,
    batch_size: int = 16,
    device: str | None = None,
    weights: str | None = None,
    n_samples: int | None = None,
    noise: float | None = None,
    n_steps: int | None = None,
    seed: int = 0,
    panels: bool = True,
    workers: int | None = None,
    render_processes: int | None = 0,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> RunSummary:
    """Explain every image under `inputs` with the checkpoint's head; write panels/, maps.npz, manifest.json and
    index.html into out_dir (panels=False: maps.npz and manifest.json only). Unreadable images are skipped
    (warned, listed); the run fails only if none can be explained.

    workers: threads that read images. render_processes: processes that draw the panels; 0 draws them in this
    process; None picks none for fewer than 16 images or fewer than 4 CPUs, else one per two CPUs (at most 8), as
    explain.py does. Worker
    processes are spawned, so a calling script needs the `if __name__ == "__main__":` guard.
    """
    from tqdm.auto import tqdm

    from cdam_pl.checkpoint import load_checkpoint
    from cdam_pl.data import list_images

    t_start = time.perf_counter()
    bar_file = sys.stderr
    warn = warn or (lambda msg: tqdm.write(f"warning: {msg}", file=bar_file))
    _check_options(batch_size, similarity, img_size, keep_aspect, n_samples, n_steps, noise)
    chosen = parse_methods(methods)
    concept_folders = parse_concepts(concepts)
    dev = resolve_device(device)
    out = Path(out_dir)
    paths = _outside(list_images([os.fspath(p) for p in inputs]), out)
    if render_processes is None:
        render_processes = default_render_processes(len(paths))
    render_processes = render_processes if panels else 0
    writer = _PanelWriter(render_processes) if panels else None  # its processes start while the model loads
    finished = False
    try:
        model = load_checkpoint(checkpoint, weights=weights, device=dev)
        backbone, classes = model.backbone, model.classes
        spec = parse_targets(targets or default_targets(classes), classes)
        patch = backbone.patch_size
        sizer = _Sizer(tuple(backbone.img_size), patch, check_img_size(img_size, patch) if img_size else None,
                       keep_aspect)
        _prepare_out(out, panels)
        dc = backbone.data_config
        load = _Loader(dc["mean"], dc["std"], dc["interpolation"])
        concept_names, vectors, concept_info = build_concepts(concept_folders, backbone, sizer, load, dev,
                                                              batch_size, warn)
        options = {"n_samples": n_samples, "noise": noise, "n_steps": n_steps, "seed": int(seed)}
        params = {m.name: m.params(options) for m in chosen}
        items, skipped = _plan(paths, sizer, load, warn)
        results = _Results(out, classes, concept_names, similarity, chosen, params, backbone, len(paths), writer)
        run = _BatchRunner(model, chosen, spec, vectors, similarity, options)
        t_loop = time.perf_counter()
        with tqdm(total=len(items), unit="img", desc="explaining", file=bar_file,
                  disable=not progress or not bar_file.isatty(), dynamic_ncols=True) as bar:
            batches = _batches(items, batch_size)
            for batch, loaded in _prefetched(batches, load, workers or min(4, os.cpu_count() or 1)):
                good = []
                for it, (x, orig, err) in zip(batch, loaded):
                    if err is None:
                        good.append((it, x, orig))
                        continue
                    warn(f"skipped: {err}")
                    skipped.append({"index": it.index, "path": path_text(it.path), "reason": err})
                    bar.update(1)
                if good:
                    x = torch.stack([g[1] for g in good]).to(dev)  # [B, 3, H, W]
                    results.add_batch([(g[0], g[2]) for g in good], x, *run(x))
                    bar.update(len(good))
            if writer is not None:
                writer.close()
        finished = True
    finally:
        if writer is not None and not finished:
            writer.close(wait=False)
    seconds = time.perf_counter() - t_loop

    records = sorted(results.records, key=lambda r: r["index"])
    skipped.sort(key=lambda s: s["index"])
    if not records:
        first = skipped[0]["reason"] if skipped else "no inputs"
        raise DataError(f"no image could be explained: all {len(skipped)} inputs are unreadable (first: {first})")
    rate = len(records) / max(seconds, 1e-9)
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": path_text(Path(checkpoint).resolve()), "sha256": _sha256_file(Path(checkpoint)),
                       "classes": list(classes), "head": model.meta.get("head")},
        "backbone": {**backbone.identity, "patch_size": patch, "num_prefix_tokens": backbone.num_prefix_tokens,
                     "embed_dim": backbone.embed_dim, "num_heads": backbone.num_heads, "data_config": dc},
        "image_size": sizer.describe(),
        "device": str(dev),
        "targets": spec.text,
        "concepts": concept_info,
        "similarity": similarity,
        "methods": [{"name": m.name, "description": m.help, "params": params[m.name],
                     "rows": "one per image" if m.class_agnostic else
                     ("targets, then concepts" if m.takes_concepts else "targets")} for m in chosen],
        "maps": {"file": "maps.npz", "layout": MAPS_LAYOUT},
        "images": records,
        "skipped": skipped,
        "timing": {"seconds": round(seconds, 3), "images_per_second": round(rate, 3),
                   "total_seconds": round(time.perf_counter() - t_start, 3), "batch_size": batch_size,
                   "render_processes": render_processes},
        "versions": _versions(),
    }
    files = _write_outputs(out, results.arrays, records, classes, concept_names, chosen, manifest, panels)
    return RunSummary(out, len(records), skipped, seconds, rate, [m.name for m in chosen], files)


class _BatchRunner:
    """All requested maps of one batch: ONE `CDAM.explain` forward yields vanilla CDAM for the class targets and
    the concepts, the attention map, the logits and the targets; every other method is then called with those
    targets."""

    def __init__(self, model, methods: list[Method], spec: TargetSpec, vectors: Tensor | None, similarity: str,
                 options: dict[str, Any]):
        from cdam_pl.explain import CDAM

        self.cdam = CDAM(model.backbone, model.head)
        self.methods, self.spec, self.vectors, self.similarity, self.options = methods, spec, vectors, similarity, \
            options
        self.n_concepts = 0 if vectors is None else vectors.shape[0]
        self.vanilla = any(m.from_explanation is not None and not m.class_agnostic for m in methods)
        self.attention = any(m.needs_attention for m in methods)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, dict[str, np.ndarray]]:
        """x [B,3,H,W] -> (logits [B,C], targets [B,K], concept scores [B,M] or None, method -> [B,R,h,w])."""
        from cdam_pl.explain.cdam import concept_scores

        ex = self.cdam.explain(x, targets=self.spec if self.vanilla else None,
                               concepts=self.vectors if self.vanilla else None, similarity=self.similarity,
                               attention=self.attention)
        idx = ex.targets if ex.targets is not None else self.spec(ex.logits)  # [B, K]
        scores = None
        if self.vectors is not None:
            scores = ex.concept_scores if ex.concept_scores is not None else \
                concept_scores(ex.embeddings, self.vectors, self.similarity)
        maps = {}
        for m in self.methods:
            rows = 1 if m.class_agnostic else idx.shape[1] + (self.n_concepts if m.takes_concepts else 0)
            mp = m.from_explanation(ex) if m.from_explanation is not None else \
                m(self.cdam, x, idx, concepts=self.vectors, similarity=self.similarity, options=self.options)
            _check_shape(mp, m, x.shape[0], rows)
            maps[m.name] = mp.detach().float().cpu().numpy()
        return ex.logits, idx, scores, maps


def _write_outputs(out: Path, arrays: dict[str, np.ndarray], records, classes, concept_names, methods, manifest,
                   panels: bool) -> dict[str, Path]:
    """maps.npz, manifest.json and (with panels) index.html, each written atomically."""
    from cdam_pl.io import atomic_write, atomic_write_text

    arrays = {**arrays,
              "images": np.array([r["path"] for r in records]),
              "index": np.array([r["index"] for r in records], dtype=np.int64),
              "classes": np.array(classes),
              "concepts": np.array(concept_names, dtype=str),
              "methods": np.array([m.name for m in methods])}
    files = {"maps": atomic_write(out / "maps.npz", lambda f: np.savez(f, **arrays)),
             "manifest": atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")}
    if panels:
        files["index"] = atomic_write_text(out / "index.html", _gallery_html(manifest))
        files["panels"] = out / "panels"
    return files


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Explain a trained head's decisions on any images with class-discriminative attention maps (CDAM).

Point it at a checkpoint written by train.py and at images (files, folders searched recursively, or globs).
For every image it writes a PNG panel (the image, then one overlay per target and method, titled with the class
or concept, logit and probability, each with a diverging colour bar: red = evidence for, blue = against), the raw
signed token scores of the whole run in one maps.npz, a manifest.json (checkpoint, backbone, image sizes, per image
the targets, logits, probabilities, methods and their parameters, package versions) and index.html, a gallery that
opens offline in a browser. Unreadable images are skipped with a warning and listed in the manifest."""

EPILOG = """\
examples:
  python explain.py runs/demo/version_0/checkpoints/last.ckpt photos/ --out explained
  python explain.py last.ckpt 'shots/**/*.jpg' --targets pred --methods cdam,attention --keep-aspect
  python explain.py last.ckpt cat.jpg --targets cat,dog --methods cdam,smooth,integrated --n-samples 20
  python explain.py last.ckpt imgs/ --concept stripes=examples/stripes --concept fur=examples/fur --similarity cosine
  python explain.py last.ckpt imgs/ --img-size 224 336 --batch-size 32 --device cuda

methods:
{methods}

maps.npz layout (numpy.load(path); no pickles):
{layout}
  rows of a method: the K targets (in --targets order, or by logit for topN), then the M concepts for methods that
  explain concepts; class-agnostic methods have a single row.

exit status: 0 on success, 2 for a user error (one line on stderr), 130 when interrupted."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other user error, instead of usage + message
        raise ConfigError(f"{message}; see explain.py --help")


def build_parser() -> argparse.ArgumentParser:
    known = available_methods()
    width = max(len(n) for n in known) + 2
    epilog = EPILOG.format(
        methods="\n".join(f"  {n:<{width}}{m.help}" for n, m in known.items()),
        layout="\n".join(f"  {k:<20}{v}" for k, v in MAPS_LAYOUT.items()),
    )
    p = _Parser(prog="explain.py", description=DESCRIPTION, epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .ckpt written by train.py (read with weights_only=True)")
    p.add_argument("inputs", metavar="INPUT", nargs="*", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--serve", action="store_true",
                   help="instead of writing files, start the local web demo on 127.0.0.1 (see cdam_pl.app)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port of the web demo (with --serve)")
    p.add_argument("--targets", default=None, metavar="SPEC",
                   help="what to explain: topN (the N highest logits; default top3, or every class of a head with "
                        "fewer), pred (the predicted "
                        "class), or class names separated by commas (case-insensitive), e.g. cat,dog")
    p.add_argument("--concept", action="append", default=[], metavar="NAME=DIR",
                   help="a concept given by a folder of example images (its vector is their mean embedding); "
                        "shown as extra maps of the methods that explain concepts. Repeat for several concepts")
    p.add_argument("--similarity", choices=("dot", "cosine"), default="dot",
                   help="similarity of an image to a concept vector (default: dot, as in the paper)")
    p.add_argument("--methods", default="cdam", metavar="LIST",
                   help=f"comma-separated methods (default: cdam); available: {', '.join(known)}")
    p.add_argument("--out", default="explanations", metavar="DIR",
                   help="output folder for panels/, maps.npz, manifest.json, index.html (default: explanations)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--img-size", nargs=2, type=int, metavar=("H", "W"),
                      help="resize every image to H x W (multiples of the patch size); default: the image size "
                           "the head was trained at")
    size.add_argument("--keep-aspect", action="store_true",
                      help="keep each image's aspect ratio: about the training image area, each side rounded to a "
                           "multiple of the patch size (the patch grid follows the image)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="images per forward pass (images of different sizes never share a batch; default: 16)")
    p.add_argument("--device", default=None, metavar="cpu|cuda",
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="backbone weights file, if it moved since training (its sha256 must match the checkpoint)")
    p.add_argument("--n-samples", type=int, default=None, metavar="N",
                   help="noisy samples for smooth (and other sampling methods); default: each method's own (50)")
    p.add_argument("--noise", type=float, default=None, metavar="LAMBDA",
                   help="noise scale as a fraction of the input's range; default: each method's own "
                        "(smooth 0.05, integrated 0)")
    p.add_argument("--n-steps", type=int, default=None, metavar="N",
                   help="path steps for integrated (and other path methods); default: each method's own (50)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise of sampling methods, re-applied at the start of every batch (default: 0)")
    p.add_argument("--no-panels", action="store_true",
                   help="write maps.npz and manifest.json only (no PNGs, no gallery): drawing the panels takes "
                        "far longer than computing the maps")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads that read and resize images (default: min(4, CPUs))")
    p.add_argument("--render-processes", type=int, default=None, metavar="N",
                   help="processes that draw the PNG panels (default: none below 16 images or 4 CPUs, else one "
                        "per two CPUs, at most 8)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The explain.py command line; returns the exit status (2 with one line on stderr for user errors)."""
    from cdam_pl.cli import run_cli

    def run() -> int:
        args = build_parser().parse_args(argv)
        if args.serve:
            from cdam_pl.app import serve

            return serve(args.checkpoint, args.port, weights=args.weights, device=args.device or "cpu")
        if not args.inputs:
            raise CdamError("no INPUT given: name image files, folders or globs (or use --serve for the web demo)")
        summary = explain_to_dir(
            args.checkpoint, args.inputs, args.out, targets=args.targets, methods=args.methods,
            concepts=args.concept, similarity=args.similarity, img_size=args.img_size, keep_aspect=args.keep_aspect,
            batch_size=args.batch_size, device=args.device, weights=args.weights, n_samples=args.n_samples,
            noise=args.noise, n_steps=args.n_steps, seed=args.seed, panels=not args.no_panels, workers=args.workers,
            render_processes=args.render_processes, progress=not args.quiet)
        if not args.quiet:
            skipped = f", {len(summary.skipped)} skipped" if summary.skipped else ""
            print(f"explained {summary.explained} images{skipped} with {', '.join(summary.methods)} in "
                  f"{summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s)")
            if "index" in summary.files:
                print(f"gallery:  {summary.files['index']}")
            print(f"maps:     {summary.files['maps']}\nmanifest: {summary.files['manifest']}")
        return 0

    return run_cli(run)
