"""CDAM for many targets at once: 1 to 1,000 classes of one batch, against a plain forward in the same process.

    python bench/cdam_targets_speed.py [--quick] [--device cpu|cuda]

Full: ViT-S/16 at 224 px, batch 8, random weights (speed does not depend on their values), heads with 1,000
classes: Linear(384, 1000) on the CLS token for 1, 10, 100 and 1,000 targets; an MLP head (hidden 1024, GELU);
Smooth CDAM (50 samples) of 1 and of 1,000 targets; and linear heads on pooled features (avg, cls+avg) for 100
and 1,000 targets. --quick: the same rows on ViT-Ti/16 at 112 px (D = 192, 49 patch tokens), 10 samples, except
the pooled heads: avg only, 100 targets only (1,000 targets there cost ~18 forwards' worth of FLOPs).

Timing: every group of calls is timed in rounds, one call of each per round, with its own plain no-grad forward of
backbone + head in the same rounds; each figure is the median over the rounds (a busy spell on a shared machine
slows one round of every call rather than every call of one). The load average over the group is in its
baseline's name.

Beside each ratio stands its FLOP floor: the call's floating-point operations
(`torch.utils.flop_counter.FlopCounterMode`, forward- and reverse-mode matmuls, attention) over the plain
forward's, i.e. the ratio the call would reach if it did its arithmetic at the plain forward's FLOP rate. The
measured ratio over the floor ("time/floor") says how much goes to everything else (memory-bound elementwise
work, Python). The plain forward itself (1.00x) is the floor of any exact method: the maps need its activations.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, cpu_threads, flops, main, random_vit, timed_rounds  # noqa: E402
from cdam_pl.explain import CDAM  # noqa: E402
from cdam_pl.heads import build_head  # noqa: E402

CLASSES = 1000
GOALS = {1: "<= 1.05x (before: 0.94x)", 10: "<= 1.1x (before: 1.05x)", 100: "<= 1.15x (before: 2.0-2.3x)",
         1000: "<= 1.5x (before: 14-19x)"}  # linear head on the CLS token, ratio to the plain forward
MLP_GOAL = "<= 2x"  # MLP head, 1,000 targets


def group(b: str, title: str, backbone, head, images, calls: dict[str, tuple[Callable[[], object], str]],
          rounds: int, device: str) -> list[Row]:
    """Time `calls` (name -> (fn, goal)) in rounds with a plain forward; one Row per call."""
    def plain():
        with torch.no_grad():
            head(backbone(images))

    fns = {"plain": plain, **{name: fn for name, (fn, _) in calls.items()}}
    n_flops = {name: flops(fn) for name, fn in fns.items()}  # also the warm-up call of each
    load0 = os.getloadavg()[0]
    times = {name: statistics.median(ts) for name, ts in timed_rounds(fns, rounds, device).items()}
    load1 = os.getloadavg()[0]
    base = times["plain"]
    baseline = (f"plain forward, batch {images.shape[0]} (median of {rounds} rounds; load average "
                f"{load0:.1f} -> {load1:.1f})")
    rows = []
    for name, (_, goal) in calls.items():
        floor = n_flops[name] / n_flops["plain"]
        ratio = times[name] / base
        note = f"FLOP floor {floor:.2f}x, time/floor {ratio / floor:.2f}"
        rows.append(Row(b, f"{name}, {title}", times[name], baseline, base, f"{goal} ({note})" if goal else note))
    return rows


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    cpu_threads(device)
    torch.manual_seed(0)
    name, size = ("vit_tiny_patch16_224", 112) if quick else ("vit_small_patch16_224", 224)
    batch = 8 if device == "cpu" else 64
    images = torch.randn(batch, 3, size, size, device=device)
    rounds, slow_rounds = (3, 3) if quick else (7, 5)
    n_samples = 10 if quick else 50
    b = "cdam_targets_speed"
    arch = f"{'ViT-Ti/16 @112 px' if quick else 'ViT-S/16 @224 px'}, {CLASSES} classes"
    rows = []

    def targets(k):
        return list(range(k))

    # Linear head on the CLS token: the goals.
    backbone = random_vit(name, size, device)
    d = backbone.feature_dim
    linear = torch.nn.Linear(d, CLASSES).to(device).eval().requires_grad_(False)
    cdam = CDAM(backbone, linear)
    calls = {f"CDAM, {k} target{'s' if k > 1 else ''}": (lambda k=k: cdam.class_maps(images, targets(k)), GOALS[k])
             for k in GOALS}
    rows += group(b, f"linear head, {arch}", backbone, linear, images, calls, rounds, device)

    # MLP head: the head's Jacobian at each image's feature (forward mode past F targets).
    mlp = build_head("mlp", d, CLASSES, hidden=[1024]).to(device).eval().requires_grad_(False)
    cdam_mlp = CDAM(backbone, mlp)
    calls = {"CDAM, 100 targets": (lambda: cdam_mlp.class_maps(images, targets(100)), ""),
             "CDAM, 1000 targets": (lambda: cdam_mlp.class_maps(images, targets(1000)), MLP_GOAL)}
    rows += group(b, f"MLP head (hidden 1024, GELU), {arch}", backbone, mlp, images, calls, rounds, device)

    # Smooth CDAM: the per-image work once per sample.
    calls = {f"Smooth CDAM, {n_samples} samples, {k} target{'s' if k > 1 else ''}":
             (lambda k=k: cdam.class_maps(images, targets(k), variant="smooth", n_samples=n_samples), "")
             for k in (1, CLASSES)}
    rows += group(b, f"linear head, {arch}", backbone, linear, images, calls, slow_rounds, device)

    # Pooled features: passes through the whole last block, min(patch tokens forward, K or F backward).
    for pool in ("avg",) if quick else ("avg", "cls+avg"):
        pooled = random_vit(name, size, device, pool=pool)
        head = torch.nn.Linear(pooled.feature_dim, CLASSES).to(device).eval().requires_grad_(False)
        cdam_pooled = CDAM(pooled, head)
        calls = {f"CDAM, {k} targets": (lambda k=k: cdam_pooled.class_maps(images, targets(k)), "")
                 for k in ((100,) if quick else (100, CLASSES))}
        rows += group(b, f"{pool} head (F = {pooled.feature_dim}), {arch}", pooled, head, images, calls,
                      slow_rounds, device)
    return rows


if __name__ == "__main__":
    main(run, __doc__)
