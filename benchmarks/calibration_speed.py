"""How long the first estimate of a model without a family module takes: read from transformers' model on the
meta device, then one plan class calibrated by fake-tensor traces (memplan.estimator.calibrated).

    python benchmarks/calibration_speed.py [--runs 3] [--model-type cohere2] [--method lora]

Each run is a fresh Python process with an empty cache (MEMPLAN_CACHE_DIR in a temporary directory), so the
time includes importing torch and transformers, as a user's first `memplan estimate` does. The config is
70B-class: the shape of Llama-3-70B (data/models/llama-3-70b/config.json: hidden 8192, 80 layers, FFN
28672, 64 heads / 8 KV heads, vocabulary 128256) under the given model_type, whose own options keep their
config-class defaults (cohere2: a 4096 sliding window on three layers of four, so four layers are
traced). Printed: each run's wall time, the part the cache records (the model read, the calibration), the
median, and the machine's load average (os.getloadavg) around the runs. A second estimate of the same
plan class is timed too: it reads the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys, time
t0 = time.perf_counter()
from memplan.catalog import cache
from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.plan import Plan
config = json.loads(sys.argv[1])
spec = spec_from_config(config, "70b-class")
e = estimate(spec, Plan(method=sys.argv[2], precision="bf16", seq_len=2048))
entry = cache.load(spec.traits.calibrated)
classes = list(entry["classes"].values())
print(json.dumps({"wall": time.perf_counter() - t0, "build": entry["build_seconds"],
                  "calibration": sum(c["seconds"] for c in classes), "params": spec.params_total,
                  "peak": e.peak_allocated, "torch": "torch" in sys.modules}))
"""


def config(model_type: str) -> dict:
    shape = json.loads((ROOT / "data" / "models" / "llama-3-70b" / "config.json").read_text())
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "tie_word_embeddings")
    return dict({k: shape[k] for k in keep}, model_type=model_type, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def run_once(cfg: dict, method: str, cache_dir: str) -> dict:
    env = {**os.environ, "MEMPLAN_CACHE_DIR": cache_dir}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg), method], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process"] = time.perf_counter() - t0
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model-type", default="cohere2")
    ap.add_argument("--method", default="lora", choices=["full", "lora", "qlora"])
    args = ap.parse_args()
    cfg = config(args.model_type)
    load_before = os.getloadavg()
    firsts, again = [], None
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="memplan-calibration-") as cache_dir:
            first = run_once(cfg, args.method, cache_dir)
            firsts.append(first)
            print(f"run {i + 1}: first estimate {first['process']:.1f} s (in Python {first['wall']:.1f} s: model "
                  f"read {first['build']:.1f} s, calibration {first['calibration']:.1f} s; "
                  f"{first['params'] / 1e9:.1f} B parameters)", flush=True)
            if again is None:
                again = run_once(cfg, args.method, cache_dir)
    load_after = os.getloadavg()
    median = statistics.median(r["process"] for r in firsts)
    print(f"{args.model_type} 70B-class, {args.method}: median first estimate {median:.1f} s over {args.runs} runs "
          f"(calibration alone: median {statistics.median(r['calibration'] for r in firsts):.1f} s); "
          f"cached: {again['process']:.2f} s, torch imported: {again['torch']}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
