#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md, as one short script for a session that has a CUDA device.
#
#   bash bench/gpu.sh                 # writes bench/results/*_gpu*.json (about 3-5 minutes on one H100)
#   PYTHON=/path/to/venv/bin/python OUT=/tmp/out bash bench/gpu.sh
#
# It needs the project installed (pip install -e .) in $PYTHON's environment; nothing is
# downloaded. Each step prints one JSON object and also writes it under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "bench/gpu.sh: no CUDA device visible to torch"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF

# 1. Step cost: the paper-scale setting, ResNet-18 (CIFAR style), batch 512, float16 autocast.
"$PY" bench/step.py --device cuda --model resnet18 --batch-size 512 --amp --steps 20 --repeats 5 \
    --json "$OUT/step_gpu_resnet18_b512_amp.json"
# 2. Read speed with sattrain's split on the GPU (batches indexed on the device).
"$PY" bench/read.py --device cuda --samples 50000 --batch-size 256 --repeats 3 \
    --json "$OUT/read_gpu.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_device.csv" || true
echo "bench/gpu.sh: wrote $OUT/step_gpu_resnet18_b512_amp.json $OUT/read_gpu.json"
