"""Compare every explanation method on a trained checkpoint: compactness, correctness, class sensitivity, speed.

    python -m cdam_pl.benchmark                          # newest runs/demo/version_*/checkpoints/last.ckpt
    python -m cdam_pl.benchmark --checkpoint PATH --out bench/out/methods --quick

Image sets (all offline):
  fmnist      Fashion-MNIST test images (stratified); targets = the model's top-2 classes.
  composites  two Fashion-MNIST test items of different classes side by side on one (H, 2W) canvas; targets =
              the left and the right item's true class, masks = the left and the right half.
  photos      scikit-image photos (chelsea, coffee, astronaut, rocket), centre-cropped to a square; they belong
              to no class of the model: targets = its top-2 classes, used for compactness, fidelity, sensitivity.
Per set and method: compactness under both rules (v1: |s| < 0.05 max(s), the paper's; symmetric: |s| <= 0.05 max|s|)
on the map of target 0, top-1/top-2 map correlation, share of positive evidence in
the target's object (composites), deletion fidelity (area between the least- and most-important-first curves of
the target logit, 40 steps, token removal and pixel replacement), seconds per image. A "random" control row gives
the fidelity of a map that knows nothing. Writes results.md, results.csv, grid.png (images x methods) to --out.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import platform
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.cli import check_positive, run_cli
from cdam_pl.data.datasets import FashionMNISTDataset
from cdam_pl.data.photos import PHOTOS, load_photo
from cdam_pl.data.splits import stratified_subset
from cdam_pl.data.transforms import build_transform
from cdam_pl.errors import CdamError
from cdam_pl.explain import registry
from cdam_pl.explain.tam import naive_token_ablation_map, token_ablation_map
from cdam_pl.io import atomic_write_text
from cdam_pl.metrics.compactness import CompactnessSymmetric, CompactnessV1
from cdam_pl.metrics.deletion import DeletionFidelity, deletion_curves
from cdam_pl.metrics.evidence import MaskedEvidenceShare
from cdam_pl.metrics.sensitivity import ClassSensitivity
from cdam_pl.viz.figures import strip
from cdam_pl.viz.maps import DISPLAY_Q, overlay, save_png, to_uint8_image

SETS = ("fmnist", "composites", "photos")
DEFAULT_OUT = Path("bench/out/methods")
DEMO_GLOB = "runs/demo/version_*/checkpoints/last.ckpt"
# Defaults sized so that the full run finishes within 15 minutes on 2 CPU cores with the demo checkpoint
# (DINOv2 ViT-S/14 at 112 px); --quick is for CI and tests.
FULL = dict(fmnist=4, composites=3, photos=4, n_samples=50, tam_speed_images=1)
QUICK = dict(fmnist=2, composites=2, photos=2, n_samples=8, tam_speed_images=1)
CONTROL = "random"


@dataclass
class ImageSet:
    """A batch of images with their targets [B, K], optional object masks [B, K, H, W] and row titles."""

    name: str
    images: Tensor  # [B, 3, H, W]
    targets: Tensor  # [B, K]
    titles: list[str]
    masks: Tensor | None = None  # [B, K, H, W]
    note: str = ""


@dataclass
class Result:
    set: str
    method: str
    label: str
    signed: bool
    class_specific: bool
    n_images: int
    seconds_per_image: float
    cpu_seconds_per_image: float
    compactness_v1: float
    compactness_symmetric: float
    top12_correlation: float
    evidence_in_object: float = float("nan")
    fidelity_token: float = float("nan")
    fidelity_pixel: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)


# --- inputs -----------------------------------------------------------------------------------------------------
def find_checkpoint(path: str | None) -> Path:
    """--checkpoint, else the newest demo run's last.ckpt; a one-line error naming what to do when there is none."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise CdamError(f"checkpoint {path!r} not found; pass the path of a last.ckpt/best.ckpt from train.py")
        return p
    runs = sorted(Path(".").glob(DEMO_GLOB), key=lambda q: int(re.sub(r"\D", "", q.parts[-3]) or 0))
    if not runs:
        raise CdamError(f"no demo checkpoint at {DEMO_GLOB}; train it with `python train.py --config "
                        "configs/demo.yaml` or pass --checkpoint PATH")
    return runs[-1]


def fmnist_root(config: dict) -> str | None:
    data = config.get("data", {}) if isinstance(config, dict) else {}
    return data.get("root") if data.get("name") == "fashion_mnist" else None


def model_transform(model, size):
    dc = model.backbone.data_config
    return build_transform(size, dc["mean"], dc["std"], dc["interpolation"])


def _top2(model, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model.head(model.backbone(images)).topk(2, dim=1).indices  # [B, 2]


def fmnist_set(model, n: int, seed: int, device) -> ImageSet:
    ds = FashionMNISTDataset(fmnist_root(model.config), "test")
    idx = stratified_subset(ds.targets, n, seed)
    tf = model_transform(model, model.backbone.img_size)
    images = torch.stack([tf(ds.load_image(i)) for i in idx]).to(device)
    targets = _top2(model, images)
    names = model.classes
    titles = [f"{ds.classes[ds.targets[i]]} (pred {names[t]})" for i, t in zip(idx, targets[:, 0].tolist())]
    return ImageSet("fmnist", images, targets, titles, note=f"Fashion-MNIST test images {idx[:3]}..., "
                    "targets = top-2 predicted classes")


def composite_set(model, n: int, seed: int, device) -> ImageSet:
    """Two items of different classes side by side; targets = (left class, right class); masks = halves."""
    ds = FashionMNISTDataset(fmnist_root(model.config), "test")
    rng = np.random.default_rng(seed + 1)
    labels = np.asarray(ds.targets)
    h, w = model.backbone.img_size
    tf = model_transform(model, (h, 2 * w))
    images, targets, titles = [], [], []
    for _ in range(n):
        a, b = rng.choice(len(ds.classes), 2, replace=False)  # two different classes
        ia, ib = int(rng.choice(np.flatnonzero(labels == a))), int(rng.choice(np.flatnonzero(labels == b)))
        left, right = ds.load_image(ia), ds.load_image(ib)
        canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
        canvas.paste(left, (0, 0))
        canvas.paste(right, (left.width, 0))
        images.append(tf(canvas))
        targets.append([int(a), int(b)])
        titles.append(f"{ds.classes[a]} | {ds.classes[b]}")
    masks = torch.zeros(n, 2, h, 2 * w, device=device)
    masks[:, 0, :, :w] = 1  # target 0 = the left item
    masks[:, 1, :, w:] = 1
    if model.backbone.grid_size(h, w)[1] * 2 != model.backbone.grid_size(h, 2 * w)[1]:
        raise CdamError("composite halves do not align with the patch grid")
    return ImageSet("composites", torch.stack(images).to(device), torch.tensor(targets, device=device), titles,
                    masks, note="two Fashion-MNIST test items of different classes side by side, "
                    "targets = (left class, right class), object masks = left / right half")


def photo_set(model, names: Sequence[str], device) -> ImageSet:
    """The bundled photos `names` (`cdam_pl.data.photos`), centre-cropped to a square, at the model's input size."""
    tf = model_transform(model, model.backbone.img_size)
    images = []
    for name in names:
        im = load_photo(name)
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        images.append(tf(im.crop((left, top, left + s, top + s))))
    images = torch.stack(images).to(device)
    targets = _top2(model, images)
    titles = [f"{n} (pred {model.classes[t]})" for n, t in zip(names, targets[:, 0].tolist())]
    return ImageSet("photos", images, targets, titles,
                    note=f"photos {', '.join(names)} (no true class), targets = top-2 predicted classes")


# --- running the methods ------------------------------------------------------------------------------------------
def method_params(name: str, n_samples: int) -> dict[str, int]:
    """--n-samples sets the parameter that counts samples or path steps of each method that has one."""
    key = registry.get(name).samples
    return {key: n_samples} if key else {}


def run_methods(model, s: ImageSet, methods: Sequence[str], n_samples: int, batch_size: int,
                log=print) -> tuple[dict[str, Tensor], dict[str, dict[str, float]]]:
    """maps[name] = [B, K, gh, gw] on the CPU; seconds["wall" | "cpu"][name] = seconds per image (CPU = user +
    system time of all threads: on a busy machine wall time says little)."""

    maps, seconds, cpu = {}, {}, {}
    b = s.images.shape[0]
    registry.get("cdam")(model.backbone, model.head, s.images[:1], s.targets[:1])  # warm-up, untimed
    for name in methods:
        m = registry.get(name)
        params = method_params(name, n_samples)
        t0, c0 = time.perf_counter(), time.process_time()
        out = [m(model.backbone, model.head, s.images[i:i + batch_size], s.targets[i:i + batch_size], **params)
               for i in range(0, b, batch_size)]
        if s.images.is_cuda:
            torch.cuda.synchronize()
        seconds[name] = (time.perf_counter() - t0) / b
        cpu[name] = (time.process_time() - c0) / b
        maps[name] = torch.cat(out).cpu()
        log(f"  {s.name:<10} {name:<16} {seconds[name]:7.3f} s/image ({cpu[name]:.3f} s CPU)")
    g = torch.Generator().manual_seed(1234)
    maps[CONTROL] = torch.rand(maps[methods[0]].shape, generator=g)
    seconds[CONTROL] = cpu[CONTROL] = float("nan")
    return maps, {"wall": seconds, "cpu": cpu}


def deletion_fidelities(model, s: ImageSet, maps: dict[str, Tensor], steps: int, mode: str, replace: str,
                        batch_size: int, seed: int, n_targets: int = 1) -> dict[str, Tensor]:
    """Per method, deletion curves [B, n_targets, 2, steps+1] for the first n_targets targets (top-1 class /
    left item by default); every method's curves of a batch share the batched forwards of each step."""
    names = list(maps)
    k = min(n_targets, s.targets.shape[1])
    out = {n: [] for n in names}
    for i in range(0, s.images.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        stacked = torch.cat([maps[n][sl, :k] for n in names], 1).to(s.images.device)  # [b, M*k, gh, gw]
        tg = s.targets[sl, :k].repeat(1, len(names))  # [b, M*k]
        curves = deletion_curves(model.backbone, model.head, s.images[sl], tg, stacked, steps=steps, mode=mode,
                                 replace=replace, seed=seed)  # [b, M*k, 2, steps+1]
        for j, n in enumerate(names):
            out[n].append(curves[:, j * k:(j + 1) * k].cpu())
    return {n: torch.cat(c) for n, c in out.items()}


def score(s: ImageSet, maps: dict[str, Tensor], seconds: dict[str, dict[str, float]], fid_token, fid_pixel,
          steps: int) -> list[Result]:

    rows = []
    for name, m in maps.items():
        meth = registry.get(name) if name != CONTROL else None
        v1, sym, sens = CompactnessV1(), CompactnessSymmetric(), ClassSensitivity()
        v1.update(m[:, 0])  # target 0: the top-1 class (composites: the left item), as the paper's v1 figures
        sym.update(m[:, 0])
        sens.update(m)
        r = Result(s.name, name, meth.label if meth else "random (control)", meth.signed if meth else True,
                   meth.class_specific if meth else True, int(m.shape[0]), seconds["wall"][name],
                   seconds["cpu"][name], v1.compute().item(), sym.compute().item(), sens.compute().item())
        if s.masks is not None:
            share = MaskedEvidenceShare()
            share.update(m, s.masks.cpu())
            r.evidence_in_object = share.compute().item()
        for attr, fid in (("fidelity_token", fid_token), ("fidelity_pixel", fid_pixel)):
            if fid is not None:
                metric = DeletionFidelity(steps)
                metric.update(fid[name])
                setattr(r, attr, metric.compute().item())
        rows.append(r)
    return rows


def tam_speed(model, images: Tensor) -> dict[str, float]:
    """Batched TAM against one forward per (image, removed token), same images, same process."""
    bb, head = model.backbone, model.head
    targets = _top2(model, images)
    token_ablation_map(bb, head, images[:1], targets[:1])  # warm-up
    t0 = time.perf_counter()
    ref = naive_token_ablation_map(bb, head, images, targets)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = token_ablation_map(bb, head, images, targets)
    t_fast = time.perf_counter() - t0
    diff = (fast - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
    return {"images": images.shape[0], "naive_s": t_naive, "batched_s": t_fast, "ratio": t_naive / t_fast,
            "max_rel_diff": diff}


# --- outputs ------------------------------------------------------------------------------------------------------
COLUMNS = [("label", "method"), ("compactness_v1", "compactness_v1 ↑"),
           ("compactness_symmetric", "compactness_symmetric ↑"), ("top12_correlation", "top-1/top-2 corr ↓"),
           ("evidence_in_object", "evidence in object ↑"), ("fidelity_token", "fidelity, tokens ↑"),
           ("fidelity_pixel", "fidelity, pixels ↑"), ("seconds_per_image", "s / image"),
           ("cpu_seconds_per_image", "CPU s / image")]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[Result]) -> str:
    cols = [(a, t) for a, t in COLUMNS if not all(isinstance(getattr(r, a), float) and math.isnan(getattr(r, a))
                                                  for r in rows)]
    lines = ["| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(getattr(r, a)) for a, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def claims(rows: list[Result]) -> list[str]:
    """Where the paper's findings hold on this data and where they do not, computed from the rows of one set."""
    by = {r.method: r for r in rows}
    out = []
    paper = ["cdam", "tam", "attention", "rp"]
    if all(m in by for m in paper):
        vals = [by[m].compactness_v1 for m in paper]
        observed = sorted(paper, key=lambda m: -by[m].compactness_v1)  # stable: ties keep the paper's order
        text = f"{by[observed[0]].label} {by[observed[0]].compactness_v1:.3f}"
        for a, b in zip(observed, observed[1:]):
            va, vb = by[a].compactness_v1, by[b].compactness_v1
            text += f" {'=' if va == vb else '>'} {by[b].label} {vb:.3f}"
        if all(a > b for a, b in zip(vals, vals[1:])):
            verdict = "holds"
        elif all(a >= b for a, b in zip(vals, vals[1:])):
            verdict = "holds only up to ties"
        else:
            verdict = "does not hold"
        out.append(f"compactness_v1 (the paper's rule), paper order CDAM > TAM > AM > RP {verdict}: {text}")
    real = [r for r in rows if r.method != CONTROL]

    def rank(attr, higher=True):
        vals = [r for r in real if not math.isnan(getattr(r, attr))]
        order = sorted(vals, key=lambda r: -getattr(r, attr) if higher else getattr(r, attr))
        return [r.method for r in order], order

    if "cdam" in by:
        for attr, what, higher in (("compactness_v1", "compactness_v1", True),
                                   ("compactness_symmetric", "compactness_symmetric", True),
                                   ("top12_correlation", "class sensitivity (lowest top-1/top-2 correlation)", False),
                                   ("evidence_in_object", "evidence in the target's object", True),
                                   ("fidelity_token", "token-deletion fidelity", True),
                                   ("fidelity_pixel", "pixel-deletion fidelity", True)):
            names, order = rank(attr, higher)
            if "cdam" not in names:
                continue
            best = order[0]
            out.append(f"{what}: CDAM ranks {names.index('cdam') + 1} of {len(names)} "
                       f"(CDAM {getattr(by['cdam'], attr):.3f}; best {best.label} {getattr(best, attr):.3f})")
    ctrl = by.get(CONTROL)
    if ctrl is not None and not math.isnan(ctrl.fidelity_token):
        worse = [r.label for r in real if r.fidelity_token <= ctrl.fidelity_token]
        out.append(f"random control: token fidelity {ctrl.fidelity_token:.3f}"
                   + (f"; not better than random: {', '.join(worse)}" if worse else "; every method beats it"))
    return out


def write_csv(path: Path, rows: list[Result]) -> None:
    names = ["set", "method", "label", "signed", "class_specific", "n_images", "compactness_v1",
             "compactness_symmetric", "top12_correlation", "evidence_in_object", "fidelity_token", "fidelity_pixel",
             "seconds_per_image", "cpu_seconds_per_image"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        w.writerow([(f"{v:.6g}" if isinstance(v, float) else v) for v in (getattr(r, n) for n in names)])
    atomic_write_text(path, buf.getvalue())


def figure_grid(model, sets: list[ImageSet], maps: dict[str, dict[str, Tensor]], methods: Sequence[str],
                per_set: int = 2) -> np.ndarray:
    """Rows = images (the first `per_set` of each set), columns = the image, then each method's map of target 0."""

    dc = model.backbone.data_config
    rows, titles = [], []
    for s in sets:
        for i in range(min(per_set, s.images.shape[0])):
            img = to_uint8_image(s.images[i].cpu(), dc["mean"], dc["std"])
            cells = [img] + [overlay(img, maps[s.name][m][i, 0], q=DISPLAY_Q, alpha=0.65) for m in methods]
            rows.append(cells)
            titles.append("\n".join([s.name, *textwrap.wrap(s.titles[i], 20)[:2]]))  # the row label, rotated
    cols = ["image"] + [registry.get(m).label for m in methods]
    return strip(rows, titles, cols, suptitle="map of target 0 (top-1 class / left item); red = evidence for, "
                     "blue = against; each map on its own colour scale")


def render_markdown(meta: dict, results: list[Result], speed: dict | None, sets: list[ImageSet]) -> str:
    lines = ["# Explanation methods compared", "",
             f"Checkpoint `{meta['checkpoint']}`: backbone {meta['backbone']} at {meta['img_size']} px, "
             f"{meta['classes']} classes. {meta['machine']}. Total {meta['total_s']:.0f} s wall, "
             f"{meta['cpu_s']:.0f} s CPU.", "",
             f"Command: `{meta['command']}`", "",
             "Compactness = mean fraction of tokens near zero on the map of target 0 (higher = sparser), by two "
             "rules: compactness_v1 |s| < 0.05 max(s) with the signed max (0 when max <= 0; the paper's rule), "
             "compactness_symmetric |s| <= 0.05 max|s|. top-1/top-2 corr = "
             "Pearson correlation of the maps of the two targets of an image (lower = more class-sensitive; AM is "
             "class-agnostic, so 1 by construction). Evidence in object = share of positive evidence inside the "
             "target item's half (composites; 0.5 = chance). Fidelity = area between the least- and most-"
             f"important-first deletion curves of the target logit ({meta['steps']} steps; tokens: removed after "
             f"the position embedding; pixels: patches replaced by {meta['pixel_replace']}), in logit units, "
             f"for {meta['fidelity_targets']}; `random (control)` ranks tokens at random and gives the chance level of "
             "every column. Seconds per image: wall and CPU (all threads) time of the method for both targets.", ""]
    for s in sets:
        rows = [r for r in results if r.set == s.name]
        lines += [f"## {s.name} ({rows[0].n_images} images)", "", s.note + ".", "", markdown_table(rows), ""]
        lines += ["Against the paper:", ""] + [f"- {c}" for c in claims(rows)] + [""]
    if speed:
        lines += ["## TAM speed", "",
                  f"Batched TAM vs one forward per removed token, {speed['images']} image(s), same process: "
                  f"{speed['naive_s']:.2f} s vs {speed['batched_s']:.2f} s = **{speed['ratio']:.1f}x** faster "
                  f"(goal >= 5x); max relative difference {speed['max_rel_diff']:.1e}. Both do the same arithmetic, so "
                  "batching wins only the per-call overhead the loop leaves: large on small models, at most ~2x on "
                  "a compute-bound ViT-S on CPU (`python bench/tam_speed.py` measures that bound).", ""]
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("fmnist", "composites", "n_samples"):
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    methods = [m.name for m in registry.parse_methods(args.methods, note=log)] if args.methods else registry.names()
    sets_wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in sets_wanted if s not in SETS]
    if bad or not sets_wanted:
        raise CdamError(f"unknown image set {bad[0] if bad else '(none)'!r}; choose from {', '.join(SETS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = find_checkpoint(args.checkpoint)
    model = load_checkpoint(ckpt, device=device)
    log(f"checkpoint {ckpt} ({model.backbone.identity['name']}, {len(model.classes)} classes) on {device}")

    sets: list[ImageSet] = []
    for name in sets_wanted:
        if name == "fmnist":
            sets.append(fmnist_set(model, sizes["fmnist"], args.seed, device))
        elif name == "composites":
            sets.append(composite_set(model, sizes["composites"], args.seed, device))
        else:
            photos = list(PHOTOS)[: sizes["photos"]]
            sets.append(photo_set(model, photos, device))

    results: list[Result] = []
    all_maps: dict[str, dict[str, Tensor]] = {}
    for s in sets:
        maps, seconds = run_methods(model, s, methods, sizes["n_samples"], args.batch_size, log)
        all_maps[s.name] = maps
        t0 = time.perf_counter()
        fid = dict(steps=args.steps, batch_size=args.batch_size, seed=args.seed, n_targets=args.fidelity_targets)
        fid_t = deletion_fidelities(model, s, maps, mode="token", replace="mean", **fid)
        fid_p = None if args.no_pixel else deletion_fidelities(model, s, maps, mode="pixel",
                                                               replace=args.pixel_replace, **fid)
        log(f"  {s.name:<10} deletion curves {time.perf_counter() - t0:7.1f} s")
        results += score(s, maps, seconds, fid_t, fid_p, args.steps)

    speed = None
    if sizes["tam_speed_images"] and "fmnist" in sets_wanted:
        speed = tam_speed(model, sets[sets_wanted.index("fmnist")].images[: sizes["tam_speed_images"]])
        log(f"TAM speed: {speed['ratio']:.1f}x faster than one forward per token")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", results)
    save_png(figure_grid(model, sets, all_maps, methods), out / "grid.png")
    threads = torch.get_num_threads()
    meta = {
        "checkpoint": str(ckpt), "backbone": model.backbone.identity["name"],
        "img_size": "x".join(map(str, model.backbone.img_size)), "classes": len(model.classes),
        "machine": f"{platform.machine()}, {threads} torch threads, {device}, torch {torch.__version__}",
        "total_s": time.perf_counter() - t_start, "cpu_s": time.process_time() - cpu_start, "steps": args.steps,
        "pixel_replace": {"mean": "the image's mean colour", "blur": "a Gaussian blur (sigma = half a patch)",
                          "zero": "zero (the data mean)"}[args.pixel_replace],
        "command": "python -m cdam_pl.benchmark " + " ".join(args.argv),
        "fidelity_targets": "the top-1 class (composites: the left item)" if args.fidelity_targets == 1
        else "both targets, averaged",
    }
    atomic_write_text(out / "results.md", render_markdown(meta, results, speed, sets))
    log(f"wrote {out / 'results.md'}, {out / 'results.csv'}, {out / 'grid.png'} in {meta['total_s']:.0f} s "
        f"({meta['cpu_s']:.0f} s CPU)")
    return {"results": results, "speed": speed, "out": out, "meta": meta, "maps": all_maps}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cdam_pl.benchmark", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help=f"train.py checkpoint (default: newest {DEMO_GLOB})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a few images and samples (CI, tests)")
    ap.add_argument("--methods", help="comma-separated subset of the registered methods (default: all)")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated image sets (default %(default)s)")
    ap.add_argument("--fmnist", type=int, help=f"Fashion-MNIST images (default {FULL['fmnist']}, quick "
                    f"{QUICK['fmnist']})")
    ap.add_argument("--composites", type=int, help=f"composite images (default {FULL['composites']})")
    ap.add_argument("--n-samples", dest="n_samples", type=int,
                    help="samples/steps of SmoothGrad, IG, Smooth and Integrated CDAM (default 50, quick 8)")
    ap.add_argument("--steps", type=int, default=40, help="deletion steps (default %(default)s)")
    ap.add_argument("--pixel-replace", default="blur", choices=("mean", "blur", "zero"),
                    help="replacement in pixel deletion (default %(default)s)")
    ap.add_argument("--no-pixel", action="store_true", help="skip the pixel-deletion variant")
    ap.add_argument("--fidelity-targets", type=int, default=1, choices=(1, 2),
                    help="deletion curves for the top-1 class only (1, default) or for both targets (2)")
    ap.add_argument("--batch-size", type=int, default=4, help="images per method call (default %(default)s)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_positive(args, ("fmnist", "composites", "n_samples", "steps", "batch_size"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    def go() -> int:
        run(parse_args(argv))
        return 0

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
