#!/usr/bin/env bash
# One prepared GPU check: measured CUDA memory of real training steps vs memplan's estimate.
# Uses whatever torch/transformers the machine has; extra wheels (pydantic, bitsandbytes) from .whl/ if present.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
out=${1:-${OUT:-benchmarks/results}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$out/nvidia-smi.csv"
python3 benchmarks/gpu_check.py "$out/gpu_check.jsonl" "${@:2}" 2>&1 | tee "$out/gpu_check.log"
# memplan train vs HF Trainer on the GPU (demo-tiny; bounded so the whole check stays within its budget)
timeout 150 python3 benchmarks/train_throughput.py --device cuda --steps 20 --rounds 2 \
  --out "$out/train-throughput-cuda.txt" 2>&1 | tail -n 8 | tee "$out/train-throughput-cuda.log"
