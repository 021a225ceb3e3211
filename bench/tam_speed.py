"""Token ablation map speed: batched removals against one forward per removed token, same process.

    python bench/tam_speed.py [--quick] [--device cpu|cuda]

ViT-S/14 (DINOv2 layout, random weights: speed does not depend on their values) at 112 px = 64 patch tokens, a
10-class linear head, 2 targets per image. Baseline: for every image and every patch token, one forward of the
sequence without that token (what a plain loop does). Goal: the batched TAM is at least 5x faster on CPU.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Row, timeit, main as bench_main  # noqa: E402
from cdam_pl.backbone import load_backbone  # noqa: E402
from cdam_pl.explain.tam import naive_token_ablation_map, token_ablation_map  # noqa: E402


def run(quick: bool = False, device: str = "cpu") -> list[Row]:
    if device == "cpu":
        torch.set_num_threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone("vit_small_patch14_dinov2", weights=None, img_size=112).to(device)
    head = torch.nn.Linear(backbone.embed_dim, 10).to(device).eval()
    b = 1 if quick else 2
    images = torch.randn(b, 3, 112, 112, device=device)
    targets = torch.tensor([[0, 1]] * b, device=device)
    rep = 1 if quick else 3
    fast = timeit(lambda: token_ablation_map(backbone, head, images, targets), repeat=rep, device=device)
    naive = timeit(lambda: naive_token_ablation_map(backbone, head, images, targets), repeat=rep, device=device)
    diff = (token_ablation_map(backbone, head, images, targets)
            - naive_token_ablation_map(backbone, head, images, targets)).abs().max().item()
    print(f"max |batched - naive| = {diff:.2e}")
    return [Row("tam_speed", f"TAM, {b} image(s) x 64 tokens, batched", fast,
                "one forward per removed token", naive, "<= 0.2x (5x faster)")]


if __name__ == "__main__":
    bench_main(run, __doc__)
