"""Training time: recommend's time model (memplan.recommend.throughput.step_time) against the step times `memplan train`
measures on this machine's CPU, and against published step times of GPU runs (published_gpu_times.yaml).

Each CPU plan trains the shipped demo-tiny on the demo data, packed into full rows of `SEQ` tokens (so that every
micro-batch has the planned shape), for `STEPS` optimizer steps, logging every step. Measured: the median over the
steps after the first `WARMUP` of each step's seconds (metrics.jsonl `elapsed_s`, differenced), the median over
`--rounds` rounds. Predicted: the time model for the same plan on this CPU (memplan.recommend.hardware.cpu_target:
its rates were measured by benchmarks/cpu_time_calibration.py on other plans and are stored, so the prediction does
not depend on this run). Each published GPU row is predicted on its GPUs. Error = predicted / measured - 1.

    python benchmarks/time_accuracy.py [--rounds 2] [--out benchmarks/results/time-accuracy.md]
    python benchmarks/time_accuracy.py --reuse      # predict again for the stored measurements
    python benchmarks/time_accuracy.py --fit-mfu    # the GPU MFU fitted on the published `fit` rows

Run it on a quiet machine: the step times are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SEQ, MICRO, STEPS, WARMUP = 256, 16, 14, 4

PLANS = [  # (name, plan fields beyond the common ones)
    ("full fp32, checkpointing", dict(method="full", precision="fp32")),
    ("full fp32, no checkpointing", dict(method="full", precision="fp32", grad_ckpt=False)),
    ("full amp-bf16", dict(method="full", precision="amp-bf16")),
    ("full bf16", dict(method="full", precision="bf16")),
    ("full fp32, 8-bit AdamW", dict(method="full", precision="fp32", optimizer="adamw-8bit")),
    ("LoRA fp32", dict(method="lora", precision="fp32")),
    ("LoRA fp32, no checkpointing", dict(method="lora", precision="fp32", grad_ckpt=False)),
    ("LoRA amp-bf16", dict(method="lora", precision="amp-bf16")),
    ("LoRA bf16", dict(method="lora", precision="bf16")),
    ("QLoRA bf16", dict(method="qlora", precision="bf16")),
    ("full fp32, 2 processes", dict(method="full", precision="fp32", gpus=2)),
    ("LoRA fp32, 2 processes", dict(method="lora", precision="fp32", gpus=2)),
]


def plan_fields(fields: dict, out: Path, steps: int = STEPS) -> dict:
    return {"model": "demo-tiny", "device": "cpu", "micro_batch": MICRO, "grad_accum": 1, "seq_len": SEQ,
            "optimizer": "adamw", **fields,
            "hparams": {"max_steps": steps, "log_every": 1, "eval_every": 10 * steps, "save_every": 10 * steps,
                        "eval_samples": 0, "warmup_steps": 1},
            "data": {"train": str(ROOT / "data/demo/train.jsonl"), "packing": True, "val_ratio": 0.05},
            "output_dir": str(out)}


def measured_step_s(metrics: Path, warmup: int = WARMUP) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(steps[warmup - 1:])


def _terms(step) -> str:
    return ", ".join(f"{name} {sec:.3g}" for name, sec in step.terms.items() if sec)


def predicted_cpu(fields: dict, info=None):
    """The time model's step for the plan on this CPU (or on `info`'s: memplan.recommend.hardware.CpuInfo)."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan
    from memplan.recommend import throughput
    from memplan.recommend.hardware import cpu_target

    plan = build_plan({k: v for k, v in fields.items() if k not in ("output_dir",)})
    spec = resolve_model(plan.model)
    target = cpu_target(plan.world_size, 0.1, [], info=info)
    return throughput.step_time(spec, plan, target, estimate(spec, plan, kernels="cpu").params_trainable,
                                seq_tokens=plan.seq_len)


def predicted_gpu(row: dict, mfu: float | None = None):
    """The time model's step for a published row's plan on its GPUs (at `mfu` if given)."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan
    from memplan.recommend import throughput
    from memplan.recommend.hardware import gpu_target

    plan = build_plan(dict(row["plan"], device="cuda", gpus=row["gpus"], nodes=row.get("nodes", 1)))
    spec = resolve_model(plan.model)
    target = gpu_target(row["gpu"], None, row["gpus"], row.get("nodes", 1), 0.1)
    return throughput.step_time(spec, plan, target, estimate(spec, plan).params_trainable, seq_tokens=plan.seq_len,
                                mfu=mfu)


def fit_mfu(rows: list[dict]) -> dict[str, float]:
    """Each `fit` row's MFU, by its GPU: the matmul passes at MFU 1 / (the published step - the other terms)."""
    fitted = {}
    for r in rows:
        if r["role"] == "fit":
            step = predicted_gpu(r, mfu=1.0)
            fitted[r["gpu"]] = round(step.compute_s / (r["step_s"] - (step.total_s - step.compute_s)), 3)
    return fitted


def measure_cpu(rounds: int) -> list[dict]:
    """Each plan's measured step: the median over `rounds` rounds of the plans in turn (a change in the machine's
    load hits every plan alike)."""
    measured: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for i, (name, extra) in enumerate(PLANS):
                out = Path(tmp) / f"round{r}-run{i}"
                out.mkdir()
                fields = plan_fields(extra, out / "output")
                (out / "plan.yaml").write_text(yaml.safe_dump(fields))
                run = subprocess.run([sys.executable, "-m", "memplan", "train", str(out / "plan.yaml"), "--quiet"],
                                     capture_output=True, text=True, cwd=ROOT)
                if run.returncode != 0:
                    raise SystemExit(f"{name}: memplan train failed:\n{run.stderr[-2000:]}")
                measured.setdefault(i, []).append(measured_step_s(out / "output" / "metrics.jsonl"))
                print(f"round {r}: {name}: {measured[i][-1]:.3f} s", flush=True)
    return [{"plan": name, "fields": {k: v for k, v in plan_fields(extra, Path("unused")).items() if k != "output_dir"},
             "measured_s": statistics.median(measured[i]), "rounds_s": measured[i]}
            for i, (name, extra) in enumerate(PLANS)]


def cpu_table(rows: list[dict], info=None) -> tuple[list[str], list[float]]:
    lines = ["| plan | predicted s | measured s | error | predicted terms (s) | matmul rate (GFLOP/s per process) |",
             "|---|---|---|---|---|---|"]
    errors = []
    for r in rows:
        step = predicted_cpu(r["fields"], info)
        errors.append(step.total_s / r["measured_s"] - 1)
        lines.append(f"| {r['plan']} | {step.total_s:.3f} | {r['measured_s']:.3f} | {errors[-1]:+.1%} | "
                     f"{_terms(step)} | {step.peak_flops / 1e9:.2f} |")
    return lines, errors


def gpu_table(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    lines = ["| id | model | GPUs | plan | published s/step | predicted s | error | predicted terms (s) | role | "
             "not modelled |", "|---|---|---|---|---|---|---|---|---|---|"]
    errors: dict[str, list[float]] = {"fit": [], "held-out": [], "held-out, reproducible (no torch.compile)": []}
    for r in rows:
        step = predicted_gpu(r)
        err = step.total_s / r["step_s"] - 1
        errors[r["role"]].append(err)
        if r["role"] == "held-out" and "torch.compile" not in r.get("differs", ""):
            errors["held-out, reproducible (no torch.compile)"].append(err)
        p = r["plan"]
        plan = ", ".join(f"{k} {v}" for k, v in p.items() if k not in ("model", "lora", "data"))
        published = ("<= " if r.get("bound") == "upper" else "") + f"{r['step_s']:.3f}"
        lines.append(f"| {r['id']} | {p['model']} | {r['gpus']} x {r['gpu']} | {plan} | {published} | "
                     f"{step.total_s:.3f} | {err:+.1%} | {_terms(step)} | {r['role']} | {r.get('differs', '')} |")
    return lines, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/time-accuracy.md"))
    parser.add_argument("--measured", default=str(ROOT / "benchmarks/results/time-accuracy-cpu.jsonl"),
                        help="the CPU steps measured (written by a measuring run, read with --reuse)")
    parser.add_argument("--fit-mfu", action="store_true",
                        help="print the MFU fitted on the published rows' `fit` rows; measure nothing")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the CPU plans (default 2)")
    parser.add_argument("--reuse", action="store_true",
                        help="predict again for the steps measured before (--measured); measure nothing")
    args = parser.parse_args()
    gpu_rows = yaml.safe_load((ROOT / "benchmarks/published_gpu_times.yaml").read_text())
    if args.fit_mfu:
        print(f"GPU_MFU_FITTED = {fit_mfu(gpu_rows)!r}")
        return
    measured = Path(args.measured)
    if args.reuse:
        cpu_rows = [json.loads(line) for line in measured.read_text().splitlines() if line.strip()]
    else:
        cpu_rows = measure_cpu(args.rounds)
        tmp = measured.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in cpu_rows))
        tmp.replace(measured)
    cpu_lines, cpu_err = cpu_table(cpu_rows)
    gpu_lines, gpu_err = gpu_table(gpu_rows)
    within = sum(abs(e) <= 0.20 for e in cpu_err)
    lines = ["# Training time: the time model vs measured steps", "",
             "## CPU: `memplan train`'s steps", "",
             f"`python benchmarks/time_accuracy.py` on {platform.machine()}, Python {platform.python_version()}: "
             f"demo-tiny, micro-batch {MICRO} x {SEQ} tokens (packed full rows), {STEPS} optimizer steps logged one "
             f"by one; measured = the median step after the first {WARMUP}, the median over rounds ({measured.name}); "
             "predicted = "
             "memplan.recommend.throughput.step_time for the same plan on this CPU, from the rates of "
             "benchmarks/cpu_time_calibration.py (other plans: micro-batch 8, no checkpointing, AdamW foreach; none "
             "of these rows is in that calibration). Error = predicted / measured - 1.", "", *cpu_lines, "",
             f"{within} of {len(cpu_err)} plans within +-20 % (the goal); errors {min(cpu_err):+.1%} ... "
             f"{max(cpu_err):+.1%}.", "",
             "## GPU: published step times", "",
             "Each row's source, quoted figure and settings are in benchmarks/published_gpu_times.yaml; predicted = "
             "step_time on the row's GPUs (datasheet figures, data/gpus/gpus.yaml). `<=`: the source counts only "
             "non-padding tokens, so the real step is at most that long. The MFU is fitted on the `fit` rows, one per "
             "GPU architecture (throughput.GPU_MFU_FITTED); the `held-out` rows are not used in any fit.", "",
             *gpu_lines, ""]
    for role, errs in gpu_err.items():
        if errs:
            lines.append(f"{role}: {sum(abs(e) <= 0.20 for e in errs)} of {len(errs)} rows within +-20 %; errors "
                         f"{min(errs):+.1%} ... {max(errs):+.1%}.")
    lines.append("")
    out = Path(args.out)
    out.with_suffix(".tmp").write_text("\n".join(lines))
    out.with_suffix(".tmp").replace(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
