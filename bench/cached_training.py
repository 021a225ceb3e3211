"""Head training from an on-disk feature cache vs a bare PyTorch loop on the same tensors, same run.

    python bench/cached_training.py [--quick] [--device cpu|cuda]

A synthetic float16 cache of N x 384 features (1M; --quick 200k), written shard by shard with the cache's own
writer (`FeatureCache.prepare_build` / `ShardBuffer` / `finish_build`) into a temp dir. One epoch of a
Linear(384, 1000) head (forward, cross-entropy, backward, AdamW step) at batch 4096, three ways:
  (a) our cache loader (`FeatureCache.loader`: seeded permutation, batched gathers from the memmaps);
  (b) the baseline: a bare loop over the same features preloaded as one float32 tensor in RAM, batches taken by
      slicing a `torch.randperm` and indexing the tensor;
  (c) Lightning `Trainer.fit` of `HeadClassifier` on the cache loader (logging, metrics, LR schedule included).
Goal: (a) keeps at least 50% of (b)'s throughput. On CUDA, both copy each batch from host memory to the
GPU (the cache loader with 4 worker processes), so the baseline is still "the same tensors, bare loop".
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row  # noqa: E402
from bench.common import main as bench_main  # noqa: E402
from cdam_pl.features import FeatureCache, cache_key  # noqa: E402

DIM, CLASSES, BATCH = 384, 1000, 4096
N_FULL, N_QUICK = 1_000_000, 200_000


def write_synthetic_cache(root: Path, n: int, seed: int = 0, shard_size: int = 4096) -> FeatureCache:
    """n x DIM float16 features (class means + noise, so the head has something to learn) and int64 labels,
    written with the cache's own shard writer; generated shard by shard, so RAM stays at one shard."""
    key = cache_key({"bench": "synthetic", "n": n, "dim": DIM, "classes": CLASSES, "seed": seed}, "none", [])
    plan = FeatureCache.prepare_build(root, key, n, dim=DIM, dtype="float16", shard_size=shard_size)
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(CLASSES, DIM, generator=g)
    for s in plan.todo:
        a, b = plan.shard_range(s)
        y = torch.randint(0, CLASSES, (b - a,), generator=g)
        buf = plan.buffer(s)
        buf.add(means[y] + torch.randn(b - a, DIM, generator=g), y)
        buf.write()
    return FeatureCache.finish_build(plan, wait=0)


def make_head(device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    head = torch.nn.Linear(DIM, CLASSES).to(device)
    return head, torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)


def train_epoch(batches, device: str) -> tuple[float, int]:
    """Seconds and samples of one pass over `batches` (an iterable of (x [b, D], y [b]) on the host)."""
    head, opt = make_head(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0, seen = time.perf_counter(), 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    sync()
    return time.perf_counter() - t0, seen


def bare_batches(features: torch.Tensor, labels: torch.Tensor, seed: int = 0):
    """The baseline's batches: a randperm of the in-RAM tensor, sliced (no DataLoader, no memmap)."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(perm), BATCH):
        idx = perm[i : i + BATCH]
        yield features[idx], labels[idx]


class EpochTimer(L.Callback):
    """Wall time of each training epoch, from `on_train_epoch_start` to `on_train_epoch_end`."""

    def __init__(self, device: str = "cpu"):
        self.seconds: list[float] = []
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sync()
        self.seconds.append(time.perf_counter() - self.t0)


def lightning_epoch(cache: FeatureCache, device: str, num_workers: int) -> float:
    """One epoch of `Trainer.fit(HeadClassifier)` on the cache loader, timed from epoch start to epoch end."""
    from cdam_pl.backbone import load_backbone
    from cdam_pl.train.module import HeadClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stub = load_backbone("vit_small_patch16_224", weights=None, img_size=32, depth=1)  # D=384; never run
        module = HeadClassifier(stub, [f"c{k}" for k in range(CLASSES)], head={"kind": "linear"},
                                optim={"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4})
        timer = EpochTimer(device)
        trainer = L.Trainer(max_epochs=1, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[timer])
        loader = cache.loader(batch_size=BATCH, shuffle=True, seed=0, num_workers=num_workers)
        trainer.fit(module, train_dataloaders=loader)
    return timer.seconds[0]


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    n = N_QUICK if quick else N_FULL
    workers = 4 if device.startswith("cuda") else 0
    with tempfile.TemporaryDirectory(prefix="cdam_bench_cache_") as tmp:
        t0 = time.perf_counter()
        cache = write_synthetic_cache(Path(tmp), n)
        t_write = time.perf_counter() - t0
        features, labels = cache.features(slice(None)), torch.from_numpy(cache.labels.copy())  # [n, D] f32, [n]

        # Warm-up (allocator, kernels) on a few batches of each path; then one timed epoch each.
        warm = 5 * BATCH
        train_epoch(bare_batches(features[:warm], labels[:warm]), device)
        t_bare, n_bare = train_epoch(bare_batches(features, labels), device)
        loader = cache.loader(batch_size=BATCH, shuffle=True, seed=0, num_workers=workers)
        t_cache, n_cache = train_epoch(loader, device)
        t_fit = lightning_epoch(cache, device, workers)
        del features
    assert n_bare == n_cache == n
    rate = lambda t: f"{n / t / 1e3:.0f}k samples/s"  # noqa: E731
    b = "cached_training"
    base = f"bare loop, float32 tensor in RAM ({rate(t_bare)})"
    what = f"1 epoch, {n // 1000}k x {DIM} fp16 cache, Linear({DIM}, {CLASSES}), batch {BATCH}"
    print(f"  [cached_training] wrote the {n // 1000}k-row cache in {t_write:.1f} s", file=sys.stderr)
    return [
        Row(b, f"cache loader + head step, {what} ({rate(t_cache)})", t_cache, base, t_bare,
            "<= 2x (>= 50% of its throughput)"),
        Row(b, f"Lightning fit of HeadClassifier on the cache, {what} ({rate(t_fit)})", t_fit, base, t_bare,
            "<= 2x (>= 50% of its throughput)"),
    ]


if __name__ == "__main__":
    bench_main(run, __doc__)
