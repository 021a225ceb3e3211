"""explain.py's outputs: a PNG panel per image (drawn in worker processes for larger runs), each shard's tensors
and manifest entries (through `cdam_pl.store`), then the manifest and a static gallery, written as streams from
the stored shards so that memory does not grow with the number of images; each file written atomically."""
from __future__ import annotations

import html
import json
import multiprocessing
import os
import platform
import re
import urllib.parse
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, TextIO

import matplotlib.font_manager  # noqa: F401  (builds matplotlib's font cache once, before worker processes start)
import numpy as np
import torch
from torch import Tensor

from cdam_pl.data.images import path_text
from cdam_pl.errors import ConfigError
from cdam_pl.explain.registry import Method
from cdam_pl.io import atomic_write
from cdam_pl.report.inputs import Item
from cdam_pl.viz.figures import panel
from cdam_pl.viz.maps import DISPLAY_Q, save_png, to_uint8_image

# Most targets a panel draws (the highest logits among them); maps/ and the manifest keep every target.
PANEL_TARGETS = 10


def safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")[:60] or "image"


def fmt_number(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def render_panel(image: np.ndarray, rows: list[tuple[str, list[np.ndarray], list[str]]], suptitle: str) -> np.ndarray:
    """One picture per image, a row per method (and one per method for concepts): the image, then an overlay per
    map, one colour bar per row. The maps of a row share their colour range, so the targets of a method compare
    directly."""
    pics = [panel(image, maps, titles, suptitle=suptitle if r == 0 else None, vmax="shared", q=DISPLAY_Q,
                      image_title=label) for r, (label, maps, titles) in enumerate(rows)]
    width = max(p.shape[1] for p in pics)
    pics = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pics]
    return np.concatenate(pics, axis=0)  # [sum of heights, W, 3]


def save_panel(image: np.ndarray, rows, suptitle: str, path: Path) -> None:
    save_png(render_panel(image, rows, suptitle), path)


def default_render_processes(n_images: int, cpus: int | None = None) -> int:
    """Drawing processes for a run: none for small runs or machines with fewer than 4 CPUs (there they compete
    with the model's threads: 64 photos on 2 cores took 8.7 s with 2 processes, 7.0 s drawing inline), else one
    per two CPUs, at most 8."""
    cpus = cpus or os.cpu_count() or 1
    return 0 if n_images < 16 or cpus < 4 else min(8, cpus // 2)


def _init_render_worker() -> None:
    """A drawing process: one torch thread (many processes x many threads would thrash); importing this module
    loaded matplotlib and the drawing code."""
    torch.set_num_threads(1)


def _ready() -> None:
    """Submitted once per process at start-up, so the processes start while the model loads."""


class PanelWriter:
    """Renders and saves panels, in worker processes for larger runs (drawing with matplotlib, not the model, is
    then the bottleneck); at most a few panels wait at a time, so memory stays bounded."""

    def __init__(self, processes: int):
        self.pool = None
        self.pending: list = []
        self.limit = 4 * max(1, processes)
        if processes > 0:
            self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_render_worker)
            self.pending = [self.pool.submit(_ready) for _ in range(processes)]

    def submit(self, image: np.ndarray, rows, suptitle: str, path: Path) -> None:
        if self.pool is None:
            save_panel(image, rows, suptitle, path)
            return
        self.pending.append(self.pool.submit(save_panel, image, rows, suptitle, path))
        while len(self.pending) > self.limit:
            self.pending.pop(0).result()

    def drain(self) -> None:
        """Wait until every submitted panel is saved (a shard counts as done only with its panels)."""
        while self.pending:
            self.pending.pop(0).result()

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                for f in self.pending:
                    f.result()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=wait, cancel_futures=not wait)


class Results:
    """What one shard keeps per image until it is written: its tensors (keys as in `MAPS_LAYOUT`, method maps in
    `dtype`), its panel (unless panels is None), its manifest entry. `take` hands them over and starts afresh."""

    def __init__(self, out: Path, classes: list[str], concept_names: list[str], similarity: str,
                 methods: list[Method], params: dict[str, dict], backbone, n_inputs: int,
                 panels: PanelWriter | None, dtype: str = "float32"):
        self.out, self.classes, self.concept_names, self.similarity = out, classes, concept_names, similarity
        self.methods, self.params, self.panels, self.dtype = methods, params, panels, np.dtype(dtype)
        self.dc = backbone.data_config
        self.grid_size = backbone.grid_size
        self.width = max(4, len(str(n_inputs)))
        self.arrays: dict[str, np.ndarray] = {}
        self.records: list[dict[str, Any]] = []

    def take(self) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """-> (tensors, manifest entries in index order) of the images added since the last call."""
        arrays, records = self.arrays, sorted(self.records, key=lambda r: r["index"])
        self.arrays, self.records = {}, []
        return arrays, records

    def add_batch(self, items: list[tuple[Item, tuple[int, int]]], images: Tensor, logits: Tensor, idx: Tensor,
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

    def _add(self, it: Item, orig, image: Tensor, logits, probs, idx, scores, maps) -> None:
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

        # a panel draws at most PANEL_TARGETS targets: the highest logits among them, highest first (maps/ keeps all)
        drawn = (list(range(len(targets))) if len(targets) <= PANEL_TARGETS
                 else np.argsort(-logits[idx], kind="stable")[:PANEL_TARGETS].tolist())
        rows, map_info = [], {}
        for m in self.methods:
            grid = np.ascontiguousarray(maps[m.name], dtype=np.float32)  # [R, h, w]
            if not m.class_specific:
                labels = ["image"]
                rows.append((m.name, list(grid), ["class-agnostic"]))
            else:
                labels = [f"class:{t['class']}" for t in targets]
                rows.append((m.name, [grid[j] for j in drawn],
                             [f"{targets[j]['class']}\nlogit {fmt_number(targets[j]['logit'])}, "
                              f"p {targets[j]['probability']:.2f}" for j in drawn]))
                if m.takes_concepts and concepts:  # own row and colour range: similarities have another scale
                    labels += [f"concept:{c['name']}" for c in concepts]
                    rows.append((f"{m.name}: concepts", list(grid[len(targets):]),
                                 [f"concept {c['name']}\n{self.similarity} {fmt_number(c['score'])}"
                                  for c in concepts]))
            key = f"{i}/{m.name}"
            self.arrays[key] = self.stored(grid, m.name)
            map_info[m.name] = {"key": key, "shape": list(grid.shape), "rows": labels, "params": self.params[m.name]}

        rel = None
        if self.panels is not None:
            rel = f"panels/{i:0{self.width}d}_{safe_stem(it.path)}.png"
            picture = to_display(image, self.dc)  # what the model saw, [H, W, 3] uint8
            shown = "" if len(drawn) == len(targets) else (f"; the top {len(drawn)} of its {len(targets)} targets "
                                                            "drawn, every map in maps/")
            self.panels.submit(picture, rows, f"{path_text(it.path.name)}: predicted {classes[pred]} "
                                              f"(p {probs[pred]:.2f}){shown}",
                               self.out / rel)
        self.records.append({
            "index": i, "path": path_text(it.path), "name": path_text(it.path.name), "panel": rel,
            "original_size": list(orig), "input_size": list(it.size), "grid": list(self.grid_size(*it.size)),
            "prediction": {"class": classes[pred], "index": pred, "logit": float(logits[pred]),
                           "probability": float(probs[pred])},
            "targets": targets, "concepts": concepts, "maps": map_info,
        })


    def stored(self, grid: np.ndarray, method: str) -> np.ndarray:
        """A map in the storage dtype; float16 must not turn a finite score into infinity."""
        with np.errstate(over="ignore"):  # checked just below, as one clear error
            out = grid.astype(self.dtype)
        if not np.isfinite(out).all() and np.isfinite(grid).all():
            raise ConfigError(f"method {method!r} has scores up to {np.abs(grid).max():.3g}, beyond float16's range; "
                              "use --dtype float32")
        return out


def to_display(image: Tensor, dc: dict[str, Any]) -> np.ndarray:
    return to_uint8_image(image, mean=dc["mean"], std=dc["std"])


def gallery_figure(im: dict[str, Any]) -> str:
    e = html.escape
    src = urllib.parse.quote(im["panel"])
    pred = im["prediction"]
    return (f'<figure id="image-{im["index"]}"><a href="{src}"><img src="{src}" alt="{e(im["name"])}" '
            f'loading="lazy"></a><figcaption><b>{e(im["name"])}</b> &middot; predicted {e(pred["class"])} '
            f'(p {pred["probability"]:.2f}) &middot; <code>{e(im["path"])}</code></figcaption></figure>\n')


def write_gallery(path: Path, head: dict[str, Any], images: Iterable[dict[str, Any]], n_images: int,
                  skipped: list[dict[str, Any]]) -> Path:
    """Static gallery: relative links to the panels, inline CSS, no external assets; `images` (manifest entries)
    are streamed into the file, `head` is the manifest without them."""
    e = html.escape
    ck, bb, maps = head["checkpoint"], head["backbone"], head["maps"]
    methods = ", ".join(m["name"] for m in head["methods"])
    skipped_items = "".join(f"<li><code>{e(s['path'])}</code>: {e(s['reason'])}</li>" for s in skipped)
    top = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CDAM explanations: {e(Path(ck["path"]).name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
figure {{ margin: 0 0 2em 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.9em; margin-top: 0.3em; }} code {{ color: #555; }}
</style></head>
<body>
<h1>CDAM explanations</h1>
<p>checkpoint <code>{e(ck["path"])}</code> &middot; backbone {e(bb["name"])} ({e(str(bb["weights"]))})
&middot; methods {e(methods)} &middot; targets {e(head["targets"])}
&middot; {n_images} images explained, {len(skipped)} skipped.
Red = evidence for the target, blue = against it; the maps of a row share one colour bar.
Raw maps: <a href="{e(maps["index"])}">{e(maps["index"])}</a> (read them with
<code>cdam_pl.load_explanations</code>), details: <a href="manifest.json">manifest.json</a>.</p>
"""

    def write(f: TextIO) -> None:
        f.write(top)
        for im in images:
            f.write(gallery_figure(im))
        f.write((f"<h2>Skipped</h2><ul>{skipped_items}</ul>\n" if skipped else "") + "</body></html>\n")

    return atomic_write(path, write, mode="w")


def _indented(value: Any, depth: int) -> str:
    return json.dumps(value, indent=1).replace("\n", "\n" + " " * depth)


def write_manifest(path: Path, head: dict[str, Any], images: Iterable[dict[str, Any]],
                   skipped: list[dict[str, Any]]) -> Path:
    """manifest.json: `head`, then the entries of every image (streamed from `images`), then the skipped inputs;
    laid out as json.dump(indent=1) would."""

    def write(f: TextIO) -> None:
        f.write("{")
        for k, v in head.items():
            f.write(f"\n {json.dumps(k)}: {_indented(v, 1)},")
        f.write('\n "images": [')
        for n, im in enumerate(images):
            f.write(("," if n else "") + "\n  " + _indented(im, 2))
        f.write(f'\n ],\n "skipped": {_indented(skipped, 1)}\n}}\n')

    return atomic_write(path, write, mode="w")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("cdam-pl", "torch", "torchvision", "timm", "numpy", "pillow", "matplotlib", "lightning"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "source checkout (not pip-installed)" if dist == "cdam-pl" else "not installed"
    return out
