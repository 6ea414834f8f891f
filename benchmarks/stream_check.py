"""The estimate's reserved memory against traced steps of plans no GPU measured: held-out checks of the allocation
stream (memplan.estimator.stream) beyond the stored H100 rows (benchmarks/allocator_check.py).

For each plan, two optimizer steps are traced at full size on fake tensors with CUDA's kernel memory
(`trace_training(..., record_events=True, kernels="cuda")`) and their allocations served by the caching allocator
model as a fresh process would (`memplan.estimator.allocator.replay`), with the default allocator and with
expandable segments; `memplan estimate`'s reserved figure for the same plan (its own stream, no trace) is set
against each. The stream has no fitted constant: every plan here is held out.

    python benchmarks/stream_check.py [--out benchmarks/results/allocator-trace.md] [index ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator_check import _err, _summary, write_table  # noqa: E402  (this folder: the same helpers)

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

PLANS = [
    ("mistral-7b", dict(method="lora", micro_batch=8, seq_len=4096)),  # the defaults: amp-bf16, checkpointing
    ("llama-3-8b", dict(method="lora", precision="bf16", micro_batch=4)),
    ("llama-3-8b", dict(method="lora", precision="bf16")),
    ("qwen3-0.6b", dict(precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("gemma-3-1b", dict(precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False)),
    ("smollm3-3b", dict(method="lora", precision="bf16", micro_batch=2, grad_ckpt=False)),
    ("qwen2.5-0.5b", dict(precision="amp-bf16", micro_batch=2, seq_len=1024, grad_accum=4, optimizer="adamw")),
    ("llama-3.2-1b", dict(method="lora", precision="bf16", micro_batch=2, loss="chunked")),
    ("tinyllama-1.1b", dict(precision="bf16-master", optimizer="adamw-forloop", seq_len=512)),
    ("olmo-2-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=512, grad_ckpt=False)),
    ("phi-3-mini", dict(precision="bf16", micro_batch=1, seq_len=1024)),
    ("mixtral-8x7b", dict(method="lora", precision="bf16", seq_len=1024, lora={"dropout": 0.0})),
    ("qwen3-8b", dict(precision="bf16")),  # full FT, checkpointing: the residual gradient through each layer
    ("gemma-2-2b", dict(method="lora", precision="bf16", seq_len=512)),  # soft-capped logits: tanh saves its result
    ("llama-3.2-1b", dict(precision="amp-bf16", micro_batch=2, loss="chunked")),  # full FT: autocast's copies per chunk
    # Llama-4-Scout's text model at its widths, its first 4 layers (benchmarks/accuracy.py): 16 experts read by bmm
    ("llama4-scout-text@4L", dict(precision="bf16", seq_len=2048, grad_ckpt=False)),
    ("llama4-scout-text@4L", dict(precision="bf16", seq_len=512)),
]


def check(preset: str, fields: dict) -> dict:
    from accuracy import CONFIGS  # this folder: the configs that are not presets

    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator import estimate
    from memplan.estimator.allocator import replay
    from memplan.plan import Plan
    from memplan.profile.trace import trace_training

    plan = Plan(model=preset, **fields)
    if preset in CONFIGS:
        base, over = CONFIGS[preset]
        model = json.loads((models_dir() / base / "config.json").read_text()) if base else {}
        model.update(over)
        spec = spec_from_config(dict(model), preset)
    else:
        model, spec = str(models_dir() / preset), resolve_model(preset)
    t0 = time.perf_counter()
    traced = trace_training(model, plan, steps=2, record_events=True, kernels="cuda")
    out = {"preset": preset, "plan": fields}
    for allocator in ("default", "expandable"):
        r = replay(traced.events, allocator)
        e = estimate(spec, plan.model_copy(update={"allocator": allocator}), kernels="cuda")
        out[allocator] = {"traced_allocated": r.peak_allocated, "traced_reserved": r.peak_reserved,
                          "estimate_allocated": e.peak_allocated, "estimate_reserved": e.reserved,
                          "basis": e.reserved_basis}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def table(results: list[dict]) -> str:
    lines = ["# The estimate's reserved memory vs traced steps (no GPU measurement)", "",
             "Each plan's two optimizer steps traced at full size with CUDA's kernel memory and replayed through "
             "the caching allocator model as a fresh process (benchmarks/stream_check.py), against `memplan "
             "estimate`'s reserved figure: its own allocation stream (memplan.estimator.stream) replayed through "
             "the same model. Allocated: the replay's peak (the estimate's `peak allocated`). error % = 100 x "
             "(estimate - traced) / traced.", "",
             "| model | plan | allocated GiB traced / estimate | reserved GiB traced | estimate | error % "
             "| expandable: traced | estimate | error % |",
             "|---|---|---|---|---|---|---|---|---|"]
    errs, exp_errs = [], []
    for r in results:
        d, x = r["default"], r["expandable"]
        e, ex = _err(d["estimate_reserved"], d["traced_reserved"]), _err(x["estimate_reserved"], x["traced_reserved"])
        errs.append(e)
        exp_errs.append(ex)
        plan = ", ".join(f"{k}={v}" for k, v in r["plan"].items())
        lines.append(f"| {r['preset']} | {plan} | {d['traced_allocated'] / GiB:.2f} / "
                     f"{d['estimate_allocated'] / GiB:.2f} | {d['traced_reserved'] / GiB:.2f} | "
                     f"{d['estimate_reserved'] / GiB:.2f} | {e:+.2f} | {x['traced_reserved'] / GiB:.2f} | "
                     f"{x['estimate_reserved'] / GiB:.2f} | {ex:+.2f} |")
    lines += ["", _summary("Default allocator", errs), "", _summary("Expandable segments", exp_errs)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("picks", nargs="*", type=int, help="indices into PLANS (default: all)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator-trace.md"))
    args = ap.parse_args()
    results = []
    for i, (preset, fields) in enumerate(PLANS):
        if args.picks and i not in args.picks:
            continue
        results.append(check(preset, fields))
        d = results[-1]["default"]
        print(preset, fields, f"traced {d['traced_reserved'] / GiB:.2f} GiB, estimate "
              f"{d['estimate_reserved'] / GiB:.2f} GiB ({results[-1]['seconds']} s)", flush=True)
    write_table(Path(args.out), table(results))


if __name__ == "__main__":
    main()
