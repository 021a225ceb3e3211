"""explain.py's run: checkpoint -> (frozen backbone, head, class names) -> image files, cut into shards of at most
`shard_size` inputs -> per shard: each image's input size -> batches of equal size, loaded one batch ahead -> per
batch ONE `CDAM.explain` forward for vanilla CDAM (class targets and concepts together) and the attention map, then
every other requested method from the registry -> per image a PNG panel, per shard its tensors and manifest entries
(`cdam_pl.store`) -> at the end maps/index.json, manifest.json and index.html, streamed from the shards.

Memory holds one shard, whatever the number of images. A run killed at any point resumes when the same command
runs again into the same folder: finished shards are kept, the others redone, and the maps end up those of an
uninterrupted run (shards are fixed ranges of the input list and batches never cross them). With `devices` the
shards are explained as Lightning prediction, one process per device (`report/devices.py`), each process writing
the shards of its fixed share.

Methods come from the one registry, `cdam_pl.explain.registry`: a method's rows are its K targets, then the M
concepts for methods that explain concepts, or a single row for class-agnostic methods. `--n-samples`, `--noise` and
`--n-steps` set the parameters of that name of every method that has one; `--seed` seeds every method that draws
random numbers, again at the start of every batch; every parameter's effective value is recorded in the manifest.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
from cdam_pl.explain import registry
from cdam_pl.explain.cdam import CDAM, SIMILARITIES, concept_scores
from cdam_pl.explain.registry import Method, parse_methods
from cdam_pl.io import file_sha256
from cdam_pl.report.devices import predict_shards, prediction_trainer
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
    PanelWriter,
    Results,
    default_render_processes,
    versions,
    write_gallery,
    write_manifest,
)
from cdam_pl.report.targets import TargetSpec, default_targets, parse_targets
from cdam_pl.store.reader import OLD_MAPS, load_explanations
from cdam_pl.store.shards import (
    DEFAULT_SHARD_SIZE,
    INDEX_FILE,
    MAPS_DIR,
    MAPS_LAYOUT,
    STORE_FORMAT,
    RunFolder,
    check_map_dtype,
    check_shard_size,
)

MANIFEST_FORMAT = "cdam-pl-explain/2"


@dataclass(frozen=True)
class ExplainOptions:
    """What to explain and how: everything explain.py's command line sets, checked once when it is made.

    targets: topN, pred or class names (default: top 3, or every class of a smaller head). methods: names from the
    registry. concepts: NAME=DIR specs. img_size (H, W) or keep_aspect (about the training image area, each side a
    multiple of the patch size). n_samples / noise / n_steps: override those parameters of every method that has
    them; seed: seeds every sampling method at the start of each batch. panels=False writes the maps and
    manifest.json only. workers: threads that read images. render_processes: processes that draw the panels; 0
    draws them in this process; None picks none for fewer than 16 images or fewer than 4 CPUs, else one per two
    CPUs (at most 8), as explain.py does. shard_size: input images per shard of maps (at most 1,024; the unit a
    killed run resumes from). dtype: how method maps are stored, float32 or float16. device: the one device to run
    on; devices / accelerator instead: Lightning prediction on that many devices (CPU processes or GPUs), each
    drawing its panels inline. Worker processes are spawned, so a calling script needs the
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
    shard_size: int = DEFAULT_SHARD_SIZE
    dtype: str = "float32"
    devices: int | None = None
    accelerator: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"--similarity {self.similarity!r}: choose one of {', '.join(SIMILARITIES)}")
        if self.img_size is not None and self.keep_aspect:
            raise ConfigError("--img-size and --keep-aspect exclude each other; pick one")
        for name, value, low in (("--n-samples", self.n_samples, 1), ("--n-steps", self.n_steps, 2),
                                 ("--devices", self.devices, 1)):
            if value is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if self.noise is not None and not (self.noise >= 0 and math.isfinite(self.noise)):
            raise ConfigError(f"--noise must be >= 0, got {self.noise}")
        check_shard_size(self.shard_size)
        check_map_dtype(self.dtype)
        if self.device is not None and self.lightning:
            raise ConfigError(f"--device {self.device} runs on one device; for several use --devices N with "
                              "--accelerator, not both")

    @property
    def lightning(self) -> bool:
        """Whether the run is Lightning prediction (devices or accelerator given) rather than one device."""
        return self.devices is not None or self.accelerator is not None

    def method_params(self, method: Method) -> dict[str, Any]:
        """The method's effective parameters: these options where it has a parameter of that name, else its
        defaults."""
        return method.params_from({"n_samples": self.n_samples, "noise": self.noise, "n_steps": self.n_steps,
                                   "seed": int(self.seed)})


@dataclass
class RunSummary:
    out_dir: Path
    explained: int  # images in the folder's maps, including those of an earlier run it resumed
    skipped: list[dict[str, Any]]
    seconds: float  # of this call's explaining
    images_per_second: float  # images explained by this call per second
    methods: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    resumed: int = 0  # images an earlier run had explained


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


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def run_identity(checkpoint_sha: str, methods: list[Method], params: dict[str, dict], spec: TargetSpec,
                 concepts: dict[str, Path], sizer: Sizer, paths: Sequence[Path], opts: ExplainOptions
                 ) -> dict[str, Any]:
    """What decides a run's maps, by the name a mismatch is reported with: a folder holding a run that differs in
    any of them is not resumed. The device and the number of devices are not part of it (they give the same
    maps)."""
    examples = {name: _sha256_lines([f"{p.name} {file_sha256(p)}" for p in list_images(folder)])
                for name, folder in concepts.items()}
    return {
        "checkpoint": {"sha256": checkpoint_sha},
        "methods": {m.name: params[m.name] for m in methods},
        "targets": spec.text,
        "concepts": {"examples": examples, "similarity": opts.similarity} if concepts else None,
        "image size": sizer.describe(),
        "batch size": opts.batch_size,
        "shard size": opts.shard_size,
        "dtype": opts.dtype,
        "panels": opts.panels,
        "input images": {"count": len(paths), "sha256": _sha256_lines([os.fspath(p) for p in paths])},
    }


@dataclass
class ShardJob:
    """What a process needs to explain shards of a run; picklable, since each process of `devices` gets a copy
    (methods by registry name, the targets as their spec, parsed against the head's classes in that process)."""

    checkpoint: str
    weights: str | None
    out: Path
    paths: list[Path]
    shard_size: int
    run: str
    methods: list[str]
    params: dict[str, dict[str, Any]]
    targets: str
    concept_names: list[str]
    vectors: Tensor | None  # [M, D] on the CPU
    similarity: str
    sizer: Sizer
    batch_size: int
    workers: int
    panels: bool
    dtype: str

    def folder(self) -> RunFolder:
        return RunFolder(self.out, self.shard_size, len(self.paths), run=self.run)

    def images_in(self, shards: Sequence[int]) -> int:
        folder = self.folder()
        return sum(b - a for a, b in map(folder.shard_range, shards))

    def worker(self, model, device: torch.device, panels: PanelWriter | None, warn: Callable[[str], None],
               bar) -> "ShardWorker":
        return ShardWorker(self, model, device, panels, warn, bar)


class ShardWorker:
    """Explains whole shards in this process: each shard's images in batches, then its tensors and manifest
    entries written (`RunFolder.write_shard`) once its panels are saved. `close` stops its image-reading threads."""

    def __init__(self, job: ShardJob, model, device: torch.device, panels: PanelWriter | None,
                 warn: Callable[[str], None], bar):
        self.job, self.device, self.panels, self.warn, self.bar = job, device, panels, warn, bar
        self.folder = job.folder()
        dc = model.backbone.data_config
        self.load = ImageLoader(dc["mean"], dc["std"], dc["interpolation"])
        methods = [registry.get(name) for name in job.methods]
        vectors = None if job.vectors is None else job.vectors.to(device)
        self.run = BatchRunner(model, methods, parse_targets(job.targets, model.classes), vectors, job.similarity,
                               job.params)
        self.results = Results(job.out, model.classes, job.concept_names, job.similarity, methods, job.params,
                               model.backbone, len(job.paths), panels, job.dtype)
        self.pool = ThreadPoolExecutor(max(1, job.workers), thread_name_prefix="explain-read")

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    def __call__(self, s: int) -> dict[str, Any]:
        """Explain and write shard s -> its marker."""
        a, b = self.folder.shard_range(s)
        items, skipped = plan(self.job.paths[a:b], self.job.sizer, self.load, self.warn, start=a)
        self.bar.update(len(skipped))
        for batch, loaded in prefetched(batches(items, self.job.batch_size), self.load, self.pool):
            good = []
            for it, (x, orig, err) in zip(batch, loaded):
                if err is None:
                    good.append((it, x, orig))
                    continue
                self.warn(f"skipped: {err}")
                skipped.append({"index": it.index, "path": path_text(it.path), "reason": err})
                self.bar.update(1)
            if good:
                x = torch.stack([g[1] for g in good]).to(self.device)  # [B, 3, H, W]
                with torch.enable_grad():  # Lightning predicts under no_grad; every method needs gradients
                    self.results.add_batch([(g[0], g[2]) for g in good], x, *self.run(x))
                self.bar.update(len(good))
        if self.panels is not None:
            self.panels.drain()
        arrays, records = self.results.take()
        return self.folder.write_shard(s, arrays, records, sorted(skipped, key=lambda k: k["index"]), self.job.dtype)


def explain_to_dir(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike = "explanations",
    options: ExplainOptions | None = None,
    *,
    warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
    **fields: Any,
) -> RunSummary:
    """Explain every image under `inputs` with the checkpoint's head; write panels/, maps/ (shards and their
    index), manifest.json and index.html into out_dir (panels=False: maps/ and manifest.json only). Unreadable
    images are skipped (warned, listed); the run fails only if none can be explained. A folder holding an earlier
    run of the same settings is resumed (`note` is told how far it got); one of other settings is refused.

    options: an `ExplainOptions`; keyword `fields` (any of its fields) build one, or override the given one.
    """
    t_start = time.perf_counter()
    bar_file = sys.stderr
    warn = warn or (lambda msg: tqdm.write(f"warning: {msg}", file=bar_file))
    note = note or (lambda msg: tqdm.write(msg, file=bar_file))
    opts = replace(options, **fields) if options is not None else ExplainOptions(**fields)
    chosen = parse_methods(opts.methods, note=warn)
    concept_folders = parse_concepts(opts.concepts)
    dev = torch.device("cpu") if opts.lightning else resolve_device(opts.device)
    trainer = prediction_trainer(opts.accelerator or "auto", opts.devices or 1) if opts.lightning else None
    out = Path(out_dir)
    paths = outside_of(list_images([os.fspath(p) for p in inputs]), out)
    render_processes = opts.render_processes
    if render_processes is None:
        render_processes = default_render_processes(len(paths))
    render_processes = render_processes if opts.panels and not opts.lightning else 0
    writer = PanelWriter(render_processes) if opts.panels and not opts.lightning else None  # starts while loading
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
        checkpoint_sha = file_sha256(Path(checkpoint))
        folder = RunFolder(out, opts.shard_size, len(paths))
        done = folder.open(run_identity(checkpoint_sha, chosen, params, spec, concept_folders, sizer, paths, opts))
        resumed = sum(len(m["images"]) for m in done.values())
        if folder.resumed:
            note(f"resuming: {resumed} of {len(paths)} images already explained")
        todo = [s for s in range(folder.n_shards) if s not in done]
        job = ShardJob(os.fspath(checkpoint), opts.weights, out, paths, opts.shard_size, folder.run,
                       [m.name for m in chosen], params, spec.text, concept_names,
                       None if vectors is None else vectors.detach().cpu(), opts.similarity, sizer, opts.batch_size,
                       opts.workers or min(4, os.cpu_count() or 1), opts.panels, opts.dtype)
        t_loop = time.perf_counter()
        if trainer is not None and todo:
            where = predict_shards(trainer, job, todo, opts.progress, warn)
        else:
            where = str(dev)
            with tqdm(total=job.images_in(todo), unit="img", desc="explaining", file=bar_file,
                      disable=not opts.progress or not bar_file.isatty(), dynamic_ncols=True) as bar:
                work = job.worker(model, dev, writer, warn, bar)
                try:
                    for s in todo:
                        work(s)
                finally:
                    work.close()
            if writer is not None:
                writer.close()
        finished = True
    finally:
        if writer is not None and not finished:
            writer.close(wait=False)
    seconds = time.perf_counter() - t_loop

    index_path, skipped = folder.finish({"classes": list(classes), "concepts": concept_names, "dtype": opts.dtype,
                                         "methods": [{"name": m.name, "class_specific": m.class_specific,
                                                      "takes_concepts": m.takes_concepts} for m in chosen]})
    explanations = load_explanations(out)
    if not explanations:
        first = skipped[0]["reason"] if skipped else "no inputs"
        raise DataError(f"no image could be explained: all {len(skipped)} inputs are unreadable (first: {first})")
    rate = (len(explanations) - resumed) / max(seconds, 1e-9)
    head = {
        "format": MANIFEST_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": {"path": path_text(Path(checkpoint).resolve()), "sha256": checkpoint_sha,
                       "classes": list(classes), "head": model.meta.get("head")},
        "backbone": {**backbone.identity, "patch_size": patch, "num_prefix_tokens": backbone.num_prefix_tokens,
                     "embed_dim": backbone.embed_dim, "num_heads": backbone.num_heads, "data_config": dc},
        "image_size": sizer.describe(),
        "device": where,
        "targets": spec.text,
        "concepts": concept_info,
        "similarity": opts.similarity,
        "methods": [{"name": m.name, "label": m.label, "description": m.description, "params": params[m.name],
                     "rows": "one per image" if not m.class_specific else
                     ("targets, then concepts" if m.takes_concepts else "targets")} for m in chosen],
        "maps": {"format": STORE_FORMAT, "dir": MAPS_DIR, "index": f"{MAPS_DIR}/{INDEX_FILE}", "dtype": opts.dtype,
                 "shard_size": opts.shard_size, "shards": folder.n_shards, "layout": MAPS_LAYOUT,
                 "read_with": "cdam_pl.load_explanations(out_dir)"},
        "timing": {"seconds": round(seconds, 3), "explained": len(explanations) - resumed, "resumed": resumed,
                   "images_per_second": round(rate, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
                   "batch_size": opts.batch_size, "render_processes": render_processes},
        "versions": versions(),
    }
    records = (e.record for e in explanations.values())
    files = {"maps": index_path, "manifest": write_manifest(out / "manifest.json", head, records, skipped)}
    if opts.panels:
        files["index"] = write_gallery(out / "index.html", head, (e.record for e in explanations.values()),
                                       len(explanations), skipped)
        files["panels"] = out / "panels"
    (out / OLD_MAPS).unlink(missing_ok=True)  # an earlier version's single file, superseded by maps/
    return RunSummary(out, len(explanations), skipped, seconds, rate, [m.name for m in chosen], files, resumed)


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
