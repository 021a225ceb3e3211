"""Images per second of explain.py: ViT-S/16 at 224 px (random weights, linear head, 10 classes), top-3 CDAM.

    python bench/explain_throughput.py [--images 64] [--batch-size 16] [--device cpu] [--methods cdam]
    python bench/run_all.py --only explain_throughput     # as ratios, into BENCHMARKS.md

Prints three numbers: the model alone (one `CDAM.explain` per batch: what the maps cost), the whole command
(reading, resizing, explaining, drawing the PNG panels, writing the maps, the manifest and the gallery), and the
whole command with --no-panels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(path: Path, name: str, img_size: int) -> None:
    """A cdam-pl checkpoint (head only + backbone identity) for a randomly initialised backbone."""
    import torch

    from bench.common import random_vit
    from cdam_pl.train.module import HeadClassifier

    module = HeadClassifier(random_vit(name, img_size), [f"class{k}" for k in range(10)])
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)


def make_images(folder: Path, n: int) -> None:
    """n photos: crops of scikit-image's bundled pictures at assorted sizes (JPEG, like a user's folder)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        Image.fromarray(img[y:y + ch, x:x + cw]).save(folder / f"photo_{i:03d}.jpg", quality=90)


def measure(images: int = 64, batch_size: int = 16, device: str = "cpu", methods: str = "cdam",
            model_name: str = "vit_small_patch16_224.dino", img_size: int = 224) -> dict[str, float]:
    """Seconds for `images` photos: the maps alone (CDAM.explain on tensors in memory), explain.py with panels,
    explain.py --no-panels (the command's explain loop: reading, resizing, explaining, drawing, writing)."""
    import torch

    from cdam_pl.checkpoint import load_checkpoint
    from cdam_pl.explain import CDAM
    from cdam_pl.report import explain_to_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "bench.ckpt", model_name, img_size)
        make_images(tmp / "imgs", images)

        model = load_checkpoint(tmp / "bench.ckpt", device=device)
        cdam = CDAM(model.backbone, model.head)
        x = torch.randn(batch_size, 3, img_size, img_size, device=device)
        top3 = lambda logits: logits.topk(3, dim=1).indices  # noqa: E731
        cdam.explain(x, targets=top3)  # warm-up
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        reps = max(1, images // batch_size)
        for _ in range(reps):
            cdam.explain(x, targets=top3)
        sync()
        model_s = (time.perf_counter() - t0) * images / (reps * batch_size)
        runs = {panels: explain_to_dir(tmp / "bench.ckpt", [tmp / "imgs"], tmp / f"out{panels}", panels=panels,
                                       render_processes=None, methods=methods, batch_size=batch_size,
                                       device=device, progress=False) for panels in (True, False)}
        processes = json.loads((tmp / "outTrue" / "manifest.json").read_text())["timing"]["render_processes"]
    return {"model": model_s, "panels": runs[True].seconds, "no_panels": runs[False].seconds,
            "processes": processes, "threads": torch.get_num_threads()}


def run(quick: bool = False, device: str = "cpu"):
    """Rows for bench/run_all.py: explain.py's loop against the maps alone, same images, same process."""
    from bench.common import Row, cpu_threads

    cpu_threads(device)
    n, batch = (16, 8) if quick else (64, 16)
    if device != "cpu":
        n, batch = (256, 64) if quick else (1024, 64)
    m = measure(n, batch, device)
    where = f"in {m['processes']} processes" if m["processes"] else "inline (explain.py's default here)"
    base = f"CDAM.explain alone, top-3, on {n} images in memory ({n / m['model']:.1f} images/s)"
    what = f"explain.py, ViT-S/16 @224 px, top-3 CDAM, {n} JPEG photos"
    return [
        Row("explain_throughput", f"{what}, --no-panels ({n / m['no_panels']:.1f} images/s)", m["no_panels"], base,
            m["model"], "<= 1.5x (reading and writing cost at most half the maps' time)"),
        Row("explain_throughput", f"{what}, with PNG panels drawn {where} ({n / m['panels']:.1f} images/s)",
            m["panels"], base, m["model"]),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="cdam")
    p.add_argument("--model", default="vit_small_patch16_224.dino")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args()
    m = measure(args.images, args.batch_size, args.device, args.methods, args.model, args.img_size)
    n = args.images
    print(f"{args.model} at {args.img_size} px, {args.device}, {m['threads']} threads, "
          f"batch {args.batch_size}, top-3 {args.methods}, {n} photos")
    print(f"  model only (CDAM.explain):           {n / m['model']:8.2f} images/s")
    print(f"  explain.py, panels in {m['processes']} processes: {n / m['panels']:8.2f} images/s")
    print(f"  explain.py --no-panels:              {n / m['no_panels']:8.2f} images/s")


if __name__ == "__main__":
    main()
