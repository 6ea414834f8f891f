"""Turn gpu_check.py's JSONL (measured CUDA memory) into a table against the current estimator.

    python benchmarks/gpu_report.py benchmarks/results/gpu-h100-run1.jsonl > benchmarks/results/accuracy-h100.md

Estimates are recomputed here, so the table always shows today's estimator against the stored
measurements. Measured = steady state (max over steps 2..n) of each phase's max_memory_allocated.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memplan.catalog.resolve import resolve_model  # noqa: E402
from memplan.estimator import estimate  # noqa: E402
from memplan.plan import Plan  # noqa: E402

GiB = 2**30
PHASES = ("forward", "backward", "optimizer")


def rows(path: Path) -> tuple[dict, list[dict]]:
    """gpu_check.py's header (torch, transformers, the device) and its rows."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    header = next(r["header"] for r in records if "header" in r)
    return header, [r for r in records if "header" not in r]


def main() -> None:
    path = Path(sys.argv[1])
    out = []
    ratios, contexts = [], []
    header, records = rows(path)
    for r in records:
        if "measured" not in r or r.get("error"):
            out.append(f"| {r['case']} | {r['preset']} | {_plan(r['plan'])} | error: {r.get('error')} |||||")
            continue
        steps = r["measured"]["steps"][1:] or r["measured"]["steps"]
        meas = {p: max(s[p] for s in steps) for p in PHASES}
        reserved = max(s["reserved"] for s in r["measured"]["steps"])
        nvml = max((s["nvml_used"] or 0) for s in r["measured"]["steps"])
        e = estimate(resolve_model(r["preset"]), Plan(model=r["preset"], **r["plan"]), kernels="cuda")
        peak_m, peak_e = max(meas.values()), e.peak_allocated
        errs = [100 * (e.phase_peaks[p] - meas[p]) / meas[p] for p in PHASES]
        ratios.append(reserved / peak_m)
        if nvml:
            contexts.append(nvml - reserved)
        out.append(
            f"| {r['case']} | {r['preset']} | {_plan(r['plan'])} | {peak_m / GiB:.2f} | {peak_e / GiB:.2f} | "
            f"{100 * (peak_e - peak_m) / peak_m:+.2f} | " + " / ".join(f"{x:+.2f}" for x in errs)
            + f" | {reserved / GiB:.2f} | {e.reserved / GiB:.2f} | {nvml / GiB:.2f} | {e.total / GiB:.2f} |"
        )
    print(f"# memplan estimate vs measured CUDA memory ({header['device']})\n")
    print(f"torch {header['torch']}, transformers {header['transformers']}; measurements: `{path.name}` "
          "(benchmarks/gpu_check.py); estimates recomputed by benchmarks/gpu_report.py.\n")
    print("Allocated = `torch.cuda.max_memory_allocated` per phase, steady state (steps 2-3). "
          "error % = 100 x (estimate - measured) / measured; per phase: forward / backward / optimizer.\n")
    print("| # | model | plan | measured peak GiB | estimate GiB | error % | per phase % | reserved GiB | "
          "est. reserved | NVML used GiB | est. total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(out))
    if ratios:
        print(f"\nreserved / allocated peak: median {statistics.median(ratios):.3f}, "
              f"min {min(ratios):.3f}, max {max(ratios):.3f} over {len(ratios)} plans.")
    timed = [r for r in records if r.get("timing", {}).get("measured_s")]
    if timed:
        _timing_table(timed)
    if contexts:
        print(f"NVML used - reserved (CUDA context, outside the allocator): median "
              f"{statistics.median(contexts) / 2**20:.0f} MiB, min {min(contexts) / 2**20:.0f}, "
              f"max {max(contexts) / 2**20:.0f} MiB.")


def _timing_table(timed: list[dict]) -> None:
    """gpu_check.py's timing pass against today's time model (recomputed: memplan.recommend.throughput)."""
    from memplan.recommend import throughput
    from memplan.recommend.hardware import gpu_target

    print("\n## Step time vs the time model\n")
    print("| # | model | plan | measured s (median) | tokens/s | predicted s | error % | achieved MFU |")
    print("|---|---|---|---|---|---|---|---|")
    errors = []
    for r in timed:
        t = r["timing"]
        plan = Plan(model=r["preset"], **r["plan"])
        spec = resolve_model(r["preset"])
        target = gpu_target(t["gpu"], None, 1, 1, 0.1) if t.get("gpu") else None
        step = throughput.step_time(spec, plan, target, estimate(spec, plan).params_trainable) if target else None
        predicted = step.total_s if step else t["predicted"]["step_s"]
        errors.append(predicted / t["measured_s"] - 1)
        mfu = (step.flops / t["measured_s"] / step.peak_flops) if step else t["achieved_mfu"]
        print(f"| {r['case']} | {r['preset']} | {_plan(r['plan'])} | {t['measured_s']:.3f} | {t['tokens_per_s']:.0f} | "
              f"{predicted:.3f} | {100 * errors[-1]:+.1f} | {mfu:.3f} |")
    print(f"\n{sum(abs(e) <= 0.2 for e in errors)} of {len(errors)} within +-20 %; errors "
          f"{100 * min(errors):+.1f} ... {100 * max(errors):+.1f} %.")


def _plan(fields: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items())


if __name__ == "__main__":
    main()
