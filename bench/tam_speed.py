"""Token ablation map speed: batched removals against one forward per removed token, same process.

    python bench/tam_speed.py [--quick] [--device cpu|cuda]

Two models, random weights (speed does not depend on their values), a 10-class linear head, 2 targets per image:
  - ViT-S/14 (DINOv2 layout) at 112 px = 64 patch tokens, the demo's backbone: compute-bound;
  - a depth-2, 64-d ViT/16 at 64 px = 16 patch tokens, the size the tests use: bound by per-call overhead.
Baseline: for every image and every patch token, one forward of the sequence without that token (what a plain loop
does). Goal: the batched TAM is at least 5x faster on CPU.

Both do exactly the same arithmetic (every ablated sequence is a different input from the first block on, so no
exact method shares work between them beyond the first block's QKV projections), so batching can only win what the
per-token loop leaves of the machine's arithmetic rate. The last rows make that bound explicit: FLOPs counted with
torch's FlopCounterMode, divided by the measured times, against a large matmul's rate in the same process.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, counted, cpu_threads, random_vit, timeit  # noqa: E402
from bench.common import main as bench_main  # noqa: E402
from cdam_pl.explain.tam import naive_token_ablation_map, token_ablation_map  # noqa: E402

MODELS = {  # label: (timm name, image size, overrides, images (full, quick), timing repeats (full, quick))
    "ViT-S/14 @112 px, 64 tokens": ("vit_small_patch14_dinov2", 112, {}, (2, 1), (3, 1)),
    "depth-2 64-d ViT/16 @64 px, 16 tokens": ("vit_small_patch16_224", 64, dict(depth=2, embed_dim=64, num_heads=4),
                                              (8, 2), (3, 3)),  # its loop takes milliseconds
}


def matmul_rate(device: str, n: int = 1024) -> float:
    """FLOP/s of one large float32 matmul: what the machine's BLAS reaches at its best."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / timeit(lambda: a @ b, repeat=5, device=device)


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    cpu_threads(device)
    rows: list[Row] = []
    peak = matmul_rate(device)
    for label, (name, size, overrides, counts, repeats) in MODELS.items():
        n_img, rep = (counts[1], repeats[1]) if quick else (counts[0], repeats[0])
        backbone = random_vit(name, size, device, **overrides)
        head = torch.nn.Linear(backbone.embed_dim, 10).to(device).eval()
        images = torch.randn(n_img, 3, size, size, device=device)
        targets = torch.tensor([[0, 1]] * n_img, device=device)
        fast_fn = lambda: token_ablation_map(backbone, head, images, targets)  # noqa: E731
        naive_fn = lambda: naive_token_ablation_map(backbone, head, images, targets)  # noqa: E731
        fast, naive = timeit(fast_fn, repeat=rep, device=device), timeit(naive_fn, repeat=rep, device=device)
        (got, f_fast), (ref, f_naive) = counted(fast_fn), counted(naive_fn)
        diff = (got - ref).abs().max().item()
        print(f"{label}: max |batched - naive| = {diff:.2e}; FLOPs batched {f_fast / 1e9:.2f} G, "
              f"per-token loop {f_naive / 1e9:.2f} G; large matmul {peak / 1e9:.0f} GFLOP/s; "
              f"loop {f_naive / naive / 1e9:.0f} GFLOP/s, batched {f_fast / fast / 1e9:.0f} GFLOP/s")
        rows.append(Row("tam_speed", f"TAM, {label}, {n_img} image(s), batched", fast,
                        "one forward per removed token", naive, "<= 0.2x (5x faster)"))
        # The best any exact batching can do: the loop's arithmetic at the large-matmul rate.
        rows.append(Row("tam_speed", f"bound for {label}: the loop's FLOPs at the large-matmul rate "
                        f"({peak / 1e9:.0f} GFLOP/s)", f_naive / peak, "one forward per removed token", naive,
                        "(lowest ratio exact batching can reach)"))
    return rows


if __name__ == "__main__":
    bench_main(run, __doc__)
