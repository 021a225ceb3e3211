"""CDAM engine speed: ViT-S/16 at 224 px, batch 8, against a plain forward and against the reference approach.

    python bench/cdam_speed.py [--quick] [--device cpu|cuda]

Baselines, timed in the same process: a plain no-grad forward of backbone + head, and the reference-notebook
approach (full backward to the input, one target per backward; `cdam_pl.explain.reference.naive_cdam`).
Random weights: speed does not depend on their values. --quick: 112 px, fewer repeats and reference passes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, cpu_threads, random_vit, timeit  # noqa: E402
from bench.common import main as bench_main  # noqa: E402
from cdam_pl.explain import CDAM  # noqa: E402
from cdam_pl.explain.reference import naive_cdam  # noqa: E402


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    cpu_threads(device)
    size = 112 if quick else 224
    backbone = random_vit("vit_small_patch16_224", size, device)
    head = torch.nn.Linear(backbone.embed_dim, 1000).to(device).eval()
    batch = 8 if device == "cpu" else 64
    images = torch.randn(batch, 3, size, size, device=device)
    cdam = CDAM(backbone, head)
    rep = 2 if quick else 5
    t = lambda fn, r=rep: timeit(fn, repeat=r, device=device)  # noqa: E731

    def plain():
        with torch.no_grad():
            head(backbone(images))

    ten = list(range(10))
    base = t(plain)
    one = t(lambda: cdam.class_maps(images, [0]))
    many = t(lambda: cdam.class_maps(images, ten))
    ref1 = t(lambda: naive_cdam(backbone, lambda e: head(e)[:, 0], images), max(1, rep // 2))
    n_ref = 3 if quick else 10
    ref10 = t(lambda: [naive_cdam(backbone, lambda e, k=k: head(e)[:, k], images) for k in ten[:n_ref]], 1)
    ref10 *= 10 / n_ref
    n = 10 if quick else 50
    smooth = t(lambda: cdam.class_maps(images, [0], variant="smooth", n_samples=n), max(1, rep // 2))
    n_full = 3 if quick else 10
    full = t(lambda: [naive_cdam(backbone, lambda e: head(e)[:, 0], images) for _ in range(n_full)], 1) * n / n_full
    b = "cdam_speed"
    fwd = f"plain forward, batch {batch}"
    return [
        Row(b, "CDAM, 1 target", one, fwd, base, "<= 1.25x"),
        Row(b, "CDAM, 10 targets", many, fwd, base, "<= 1.6x"),
        Row(b, "CDAM, 1 target", one, "reference, 1 target", ref1, "<= 0.5x (2x faster)"),
        Row(b, "CDAM, 10 targets", many, "reference, 10 targets (10 backwards)", ref10, "<= 0.125x (8x faster)"),
        Row(b, f"Smooth CDAM, {n} samples", smooth, f"{n} full forward+backward passes", full, "<= 0.125x (8x faster)"),
    ]


if __name__ == "__main__":
    bench_main(run, __doc__)
