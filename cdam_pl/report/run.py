"""explain.py's run: checkpoint -> (frozen backbone, head, class names) -> image files -> each image's input size ->
batches of equal size, loaded one batch ahead -> per batch ONE `CDAM.explain` forward for vanilla CDAM (class targets
and concepts together) and the attention map, then every other requested method from the registry -> per image a
PNG panel and its rows of maps.npz -> manifest.json, index.html.

Methods come from the one registry, `cdam_pl.explain.registry`: a method's rows are its K targets, then the M
concepts for methods that explain concepts, or a single row for class-agnostic methods. `--n-samples`, `--noise` and
`--n-steps` set the parameters of that name of every method that has one; `--seed` seeds every method that draws
random numbers, again at the start of every batch; every parameter's effective value is recorded in the manifest.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.data.images import list_images, path_text
from cdam_pl.errors import ConfigError, DataError
from cdam_pl.explain.cdam import CDAM, SIMILARITIES, concept_scores
from cdam_pl.explain.registry import Method, parse_methods
from cdam_pl.report.inputs import (
    ImageLoader,
    Sizer,
    batches,
    build_concepts,
    check_img_size,
    outside_of,
    parse_concepts,
    plan,
    prefetched,
)
from cdam_pl.report.outputs import (
    MAPS_LAYOUT,
    PanelWriter,
    Results,
    default_render_processes,
    sha256_file,
    versions,
    write_outputs,
)
from cdam_pl.report.targets import TargetSpec, default_targets, parse_targets

MANIFEST_FORMAT = "cdam-pl-explain/1"


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain and how: everything explain.py's command line sets, checked once when it is made.

    targets: topN, pred or class names (default: top 3, or every class of a smaller head). methods: names from the
    registry. concepts: NAME=DIR specs. img_size (H, W) or keep_aspect (about the training image area, each side a
    multiple of the patch size). n_samples / noise / n_steps: override those parameters of every method that has
    them; seed: seeds every sampling method at the start of each batch. panels=False writes maps.npz and
    manifest.json only. workers: threads that read images. render_processes: processes that draw the panels; 0
    draws them in this process; None picks none for fewer than 16 images or fewer than 4 CPUs, else one per two
    CPUs (at most 8), as explain.py does. Worker processes are spawned, so a calling script needs the
    `if __name__ == "__main__":` guard.
    """

    targets: str | None = None
    methods: str | Sequence[str] = "cdam"
    concepts: Sequence[str] = ()
    similarity: str = "dot"
    img_size: Sequence[int] | None = None
    keep_aspect: bool = False
    batch_size: int = 16
    device: str | None = None
    weights: str | None = None
    n_samples: int | None = None
    noise: float | None = None
    n_steps: int | None = None
    seed: int = 0
    panels: bool = True
    workers: int | None = None
    render_processes: int | None = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"--similarity {self.similarity!r}: choose one of {', '.join(SIMILARITIES)}")
        if self.img_size is not None and self.keep_aspect:
            raise ConfigError("--img-size and --keep-aspect exclude each other; pick one")
        for name, value, low in (("--n-samples", self.n_samples, 1), ("--n-steps", self.n_steps, 2)):
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.noise is not None and not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ConfigError(f"--noise must be >= 0, got {self.noise}")

    def method_params(self, method: Method) -> dict[str, Any]:
        """The method's effective parameters: these options where it has a parameter of that name, else its
        defaults."""
        return method.params_from({"n_samples": self.n_samples, "noise": self.noise, "n_steps": self.n_steps,
                                   "seed": int(self.seed)})


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


def prepare_out(out_dir: Path, panels: bool) -> None:
    try:
        (out_dir / "panels" if panels else out_dir).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--out {out_dir}: exists and is not a folder; choose another output folder") from None
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot create it ({e.strerror}); choose another output folder") from None


def check_shape(maps: Any, method: Method, b: int, rows: int) -> None:
    if not isinstance(maps, Tensor) or maps.ndim != 4 or maps.shape[0] != b or maps.shape[1] != rows:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise RuntimeError(f"method {method.name!r} returned {shape}; expected [B={b}, R={rows}, h, w]")


def explain_to_dir(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike = "explanations",
    options: ExplainOptions | None = None,
    *,
    warn: Callable[[str], None] | None = None,
    **fields: Any,
) -> RunSummary:
    """Explain every image under `inputs` with the checkpoint's head; write panels/, maps.npz, manifest.json and
    index.html into out_dir (panels=False: maps.npz and manifest.json only). Unreadable images are skipped
    (warned, listed); the run fails only if none can be explained.

    options: an `ExplainOptions`; keyword `fields` (any of its fields) build one, or override the given one.
    """
    t_start = time.perf_counter()
    bar_file = sys.stderr
    warn = warn or (lambda msg: tqdm.write(f"warning: {msg}", file=bar_file))
    opts = replace(options, **fields) if options is not None else ExplainOptions(**fields)
    chosen = parse_methods(opts.methods, note=warn)
    concept_folders = parse_concepts(opts.concepts)
    dev = resolve_device(opts.device)
    out = Path(out_dir)
    paths = outside_of(list_images([os.fspath(p) for p in inputs]), out)
    render_processes = opts.render_processes
    if render_processes is None:
        render_processes = default_render_processes(len(paths))
    render_processes = render_processes if opts.panels else 0
    writer = PanelWriter(render_processes) if opts.panels else None  # its processes start while the model loads
    finished = False
    try:
        model = load_checkpoint(checkpoint, weights=opts.weights, device=dev)
        backbone, classes = model.backbone, model.classes
        spec = parse_targets(opts.targets or default_targets(classes), classes)
        patch = backbone.patch_size
        sizer = Sizer(tuple(backbone.img_size), patch, check_img_size(opts.img_size, patch) if opts.img_size else None,
                      opts.keep_aspect)
        prepare_out(out, opts.panels)
        dc = backbone.data_config
        load = ImageLoader(dc["mean"], dc["std"], dc["interpolation"])
        concept_names, vectors, concept_info = build_concepts(concept_folders, backbone, sizer, load, dev,
                                                              opts.batch_size, warn)
        params = {m.name: opts.method_params(m) for m in chosen}
        items, skipped = plan(paths, sizer, load, warn)
        results = Results(out, classes, concept_names, opts.similarity, chosen, params, backbone, len(paths), writer)
        run = BatchRunner(model, chosen, spec, vectors, opts.similarity, params)
        t_loop = time.perf_counter()
        with tqdm(total=len(items), unit="img", desc="explaining", file=bar_file,
                  disable=not opts.progress or not bar_file.isatty(), dynamic_ncols=True) as bar:
            groups = batches(items, opts.batch_size)
            for batch, loaded in prefetched(groups, load, opts.workers or min(4, os.cpu_count() or 1)):
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
        "checkpoint": {"path": path_text(Path(checkpoint).resolve()), "sha256": sha256_file(Path(checkpoint)),
                       "classes": list(classes), "head": model.meta.get("head")},
        "backbone": {**backbone.identity, "patch_size": patch, "num_prefix_tokens": backbone.num_prefix_tokens,
                     "embed_dim": backbone.embed_dim, "num_heads": backbone.num_heads, "data_config": dc},
        "image_size": sizer.describe(),
        "device": str(dev),
        "targets": spec.text,
        "concepts": concept_info,
        "similarity": opts.similarity,
        "methods": [{"name": m.name, "label": m.label, "description": m.description, "params": params[m.name],
                     "rows": "one per image" if not m.class_specific else
                     ("targets, then concepts" if m.takes_concepts else "targets")} for m in chosen],
        "maps": {"file": "maps.npz", "layout": MAPS_LAYOUT},
        "images": records,
        "skipped": skipped,
        "timing": {"seconds": round(seconds, 3), "images_per_second": round(rate, 3),
                   "total_seconds": round(time.perf_counter() - t_start, 3), "batch_size": opts.batch_size,
                   "render_processes": render_processes},
        "versions": versions(),
    }
    files = write_outputs(out, results.arrays, records, classes, concept_names, chosen, manifest, opts.panels)
    return RunSummary(out, len(records), skipped, seconds, rate, [m.name for m in chosen], files)


class BatchRunner:
    """All requested maps of one batch: ONE `CDAM.explain` forward yields vanilla CDAM for the class targets and
    the concepts, the attention map, the logits and the targets; every other method is then called with those
    targets."""

    def __init__(self, model, methods: list[Method], spec: TargetSpec, vectors: Tensor | None, similarity: str,
                 params: dict[str, dict[str, Any]]):
        self.model, self.cdam = model, CDAM(model.backbone, model.head)
        self.methods, self.spec, self.vectors, self.similarity, self.params = methods, spec, vectors, similarity, \
            params
        self.n_concepts = 0 if vectors is None else vectors.shape[0]
        self.shared = any(m.from_explanation is not None and m.class_specific for m in methods)
        self.attention = any(m.needs_attention for m in methods)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None, dict[str, np.ndarray]]:
        """x [B,3,H,W] -> (logits [B,C], targets [B,K], concept scores [B,M] or None, method -> [B,R,h,w])."""
        ex = self.cdam.explain(x, targets=self.spec if self.shared else None,
                               concepts=self.vectors if self.shared else None, similarity=self.similarity,
                               attention=self.attention)
        idx = ex.targets if ex.targets is not None else self.spec(ex.logits)  # [B, K]
        scores = None
        if self.vectors is not None:
            scores = ex.concept_scores if ex.concept_scores is not None else \
                concept_scores(ex.embeddings, self.vectors, self.similarity)
        maps = {}
        for m in self.methods:
            rows = idx.shape[1] + (self.n_concepts if m.takes_concepts else 0) if m.class_specific else 1
            if m.from_explanation is not None:
                mp = m.from_explanation(ex)
            else:
                concepts = self.vectors if m.takes_concepts else None
                mp = m(self.model.backbone, self.model.head, x, idx, concepts=concepts, similarity=self.similarity,
                       **self.params[m.name])
            if not m.class_specific:
                mp = mp[:, :1]  # the same map for every target: one row per image
            check_shape(mp, m, x.shape[0], rows)
            maps[m.name] = mp.detach().float().cpu().numpy()
        return ex.logits, idx, scores, maps
