"""Training time: recommend's time model (memplan.recommend.throughput.step_time) against the step times `memplan train`
measures, on this machine's CPU.

Each plan trains the shipped demo-tiny on the demo data, packed into full rows of `SEQ` tokens (so that every
micro-batch has the planned shape), for `STEPS` optimizer steps, logging every step. Measured: the median over the
steps after the first `WARMUP` of each step's seconds (metrics.jsonl `elapsed_s`, differenced). Predicted: the time
model for the same plan on this CPU (memplan.recommend.hardware.cpu_target: its rates were measured once and are
stored, so the prediction does not depend on this run). Error = predicted / measured - 1.

    python benchmarks/time_accuracy.py [--out benchmarks/results/time-accuracy.md]

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


def plan_fields(fields: dict, out: Path) -> dict:
    return {"model": "demo-tiny", "device": "cpu", "micro_batch": MICRO, "grad_accum": 1, "seq_len": SEQ,
            "optimizer": "adamw", **fields,
            "hparams": {"max_steps": STEPS, "log_every": 1, "eval_every": 10 * STEPS, "save_every": 10 * STEPS,
                        "eval_samples": 0, "warmup_steps": 1},
            "data": {"train": str(ROOT / "data/demo/train.jsonl"), "packing": True, "val_ratio": 0.05},
            "output_dir": str(out)}


def measured_step_s(metrics: Path) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "elapsed_s" in r]
    steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(steps[WARMUP - 1:])


def predicted_step_s(fields: dict) -> tuple[float, float]:
    """The time model's step seconds and its rate (GFLOP/s per process) for the plan."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan
    from memplan.recommend import throughput
    from memplan.recommend.hardware import cpu_target

    plan = build_plan({k: v for k, v in fields.items() if k not in ("output_dir",)})
    spec = resolve_model(plan.model)
    target = cpu_target(plan.world_size, 0.1, [])
    step = throughput.step_time(spec, plan, target, estimate(spec, plan, kernels="cpu").params_trainable,
                                seq_tokens=plan.seq_len)
    return step.total_s, step.peak_flops / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/time-accuracy.md"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(PLANS):
            out = Path(tmp) / f"run{i}"
            out.mkdir()
            fields = plan_fields(extra, out / "output")
            (out / "plan.yaml").write_text(yaml.safe_dump(fields))
            run = subprocess.run([sys.executable, "-m", "memplan", "train", str(out / "plan.yaml"), "--quiet"],
                                 capture_output=True, text=True, cwd=ROOT)
            if run.returncode != 0:
                raise SystemExit(f"{name}: memplan train failed:\n{run.stderr[-2000:]}")
            measured = measured_step_s(out / "output" / "metrics.jsonl")
            predicted, rate = predicted_step_s(fields)
            rows.append((name, predicted, measured, rate))
            print(f"{name}: predicted {predicted:.3f} s, measured {measured:.3f} s ({predicted / measured - 1:+.1%})",
                  flush=True)
    lines = ["# Training time: the time model vs `memplan train`'s measured steps (CPU)", "",
             f"`python benchmarks/time_accuracy.py` on {platform.machine()}, Python {platform.python_version()}: "
             f"demo-tiny, micro-batch {MICRO} x {SEQ} tokens (packed full rows), {STEPS} optimizer steps logged one "
             f"by one; measured = the median step after the first {WARMUP}; predicted = "
             "memplan.recommend.throughput.step_time for the same plan on this CPU.", "",
             "| plan | predicted s | measured s | error | model's rate (GFLOP/s per process) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {p:.3f} | {m:.3f} | {p / m - 1:+.1%} | {r:.2f} |" for n, p, m, r in rows]
    errors = [abs(p / m - 1) for _, p, m, _ in rows]
    lines += ["", f"{sum(e <= 0.20 for e in errors)} of {len(rows)} plans within +-20 % (the goal); "
                  f"largest error {max(errors):.0%}.", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
