"""How fast `memplan recommend` searches: plans scored per second, and the CLI's wall time.

    python benchmarks/recommend_speed.py [--repeat 3]   ->  benchmarks/results/recommend-speed.txt

A plan is scored when the estimator and the time model both run on it ("scored"); "decided" also counts
the micro-batches the binary search settles without an estimate (memory grows with the micro-batch, so
one that fails rules out every larger one). Each search starts with an empty cache.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [
    # (model, method, gpu, gpus, nodes, seq_len, effective batch)
    ("llama-2-7b", "full", "a100-80gb", 4, 1, 2048, 64),
    ("llama-2-7b", "lora", "rtx4090-24gb", 1, 1, 2048, 32),
    ("llama-3-70b", "full", "h100-80gb", 8, 2, 4096, 256),
    ("mixtral-8x7b", "qlora", "a100-80gb", 2, 1, 2048, 32),
    ("qwen2.5-0.5b", "full", "l4-24gb", 1, 1, 1024, 16),
    ("qwen3-8b", "lora", "rtx4090-24gb", 1, 1, 2048, 32),  # one GPU, many plans near its limit
]
CLI = [sys.executable, "-m", "memplan", "recommend", "--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4",
       "--dataset-size", "50000", "--domain-shift", "high", "--json"]


def one_search(model: str, method: str, gpu: str, gpus: int, nodes: int, seq: int,
               batch: int) -> tuple[int, int, float, str]:
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator.phases import clear_replays
    from memplan.recommend.hardware import resolve_target
    from memplan.recommend.search import Scorer, Workload, search

    spec = resolve_model(model)
    target = resolve_target(gpu, None, gpus, nodes, 0.10)
    work = Workload(seq_len=seq, effective_batch=batch, examples_per_epoch=50_000, epochs=3)
    scorer = Scorer(spec, target)
    clear_replays()
    t0 = time.perf_counter()
    r = search(spec, model, method, target, work, "quality", scorer)
    elapsed = time.perf_counter() - t0
    best = r.best.family() if r.best else "no fit"
    return r.scored, r.considered, elapsed, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "recommend-speed.txt"))
    args = ap.parse_args()
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"# memplan recommend: search speed ({platform.processor() or platform.machine()}, {os.cpu_count()} "
             f"cores, load average {load:.1f} at the start; Python {platform.python_version()}; median of "
             f"{args.repeat} runs, cache cleared each run)", "",
             f"{'case':58} {'scored':>7} {'decided':>8} {'seconds':>8} {'scored/s':>9} {'decided/s':>10}  best plan"]
    total_scored = total_time = 0.0
    for case in CASES:
        runs = [one_search(*case) for _ in range(args.repeat)]
        scored, decided, _, best = runs[0]
        secs = statistics.median(r[2] for r in runs)
        total_scored += scored
        total_time += secs
        name = f"{case[0]} {case[1]} on {case[3]}x{case[2]}" + (f" x {case[4]} nodes" if case[4] > 1 else "") + \
            f", seq {case[5]}, batch {case[6]}"
        lines.append(f"{name:58} {scored:7d} {decided:8d} {secs:8.3f} {scored / secs:9.0f} "
                     f"{decided / secs:10.0f}  {best}")
    lines.append(f"\noverall: {total_scored / total_time:.0f} plans scored per second")
    walls = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        subprocess.run(CLI, cwd=ROOT, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    lines.append(f"CLI, cold process, tree + full-FT and method searches: `{' '.join(CLI[3:])}`: "
                 f"{statistics.median(walls):.2f} s (median)")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
