#!/usr/bin/env bash
# One prepared GPU check: measured CUDA memory of real training steps vs memplan's estimate.
# Uses whatever torch/transformers the machine has; extra wheels from .whl/ if present (benchmarks/gpu_wheels.sh).
#   bash benchmarks/gpu_check.sh [OUT_DIR] [PASS [case ...]]
# PASS fresh (the default; ~7 min): reserved memory and NVML's total as a fresh process sees them, each case in a
#   process of its own: the first twelve cases with the default allocator and with expandable segments (34-45),
#   cases 0, 5 and 10 under DDP over a one-rank NCCL group (46-48), DeepSpeed ZeRO-1/2 and ZeRO-Offload on one
#   GPU (49-53) and ZeRO-3 (54-55): what the estimate's reserved figure predicts (benchmarks/allocator_check.py
#   compares them).
# PASS main: every case in one process (allocated per phase, the breakdown, step times), then memplan train's
#   throughput against HF Trainer. Each pass fits one device call; rows are appended as they are measured.
set -u
out=${1:-${OUT:-benchmarks/results}}
pass=${2:-fresh}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  # each distribution once, the wheel that fits this Python chosen by pip
  names=$(ls .whl/*.whl | xargs -n 1 basename | cut -d- -f1 | sort -u)
  python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $names && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$out/nvidia-smi.csv"
case "$pass" in
  fresh)
    cases=("${@:3}")
    [ ${#cases[@]} -gt 0 ] || cases=($(seq 0 11) $(seq 34 55))
    timeout 560 python3 benchmarks/gpu_check.py "$out/gpu_check_fresh.jsonl" --fresh "${cases[@]}" 2>&1 \
      | tee "$out/gpu_check_fresh.log" ;;
  main)
    timeout 420 python3 benchmarks/gpu_check.py "$out/gpu_check.jsonl" "${@:3}" 2>&1 | tee "$out/gpu_check.log"
    # memplan train vs HF Trainer on the GPU (demo-tiny; bounded so the pass stays within one device call)
    timeout 150 python3 benchmarks/train_throughput.py --device cuda --steps 20 --rounds 2 \
      --out "$out/train-throughput-cuda.txt" 2>&1 | tail -n 8 | tee "$out/train-throughput-cuda.log" ;;
  *) echo "PASS is fresh or main, not '$pass'"; exit 2 ;;
esac
