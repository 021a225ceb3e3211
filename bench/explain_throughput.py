"""Images per second of explain.py: ViT-S/16 at 224 px (random weights, linear head, 10 classes), top-3 CDAM.

    python bench/explain_throughput.py [--images 64] [--batch-size 16] [--device cpu] [--methods cdam]

Prints three numbers: the model alone (one `CDAM.explain` per batch: what the maps cost), the whole command
(reading, resizing, explaining, drawing the PNG panels, writing maps.npz, the manifest and the gallery), and the
whole command with --no-panels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(path: Path, name: str, img_size: int) -> None:
    """A cdam-pl checkpoint (head only + backbone identity) for a randomly initialised backbone."""
    import torch

    from cdam_pl.backbone import load_backbone
    from cdam_pl.module import HeadClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_backbone(name, weights=None, img_size=img_size)
    module = HeadClassifier(backbone, [f"class{k}" for k in range(10)])
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="cdam")
    p.add_argument("--model", default="vit_small_patch16_224.dino")
    p.add_argument("--img-size", type=int, default=224)
    args = p.parse_args()

    import torch

    from cdam_pl.checkpoint import load_checkpoint
    from cdam_pl.explain import CDAM
    from cdam_pl.report import explain_to_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "bench.ckpt", args.model, args.img_size)
        make_images(tmp / "imgs", args.images)

        model = load_checkpoint(tmp / "bench.ckpt", device=args.device)
        cdam = CDAM(model.backbone, model.head)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
        top3 = lambda logits: logits.topk(3, dim=1).indices  # noqa: E731
        cdam.explain(x, targets=top3)  # warm-up
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        reps = max(1, args.images // args.batch_size)
        for _ in range(reps):
            cdam.explain(x, targets=top3)
        sync()
        model_rate = reps * args.batch_size / (time.perf_counter() - t0)

        runs = {panels: explain_to_dir(tmp / "bench.ckpt", [tmp / "imgs"], tmp / f"out{panels}", panels=panels,
                                       render_processes=None, methods=args.methods, batch_size=args.batch_size,
                                       device=args.device, progress=False) for panels in (True, False)}
        processes = json.loads((tmp / "outTrue" / "manifest.json").read_text())["timing"]["render_processes"]
        print(f"{args.model} at {args.img_size} px, {args.device}, {torch.get_num_threads()} threads, "
              f"batch {args.batch_size}, top-3 {args.methods}, {args.images} photos")
        print(f"  model only (CDAM.explain):           {model_rate:8.2f} images/s")
        print(f"  explain.py, panels in {processes} processes: {runs[True].images_per_second:8.2f} images/s")
        print(f"  explain.py --no-panels:              {runs[False].images_per_second:8.2f} images/s")


if __name__ == "__main__":
    main()
