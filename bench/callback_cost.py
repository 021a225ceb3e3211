"""Cost of the explanation callback per logging epoch, as a ratio to a plain forward of the tracked images.

    python bench/callback_cost.py [--quick] [--device cpu|cuda]

Setting: ViT-S/16 at 224 px (random weights: speed does not depend on their values), a 10-class linear head,
8 tracked images, top_k = 3 (4 class maps: true + top-3), 1 user concept + class-mean concepts of the 8 images'
classes (9 concept maps), attention map, token-deletion scores with 4 random sets. Baseline, timed in the same
process and in turns with the rest: a plain no-grad forward (backbone + head) of the 8 images. On the CPU the main
figures are best-of process CPU time (robust on a shared machine), wall-clock rows follow; on a GPU, wall time.
--quick: the same at 112 px (49 tokens), 3 rounds instead of 7.

Rows:
- maps only: the one `CDAM.explain` call (every map of every tracked image from one forward).
- per-epoch work, steady: maps + scalars when the top-CDAM token sets are unchanged since the last step (the
  removed-token embeddings are cached: they do not depend on the head).
- per-epoch work, worst: maps + scalars when every image's top set changed since the last step (the cached top
  sets are dropped before each call), so the step also runs the 8 top-deleted sequences through the backbone.
- step 0: the first step also embeds the 8 x 4 random-deletion sequences (once per fit).
- + pictures and TensorBoard: the steady step including 24 panels (matplotlib) and the event-file writes.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, cpu_threads, random_vit  # noqa: E402
from bench.common import main as bench_main  # noqa: E402
from cdam_pl.explain import CDAM  # noqa: E402
from cdam_pl.metrics import num_deleted, random_tokens  # noqa: E402
from cdam_pl.train.callbacks import ExplanationCallback  # noqa: E402
from cdam_pl.train.explained import Explained  # noqa: E402

N_IMAGES, N_CLASSES, TOP_K = 8, 10, 3


class _Images(list):
    """A stand-in training set of (image, label) pairs with `.targets`, for the class-mean concepts."""

    def __init__(self, items):
        super().__init__(items)
        self.targets = [y for _, y in items]


def interleaved(fns: dict, repeat: int, device: str = "cpu") -> tuple[dict, dict]:
    """Best-of-`repeat` wall time and process CPU time of each function, timed in turns after one warm-up round,
    so every function sees the same background load. On a shared CPU machine the CPU-time ratios are the stable
    figures (other processes stretch wall time, not the work done); on a GPU use the wall times."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    wall = {k: float("inf") for k in fns}
    cpu = {k: float("inf") for k in fns}
    for r in range(repeat + 1):
        for k, fn in fns.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            if r:
                wall[k] = min(wall[k], time.perf_counter() - w0)
                cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu

def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    cpu_threads(device)
    size = 112 if quick else 224
    backbone = random_vit("vit_small_patch16_224", size, device)
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(backbone.embed_dim, N_CLASSES).to(device).eval()
    images = torch.randn(N_IMAGES, 3, size, size, generator=g)
    labels = list(range(N_IMAGES))
    train = _Images([(torch.randn(3, size, size, generator=g), c) for c in range(N_IMAGES) for _ in range(2)])
    cb = ExplanationCallback(images=images, labels=labels, classes=[f"class {c}" for c in range(N_CLASSES)],
                             top_k=TOP_K, concepts={"stripes": torch.randn(2, 3, size, size, generator=g)},
                             class_mean_data=train)
    module = SimpleNamespace(backbone=backbone, head=head)
    model = Explained(backbone, head, trains_backbone=False)  # what the callback finds in a LightningModule
    log_dir = tempfile.mkdtemp(prefix="callback_cost_")
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = SimpleNamespace(loggers=[TensorBoardLogger(log_dir, name="bench")], train_dataloader=None,
                              default_root_dir=log_dir)
    cb._prepare(trainer, backbone)
    vectors = cb._vectors
    x = images.to(device)
    y = torch.tensor(labels, device=device)

    def plain():
        with torch.no_grad():
            head(backbone(x))

    def maps_only():
        CDAM(backbone, head).explain(
            x, targets=lambda logits: torch.cat([y[:, None], logits.topk(TOP_K, dim=1).indices], 1),
            concepts=vectors, attention=True)

    gh, gw = backbone.grid_size(size, size)
    random_sets = random_tokens(N_IMAGES, gh * gw, num_deleted(gh * gw, cb.deletion_fraction), cb.n_random,
                                torch.Generator().manual_seed(cb.seed))  # the callback's (seeded) random sets
    random_keys = {(i, s.numpy().tobytes()) for i in range(N_IMAGES) for s in random_sets[i]}

    counts = {"worst": [], "step0": []}  # backbone sequences each call had to run

    def explain(kind, store):
        cb._removed._store = store
        before = cb._removed.computed
        cb.explain(backbone, head)
        counts[kind].append(cb._removed.computed - before)

    def worst():  # forget the cached top sets: as if every image's top set had changed
        explain("worst", {k: v for k, v in cb._removed._store.items() if k in random_keys})

    def first_step():  # nothing cached
        explain("step0", {})

    def with_pictures():
        cb._log(trainer, module, step=1, model=model)

    cb.explain(backbone, head)  # the random-deletion embeddings are cached from here on
    fns = {"plain": plain, "maps": maps_only, "steady": lambda: cb.explain(backbone, head), "worst": worst,
           "step0": first_step, "pictures": with_pictures}
    try:
        wall, cpu = interleaved(fns, repeat=3 if quick else 7, device=device)
        n_panels = len(cb.panels(cb.last))
    finally:
        trainer.loggers[0].experiment.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    clock = "wall" if device != "cpu" else "CPU time"
    best = wall if device != "cpu" else cpu
    b = "callback_cost"
    fwd = f"plain forward of the {N_IMAGES} tracked images ({clock})"
    m = len(cb.concept_names)
    names = {
        "maps": f"maps only: 1 CDAM.explain ({1 + TOP_K} class + {m} concept maps + attention)",
        "steady": "per-epoch work, steady (token sets unchanged)",
        "worst": f"per-epoch work, worst ({max(counts['worst'])} top-deleted sequences re-run)",
        "step0": f"step 0 ({max(counts['step0'])} token-deleted sequences, once per fit)",
        "pictures": f"steady + {n_panels} panels + TensorBoard writes",
    }
    goals = {"steady": "<= 1.5x", "worst": "<= 1.5x"}
    rows = [Row(b, names[k], best[k], fwd, best["plain"], goals.get(k, "")) for k in names]
    if device == "cpu":  # wall-clock figures too, for reference
        rows += [Row(b, names[k] + " [wall]", wall[k], fwd.replace("CPU time", "wall"), wall["plain"]) for k in names]
    return rows


if __name__ == "__main__":
    bench_main(run, __doc__)
