"""CDAM speed for pooled heads (backbone.pool = avg, cls+avg): ViT-S/16 at 224 px, batch 8, Linear(F, 1000).

    python bench/cdam_pooled_speed.py [--quick] [--device cpu|cuda]

A pooled feature reads every token after the last block, so the engine runs the last block for every query (not
the CLS query alone, as for a CLS head) and backpropagates through all of it. Baseline, timed in the same process:
a plain no-grad forward of backbone + head; every call is timed in turns with the others (best of 7 rounds; --quick:
3 rounds at 112 px). Random weights: speed does not depend on their values.

Beside each measured ratio stands a floor, the plainest exact computation: one plain forward, one forward of the
last block with autograd from T = norm1(z), and K backwards through the last block for activation gradients only
(dF/dT; no weight gradients), each a single target. It is timed as a row of its own, and
FLOPs (`torch.utils.flop_counter.FlopCounterMode`) of the floor and of the CDAM call are given as ratios to the
plain forward's. The engine can count fewer FLOPs than this floor: it reuses the forward's q, k, v projections
and its backward stops at them, never multiplying by the qkv weight.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, cpu_threads, flops, main, random_vit, timed_rounds  # noqa: E402
from cdam_pl.backbone import FrozenViT  # noqa: E402
from cdam_pl.explain import CDAM  # noqa: E402

POOLS = ("avg", "cls+avg")
GOALS = {1: "<= 1.3x", 10: "<= 2.3x"}  # ratio to the plain forward, by number of targets


def floor_pass(backbone: FrozenViT, head: torch.nn.Module, images: torch.Tensor, k: int) -> None:
    """The floor: a plain forward, the last block once more with autograd from T = norm1(z), then k backwards to T
    (one per target, activation gradients only: every weight is frozen)."""
    with torch.no_grad():
        z = backbone.run_blocks(backbone.embed(images), 0, -1)
        head(backbone.pool(backbone.run_blocks(z, -1)))
    block = backbone.model.blocks[-1]
    t = block.norm1(z).requires_grad_()
    x = z + block.ls1(block.attn(t.view_as(t)))  # a view: FlopCounterMode's module hooks refuse a leaf input
    x = x + block.ls2(block.mlp(block.norm2(x)))
    logits = head(backbone.pool(x))
    for c in range(k):
        torch.autograd.grad(logits[:, c].sum(), t, retain_graph=c + 1 < k)


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    cpu_threads(device)
    batch = 8 if device == "cpu" else 64
    size = 112 if quick else 224
    images = torch.randn(batch, 3, size, size, device=device)
    rep = 3 if quick else 7
    b = "cdam_pooled_speed"
    fwd = f"plain forward, batch {batch}"
    rows = []
    for pool in POOLS:
        backbone = random_vit("vit_small_patch16_224", size, device, pool=pool)
        head = torch.nn.Linear(backbone.feature_dim, 1000).to(device).eval().requires_grad_(False)
        cdam = CDAM(backbone, head)

        def plain():
            with torch.no_grad():
                head(backbone(images))

        fns = {"plain": plain}
        for k in GOALS:
            fns[f"cdam{k}"] = lambda k=k: cdam.class_maps(images, list(range(k)))
            fns[f"floor{k}"] = lambda k=k: floor_pass(backbone, head, images, k)
        n_flops = {name: flops(fn) for name, fn in fns.items()}  # also the warm-up call of each
        times = {name: min(ts) for name, ts in timed_rounds(fns, rep, device).items()}  # best of the rounds
        base = times["plain"]
        for k, goal in GOALS.items():
            ratio_f, floor_f = n_flops[f"cdam{k}"] / n_flops["plain"], n_flops[f"floor{k}"] / n_flops["plain"]
            floor_time = times[f"floor{k}"]
            what = f"{k} target{'s' if k > 1 else ''}, {pool} head"
            rows += [
                Row(b, f"CDAM, {what}", times[f"cdam{k}"], fwd, base,
                    f"{goal} (FLOPs {ratio_f:.2f}x; floor {floor_f:.2f}x FLOPs, {floor_time / base:.2f}x time)"),
                Row(b, f"floor: forward + last block with autograd + {k} activation-only backward"
                    f"{'s' if k > 1 else ''}, {pool} head", floor_time, fwd, base, f"(FLOPs {floor_f:.2f}x)"),
            ]
    return rows


if __name__ == "__main__":
    main(run, __doc__)
