"""How fast `memplan estimate` answers: cold CLI wall time (median of N runs) and estimates per second.

    python benchmarks/estimate_speed.py [--runs 15]

Cold = a new Python process running `python -m memplan estimate ...` end to end, as a user waits for it;
the same process is checked not to import torch or transformers. The interpreter's own start-up
(`python -c pass`) and the import of pydantic's BaseModel (the Plan's base) are measured side by side,
since together they bound what the CLI can reach. Python writes its bytecode cache as it does for
any user (PYTHONDONTWRITEBYTECODE is cleared), and one unmeasured run warms that cache first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import pydantic.BaseModel": [sys.executable, "-c", "from pydantic import BaseModel"],
    "estimate table (llama-7b, 4 GPUs)": [sys.executable, "-m", "memplan", "estimate", "--model", "llama-7b",
                                          "--gpus", "4"],
    "estimate one plan --json": [sys.executable, "-m", "memplan", "estimate", "--model", "llama-3-8b",
                                 "--method", "lora", "--gpu", "h100-80gb", "--json"],
}


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cold(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=ENV)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=ENV)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_second() -> float:
    sys.path.insert(0, str(ROOT))
    from memplan.estimator import estimate
    from memplan.models import resolve_model
    from memplan.plan import Plan

    spec, plan = resolve_model("llama-2-7b"), Plan(method="lora", precision="bf16")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        estimate(spec, plan)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    check = subprocess.run([sys.executable, "-c", "import sys; from memplan.cli import main\ntry:\n main(['estimate',"
                            "'--model','llama-7b','--json'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, check=True)
    print(f"torch imported by the estimate path: {check.stdout.strip().splitlines()[-1]}")
    for name, cmd in COMMANDS.items():
        print(f"{name:40} median {cold(cmd, args.runs) * 1000:7.0f} ms over {args.runs} runs")
    print(f"{'estimates per second (one process)':40} {per_second():7.0f}")


if __name__ == "__main__":
    main()
