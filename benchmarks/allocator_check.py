"""The caching allocator model against what the H100 reserved: every stored gpu_check row, replayed.

For each row of benchmarks/results/gpu-h100-run*.jsonl (measured with benchmarks/gpu_check.py): the same plan's
step is traced at full size on fake tensors with CUDA's kernel memory (memplan.profile.trace, kernels="cuda"),
its allocations and frees in order are served by memplan.estimator.allocator (the default allocator, and
expandable segments), and the reserved peak after each of the 3 steps is set against the measured
`torch.cuda.max_memory_reserved`. The total adds the CUDA context (memplan.estimator.overhead) against NVML's
used memory. The estimate's own reserved figure (memplan estimate) is shown beside it.

    python benchmarks/allocator_check.py [--out benchmarks/results/allocator-h100.md] [case ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "benchmarks" / "results").glob("gpu-h100-run*.jsonl"))
GiB = 2**30


def rows(picks: set[int]) -> list[dict]:
    out = []
    for path in RUNS:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "case" in row and (not picks or row["case"] in picks) and row.get("measured"):
                out.append(dict(row, run=path.name))
    return out


def check(row: dict) -> dict:
    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.estimator.allocator import replay
    from memplan.estimator.overhead import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES
    from memplan.plan import Plan
    from memplan.profile.trace import trace_training

    plan = Plan(model=row["preset"], **row["plan"])
    t0 = time.perf_counter()
    traced = trace_training(str(models_dir() / row["preset"]), plan, steps=3, record_events=True, kernels="cuda")
    measured = [s["reserved"] for s in row["measured"]["steps"]]
    nvml = [s.get("nvml_used") for s in row["measured"]["steps"]]
    out = {"case": row["case"], "run": row["run"], "preset": row["preset"], "plan": row["plan"],
           "measured_reserved": measured, "measured_nvml": nvml,
           "measured_allocated": max(max(s[p] for p in ("forward", "backward", "optimizer"))
                                     for s in row["measured"]["steps"]),
           "traced_allocated": traced.peak + CUBLAS_WORKSPACE_BYTES,
           "estimate_reserved": estimate(resolve_model(row["preset"]), plan, kernels="cuda").reserved}
    for allocator in ("default", "expandable"):
        out[allocator] = replay(traced.events, allocator, workspace=CUBLAS_WORKSPACE_BYTES).step_reserved
    out["context"] = CUDA_CONTEXT_BYTES
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _err(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def table(results: list[dict]) -> str:
    lines = ["# The caching allocator model vs what an H100 reserved", "",
             "Measured: `benchmarks/results/gpu-h100-run1.jsonl`, `gpu-h100-run2.jsonl` (torch 2.11.0+cu130, H100 "
             "80GB HBM3, default allocator). Replayed: each plan's step traced at full size with CUDA's kernel "
             "memory (`trace_training(..., record_events=True, kernels=\"cuda\")`), its allocations served by "
             "`memplan.estimator.allocator` (benchmarks/allocator_check.py). Reserved = "
             "`torch.cuda.max_memory_reserved` after step 3; total = NVML's used memory vs reserved + the "
             "CUDA context (1251 MiB). error % = 100 x (predicted - measured) / measured.", "",
             "| # | model | plan | allocated GiB (measured / traced) | reserved GiB measured | replayed | error % "
             "| estimate (ratio) | error % | expandable (replayed) | NVML GiB | replayed total | error % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errs, ratio_errs = [], []
    for r in results:
        meas, rep = r["measured_reserved"][-1], r["default"][-1]
        plan = ", ".join(f"{k}={v}" for k, v in r["plan"].items())
        nvml = r["measured_nvml"][-1]
        total = rep + r["context"]
        e, er = _err(rep, meas), _err(r["estimate_reserved"], meas)
        errs.append(e)
        ratio_errs.append(er)
        lines.append(f"| {r['case']} | {r['preset']} | {plan} | {r['measured_allocated'] / GiB:.2f} / "
                     f"{r['traced_allocated'] / GiB:.2f} | {meas / GiB:.2f} | {rep / GiB:.2f} | {e:+.2f} | "
                     f"{r['estimate_reserved'] / GiB:.2f} | {er:+.2f} | {r['expandable'][-1] / GiB:.2f} | "
                     f"{nvml / GiB:.2f} | {total / GiB:.2f} | {_err(total, nvml):+.2f} |")
    lines += ["", f"Replayed reserved: median error {statistics.median(errs):+.2f} %, range "
              f"{min(errs):+.2f} ... {max(errs):+.2f} %, within ±3 % on {sum(abs(e) <= 3 for e in errs)} of "
              f"{len(errs)} rows. The estimate's flat ratio: median {statistics.median(ratio_errs):+.2f} %, range "
              f"{min(ratio_errs):+.2f} ... {max(ratio_errs):+.2f} %.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", type=int)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator-h100.md"))
    ap.add_argument("--jsonl", default=None, help="also write each row's numbers here")
    args = ap.parse_args()
    results = []
    for row in rows(set(args.cases)):
        r = check(row)
        results.append(r)
        print(r["case"], r["preset"], f"measured {r['measured_reserved'][-1] / GiB:.2f} GiB",
              f"replayed {r['default'][-1] / GiB:.2f} GiB", f"{r['seconds']} s", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(table(results))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
