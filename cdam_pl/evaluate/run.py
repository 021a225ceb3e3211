"""The evaluation run: image sets -> every method's maps -> per-image scores -> results.md, scores.csv, figures.

Which images each method and metric gets (seeded subsets nest: the first k of one seeded order per set):
  cheap methods (one or a few passes per map)       map metrics on every image of every set
  expensive methods (registry `expensive`: TAM, IG, SmoothGrad; one full pass per token or per sample)
                                                    map metrics on the first `expensive` images of each set
  forward metrics and randomisation (single items)  the first `faithful` images (`faithful_expensive` for the
                                                    expensive methods)
`--device cuda` gives every method and metric every image. Each stage's result is kept under DIR/.work (written
atomically), keyed by the settings it depends on: a killed run resumes where it stopped, and a rerun with other
settings recomputes only the stages they change (`--faithful 300` keeps every map; `--photos 4` redoes only the
photos).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cdam_pl.benchmark import CONTROL, find_checkpoint, method_params, photo_set
from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.cli import check_positive, run_cli
from cdam_pl.data.photos import PHOTOS
from cdam_pl.errors import CdamError
from cdam_pl.evaluate import data as D
from cdam_pl.evaluate.report import write_outputs
from cdam_pl.evaluate.scoring import derived_scores, forward_scores, map_scores, randomisation_scores
from cdam_pl.explain import registry
from cdam_pl.io import atomic_torch_save, file_sha256

DEFAULT_OUT = Path("bench/out/evaluation")
SETS = ("fmnist", "composites", "mosaics", "photos")
# The minimums (the full run on 2 CPU cores); --quick is a smoke run for CI and tests.
FULL = dict(images=1000, composites=500, mosaics=500, photos=len(PHOTOS), expensive=50, faithful=200,
            faithful_expensive=50, steps=20, n_samples=50, blocks=2, bootstrap=2000)
QUICK = dict(images=8, composites=4, mosaics=4, photos=2, expensive=2, faithful=3, faithful_expensive=2, steps=4,
             n_samples=4, blocks=1, bootstrap=200)
SIZE_KEYS = tuple(FULL)
CLI_HELP = """Evaluate every registered explanation method on a trained head.

    python -m cdam_pl.evaluate                        # newest runs/demo/version_*/checkpoints/last.ckpt
    python -m cdam_pl.evaluate --checkpoint PATH --out DIR --quick

Writes DIR/results.md (per image set: methods x metrics, mean [95% bootstrap interval] (images)), DIR/scores.csv
(one row per image, method and metric), DIR/bars_<set>.png, DIR/examples.png and the seconds per image of every
method and metric. See EVALUATION.md for the protocol and the full run."""


@dataclass
class MethodResult:
    """One method on one set: the images it was scored on (positions in the set), its maps, its scores."""

    idx: Tensor  # [n] positions in the set
    maps: Tensor  # [n, K, gh, gw] on the CPU
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> [len(score_idx[metric])]
    score_idx: dict[str, Tensor] = field(default_factory=dict)  # metric -> positions in the set
    seconds: dict[str, float] = field(default_factory=dict)  # "maps" or a metric group -> seconds per image


class Work:
    """Stage results under DIR/.work, one file per stage named by the stage and a hash of everything it depends on
    (its settings and the keys of the stages it was computed from). A stage whose settings changed is recomputed and
    its old file removed; the other stages are kept."""

    def __init__(self, out: Path, log: Callable[[str], None]):
        self.dir = out / ".work"
        self.log = log
        self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(depends: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(depends, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, name: str, depends: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, str]:
        """(the stage's value, its key); computed and saved unless a file with this key exists."""
        key = self.key(depends)
        path = self.dir / f"{name}@{key}.pt"
        for stale in self.dir.glob(f"{name}@*.pt"):
            if stale != path:
                stale.unlink()
        if path.is_file():
            self.log(f"  {name}: resumed")
            # this run's own stage files (dataclasses), never a download
            return torch.load(path, weights_only=False), key
        value = compute()
        atomic_torch_save(value, path)
        return value, key


def explainer(name: str, n_samples: int, seed: int) -> Callable[..., Tensor]:
    """fn(backbone, head, images, targets [B, K]) -> maps [B, K, gh, gw]; the control draws a fresh uniform map per
    call from its own seeded generator (a map that knows nothing about the image)."""
    if name == CONTROL:
        g = torch.Generator().manual_seed(seed + 1234)

        def random_map(backbone, head, images, targets):
            gh, gw = backbone.check_images(images)
            return torch.rand(images.shape[0], targets.shape[1], gh, gw, generator=g).to(images.device)

        return random_map
    method, params = registry.get(name), method_params(name, n_samples)
    return lambda backbone, head, images, targets: method(backbone, head, images, targets, **params)


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_expensive(name: str) -> bool:
    return name != CONTROL and registry.get(name).expensive


def predict_top(model, images: Tensor, k: int, batch_size: int, device: torch.device) -> Tensor:
    """The head's top-k classes [B, k] for images on the CPU, in batches on `device`."""
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device)
            out.append(model.head(model.backbone(x)).topk(k, dim=1).indices.cpu())
    return torch.cat(out)


def set_size(name: str, sizes: dict[str, int]) -> int | list[str]:
    """What fixes the image set `name` besides the seed: its number of images, or the photos' names."""
    if name == "photos":
        return list(PHOTOS)[:sizes["photos"]]
    return sizes["images" if name == "fmnist" else name]


def build_set(model, name: str, size: int | list[str], seed: int, batch_size: int, device: torch.device,
              fmnist: Callable[[], tuple[Any, list[int]]]) -> D.EvalSet:
    """The image set `name` of `set_size`; fmnist() gives the Fashion-MNIST test split and its held-out pool."""
    if name == "photos":
        b = photo_set(model, size, torch.device("cpu"))
        s = D.EvalSet("photos", b.images, b.targets.cpu(), list(size), b.titles, note=b.note)
    else:
        test, pool = fmnist()
        if name == "fmnist":
            idx = D.heldout_indices(test, pool, size, seed)
            s = D.fmnist_set(model, test, idx, lambda x: predict_top(model, x, 2, batch_size, device))
        elif name == "composites":
            s = D.composite_set(model, test, pool, size, seed)
            s.extra["localised_targets"] = (0, 1)
        else:
            s = D.mosaic_set(model, test, pool, size, seed)
    s.extra["order"] = D.seeded_order(len(s), seed)
    return s


def compute_maps(model, s: D.EvalSet, idx: Tensor, explain, batch_size: int, device) -> tuple[Tensor, float]:
    """Maps [n, K, gh, gw] (CPU) of the images idx of s, and seconds per image."""
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(idx), batch_size):
        j = idx[i:i + batch_size]
        out.append(explain(model.backbone, model.head, s.images[j].to(device), s.targets[j].to(device)).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(out).float(), (time.perf_counter() - t0) / max(len(idx), 1)


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    sizes = dict(QUICK if args.quick else FULL)
    for key in SIZE_KEYS:
        if getattr(args, key, None) is not None:
            sizes[key] = getattr(args, key)
    methods = [m.name for m in registry.parse_methods(args.methods, note=log)] if args.methods else registry.names()
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SETS]
    if bad or not wanted:
        raise CdamError(f"unknown image set {bad[0] if bad else '(none)'!r}; choose from {', '.join(SETS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CdamError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    everything = device.type == "cuda"  # a GPU gives every method and metric every image
    if sizes["faithful_expensive"] > sizes["expensive"] and not everything:
        raise CdamError(f"--faithful-expensive ({sizes['faithful_expensive']}) cannot exceed --expensive "
                        f"({sizes['expensive']}): forward metrics score the expensive methods' maps")
    ckpt = find_checkpoint(args.checkpoint)
    model = load_checkpoint(ckpt, device=device)
    log(f"checkpoint {ckpt} ({model.backbone.identity['name']}, {len(model.classes)} classes, "
        f"{'x'.join(map(str, model.backbone.img_size))} px) on {device}")
    out = Path(args.out)
    work = Work(out, log)
    base = {"checkpoint": file_sha256(ckpt), "seed": args.seed, "device": device.type, "batch_size": args.batch_size}
    names = methods + [CONTROL]
    explainers = {n: explainer(n, sizes["n_samples"], args.seed) for n in names}

    @functools.cache
    def fmnist():
        test = D.fashion_mnist(model)
        return test, D.holdout_pool(model, test)

    sets, set_keys = [], {}
    for name in wanted:
        size = set_size(name, sizes)
        s, set_keys[name] = work.get(f"set-{name}", base | {"size": size}, lambda name=name, size=size: build_set(
            model, name, size, args.seed, args.batch_size, device, fmnist))
        sets.append(s)
    map_keys: dict[str, dict[str, str]] = {}
    results: dict[str, dict[str, MethodResult]] = {}
    for s in sets:
        order = s.extra["order"]
        results[s.name] = {}
        for name in names:
            k = len(s) if everything or not is_expensive(name) else min(sizes["expensive"], len(s))
            idx = order[:k].sort().values

            def stage(name=name, idx=idx, s=s):
                maps, sec = compute_maps(model, s, idx, explainers[name], args.batch_size, device)
                r = MethodResult(idx, maps, seconds={"maps": sec})
                t0 = time.perf_counter()
                for metric, v in map_scores(s, idx, maps).items():
                    r.scores[metric], r.score_idx[metric] = v, idx
                r.seconds["map metrics"] = (time.perf_counter() - t0) / max(len(idx), 1)
                return r

            params = {} if name == CONTROL else method_params(name, sizes["n_samples"])
            results[s.name][name], map_keys.setdefault(s.name, {})[name] = work.get(
                f"maps-{s.name}-{name}", {"set": set_keys[s.name], "method": name, "params": params, "images": k},
                stage)
            log(f"  {s.name:<10} {name:<12} {len(idx):5d} images {results[s.name][name].seconds['maps']:7.3f} s/image")

    if "fmnist" in wanted and not args.no_forward:
        s = sets[wanted.index("fmnist")]
        forward_stage(model, s, results["fmnist"], map_keys["fmnist"], explainers, sizes, args, device, work,
                      everything, log)

    meta = {
        "checkpoint": str(ckpt), "backbone": model.backbone.identity["name"],
        "img_size": "x".join(map(str, model.backbone.img_size)), "patch": model.backbone.patch_size,
        "classes": len(model.classes), "class_names": list(model.classes),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {device}, "
                   f"torch {torch.__version__}",
        "command": "python -m cdam_pl.evaluate " + " ".join(args.argv), "sizes": sizes, "seed": args.seed,
        "everything": everything, "methods": methods,
        "labels": {n: (registry.get(n).label if n != CONTROL else "random (control)") for n in names},
    }
    meta["total_s"] = time.perf_counter() - t_start  # up to the scores; results.md states it
    meta["cpu_s"] = time.process_time() - cpu_start
    write_outputs(out, model, sets, results, meta, n_boot=sizes["bootstrap"], seed=args.seed)
    meta["total_s"] = time.perf_counter() - t_start
    log(f"wrote {out / 'results.md'}, {out / 'scores.csv'} and figures in {meta['total_s']:.0f} s "
        f"({time.process_time() - cpu_start:.0f} s CPU)")
    return {"out": out, "meta": meta, "results": results, "sets": sets}


def forward_stage(model, s: D.EvalSet, results: dict[str, MethodResult], map_keys: dict[str, str], explainers,
                  sizes, args, device, work, everything: bool, log) -> None:
    """Perturbation, ROAD, Random Logit and cascading randomisation on the faithfulness subset (target: top-1)."""
    order = s.extra["order"]
    subsets: dict[int, dict[str, Tensor]] = {}
    for name in explainers:
        k = len(s) if everything else min(sizes["faithful_expensive" if is_expensive(name) else "faithful"], len(s))
        subsets.setdefault(k, {})[name] = order[:k].sort().values
    for k, group in sorted(subsets.items()):
        idx = next(iter(group.values()))
        images, target = s.images[idx].to(device), s.targets[idx, 0].to(device)
        for name in group:
            r = results[name]
            pos = _positions(r.idx, idx)

            def stage(name=name, pos=pos):
                return forward_scores(model, images, target, r.maps[pos, 0], steps=sizes["steps"], seed=args.seed,
                                      batch_size=args.batch_size, explain=explainers[name])

            t0 = time.perf_counter()
            (scores, seconds), _ = work.get(f"forward-{name}", {"maps": map_keys[name], "images": k,
                                                                 "steps": sizes["steps"]}, stage)
            for metric, v in derived_scores(scores).items():
                r.scores[metric], r.score_idx[metric] = v, idx
            r.seconds.update(seconds)
            log(f"  forward    {name:<12} {k:5d} images {time.perf_counter() - t0:7.1f} s")
        t0 = time.perf_counter()
        originals = {name: results[name].maps[_positions(results[name].idx, idx), 0] for name in group}

        def cascade(group=group, originals=originals):
            return randomisation_scores(model, images, target, originals, blocks=sizes["blocks"], seed=args.seed,
                                        batch_size=args.batch_size,
                                        explainers={n: explainers[n] for n in group})

        (scores, seconds), _ = work.get(f"randomisation-{k}", {"maps": sorted(map_keys[n] for n in group),
                                                                "images": k, "blocks": sizes["blocks"]}, cascade)
        for name in group:
            for metric, v in scores[name].items():
                results[name].scores[metric], results[name].score_idx[metric] = v, idx
            results[name].seconds["randomisation"] = seconds[name]
        log(f"  randomise  {len(group)} methods {k:5d} images {time.perf_counter() - t0:7.1f} s")


def _positions(have: Tensor, want: Tensor) -> Tensor:
    """Positions in `have` (sorted set positions) of the set positions `want` (all present)."""
    pos = torch.searchsorted(have, want)
    if (pos >= len(have)).any() or (have[pos.clamp_max(len(have) - 1)] != want).any():
        raise RuntimeError("a forward-metric image has no map; the subsets must nest")
    return pos


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cdam_pl.evaluate", description=CLI_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="train.py checkpoint (default: newest runs/demo/version_*/checkpoints/"
                    "last.ckpt)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a few images and samples (CI, tests; < 3 min on 2 cores)")
    ap.add_argument("--methods", help="comma-separated subset of the registered methods (default: all)")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated image sets (default %(default)s)")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available; cuda scores every image)")
    helps = {"images": "held-out single items", "composites": "two-item composites", "mosaics": "Focus mosaics",
             "photos": "bundled photos", "expensive": "images per set for TAM, IG, SmoothGrad",
             "faithful": "single items for the forward metrics and randomisation",
             "faithful_expensive": "the same for TAM, IG, SmoothGrad", "steps": "steps per perturbation curve",
             "n_samples": "samples/steps of SmoothGrad, IG, Smooth and Integrated CDAM",
             "blocks": "blocks randomised after the head", "bootstrap": "bootstrap resamples"}
    for key in SIZE_KEYS:
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int,
                        help=f"{helps[key]} (default {FULL[key]}, quick {QUICK[key]})")
    ap.add_argument("--no-forward", action="store_true", help="skip the forward metrics and randomisation")
    ap.add_argument("--batch-size", type=int, default=8, help="images per method call (default %(default)s)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 wastes least on a machine "
                    "shared with other jobs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_positive(args, (*SIZE_KEYS, "batch_size", "threads"))
    if args.photos is not None and args.photos > len(PHOTOS):
        raise CdamError(f"--photos must be at most {len(PHOTOS)} (the bundled photos: {', '.join(PHOTOS)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    def go() -> int:
        run(parse_args(argv))
        return 0

    return run_cli(go)
