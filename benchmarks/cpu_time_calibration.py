"""The CPU time model's measured figures: each optimizer's step per parameter, and the training FLOP rate per core by
method, precision regime, model width and thread count, from `memplan train`'s own wall-clock steps.

Two measurements, written to one JSON-lines file that memplan.recommend.hardware's CPU tables are read from:

1. `optimizer`: each optimizer memplan builds (memplan.runtime.optim.optimizer_factory), stepping 8 tensors of
   1024 x 512 (4.2M parameters, fp32 and bf16) with gradients set, at 1 and 2 torch threads; the median seconds
   of `OPT_STEPS` steps after 3, per parameter.
2. `train`: `memplan train` on demo-tiny (d_model 192) and a 4-layer Llama of d_model 512 (random weights,
   benchmarks/cpu_precision_speed.make_h512), full FT and LoRA r16, fp32 / amp-bf16 / bf16, AdamW (foreach),
   no checkpointing, micro-batch `MICRO` x `SEQ` tokens in packed full rows, 1 thread (OMP_NUM_THREADS=1) for
   every regime and 2 threads too, and fp32 at micro-batch `SMALL_MICRO` (1 thread) to tell the per-layer
   cost that does not grow with the tokens from the rate; measured = the median wall-clock step after `WARMUP`
   (time_accuracy.measured_step_s), the median over `--rounds` rounds, beside the model FLOPs of the step
   (throughput.train_flops_per_token). `fit` turns the rows into the tables.

benchmarks/time_accuracy.py checks the time model built on these figures against other plans (checkpointing,
8-bit AdamW, QLoRA, another micro-batch, two processes): those rows are held out of this calibration.

    python benchmarks/cpu_time_calibration.py [--out benchmarks/results/cpu-time-calibration.jsonl]

Run it on a quiet machine: the step times are wall-clock times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_precision_speed import make_h512  # noqa: E402
from time_accuracy import measured_step_s, plan_fields  # noqa: E402

SEQ, MICRO, SMALL_MICRO, STEPS, WARMUP = 256, 8, 2, 10, 4
SHORT_SEQ, SHORT_MICRO = 64, 32  # the CPU demo's task and micro-batch: rows of about 43 tokens
OPT_STEPS = 12
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-forloop", "adamw-8bit", "sgd", "adafactor")
PRECISIONS = ("fp32", "amp-bf16", "bf16")


def optimizer_rows() -> list[dict]:
    """Seconds per parameter of one optimizer step, per optimizer, parameter dtype and thread count."""
    import torch

    from memplan.plan import build_plan
    from memplan.runtime.optim import optimizer_factory, param_groups

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            for name in OPTIMIZERS:
                torch.manual_seed(0)
                params = [torch.nn.Parameter(torch.randn(1024, 512, dtype=dtype) * 0.02) for _ in range(8)]
                for p in params:
                    p.grad = torch.randn_like(p) * 1e-3
                plan = build_plan({"model": "demo-tiny", "device": "cpu", "optimizer": name})
                opt = optimizer_factory(plan)(param_groups(params, plan.hparams.weight_decay))
                times = []
                for _ in range(3 + OPT_STEPS):
                    start = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - start)
                n = sum(p.numel() for p in params)
                rows.append({"kind": "optimizer", "optimizer": name, "dtype": str(dtype).removeprefix("torch."),
                             "threads": threads, "params": n, "step_s": statistics.median(times[3:]),
                             "s_per_param": statistics.median(times[3:]) / n})
                print(f"optimizer {name} {dtype} x{threads}: {rows[-1]['s_per_param'] * 1e9:.2f} ns/param", flush=True)
    return rows


def _fields(model: str, method: str, precision: str, micro: int, short: bool, out: Path) -> dict:
    """A case's plan: packed rows of SEQ tokens, or (`short`) the CPU demo's task as it comes, each micro-batch of
    SHORT_MICRO examples padded to its longest (about 43 tokens)."""
    fields = plan_fields(dict(model=model, method=method, precision=precision, grad_ckpt=False, micro_batch=micro,
                              seq_len=SHORT_SEQ if short else SEQ), out, steps=STEPS)
    fields["data"]["packing"] = not short
    return fields


def _positions_per_row(metrics: Path) -> float:
    """The median padded row length of the measured steps (metrics.jsonl `positions_per_row`)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return statistics.median(r["positions_per_row"] for r in rows if "positions_per_row" in r)


def train_rows(workdir: Path, rounds: int, shapes: tuple[str, ...] = ("packed", "short"),
               only: set[tuple[str, int]] | None = None) -> list[dict]:
    """`rounds` rounds over the cases of `shapes` ("packed": rows of SEQ tokens at MICRO and SMALL_MICRO, "short":
    the demo's rows at SHORT_MICRO; `only`: just these (precision, threads)), in the same order each round (a
    change in the machine's load hits every case alike); each case's step is the median over the rounds."""
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan
    from memplan.recommend import throughput

    h512 = make_h512(workdir)
    cases = [(model, method, precision, threads, micro, short)
             for short, micro in ((False, MICRO), (True, SHORT_MICRO))
             for model in ("demo-tiny", h512) for method in ("full", "lora")
             for precision in PRECISIONS for threads in (1, 2)]
    # a small micro-batch, to tell the per-layer cost that does not grow with the tokens from the rate
    cases += [(model, method, "fp32", 1, SMALL_MICRO, False) for model in ("demo-tiny", h512)
              for method in ("full", "lora")]
    cases = [c for c in cases if ("short" if c[5] else "packed") in shapes
             and (only is None or (c[2], c[3]) in only)]
    steps: dict[int, list[float]] = {}
    positions: dict[int, list[float]] = {}
    for r in range(rounds):
        for i, (model, method, precision, threads, micro, short) in enumerate(cases):
            out = workdir / f"round{r}-run{i}"
            out.mkdir()
            fields = _fields(model, method, precision, micro, short, out / "output")
            (out / "plan.yaml").write_text(yaml.safe_dump(fields))
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            run = subprocess.run([sys.executable, "-m", "memplan", "train", str(out / "plan.yaml"), "--quiet"],
                                 capture_output=True, text=True, cwd=ROOT, env=env)
            if run.returncode != 0:
                raise SystemExit(f"{model} {method} {precision}: memplan train failed:\n{run.stderr[-2000:]}")
            metrics = out / "output" / "metrics.jsonl"
            steps.setdefault(i, []).append(measured_step_s(metrics, WARMUP))
            positions.setdefault(i, []).append(_positions_per_row(metrics))
            print(f"round {r}: {Path(model).name} {method} {precision} x{threads} mb{micro}"
                  f"{' short rows' if short else ''}: {steps[i][-1]:.3f} s", flush=True)
    rows = []
    for i, (model, method, precision, threads, micro, short) in enumerate(cases):
        fields = _fields(model, method, precision, micro, short, workdir / "unused")
        plan = build_plan({k: v for k, v in fields.items() if k != "output_dir"})
        spec = resolve_model(plan.model)
        row_len = statistics.median(positions[i])
        rows.append({"kind": "train", "model": "demo-tiny" if model == "demo-tiny" else "llama-h512x4",
                     "d_model": spec.hidden_size, "layers": spec.num_layers, "method": method,
                     "precision": precision, "threads": threads, "micro_batch": micro, "seq_len": plan.seq_len,
                     "packed": not short, "row_len": row_len, "optimizer": "adamw",
                     "step_s": statistics.median(steps[i]), "rounds_s": steps[i],
                     "flops": throughput.train_flops_per_token(spec, plan, row_len) * micro * row_len,
                     "trainable": _trainable(spec, plan)})
    return rows


def fit(rows: list[dict]) -> dict:
    """The CPU tables of memplan.recommend.hardware from the measured rows (each row's step less its AdamW step,
    trainable x ns per parameter, is its `net` time), at each measured row length (the packed rows' SEQ, and
    the short rows' median):

    CPU_OPTIMIZER_NS_PER_PARAM[optimizer][param itemsize] = (ns at 1 thread, ns at 2 threads)
    CPU_OVERHEAD_MS_PER_LAYER[kind] = ((d_model, ms), ...): the packed fp32 1-thread rows at micro-batch 8 and 2
        solve net = overhead + FLOPs / rate for both; the overhead per decoder layer and micro-batch (0 at least)
    each train row's matmul rate = FLOPs / (net - overhead)
    CPU_FP32_RATE[kind][row length] = ((d_model, fp32 rate at 1 thread, GFLOP/s), ...)
    CPU_BF16_SPEED[kind][precision][row length] = ((d_model, rate / the fp32 rate, both at 1 thread), ...)
    CPU_EXTRA_CORE_GAIN[kind][precision][row length] = ((d_model, rate at 2 threads / at 1 thread - 1), ...)
    """
    itemsize = {"float32": 4, "bfloat16": 2}
    opt: dict = {}
    for r in rows:
        if r["kind"] == "optimizer":
            by_size = opt.setdefault(r["optimizer"], {}).setdefault(itemsize[r["dtype"]], {})
            by_size[r["threads"]] = r["s_per_param"] * 1e9
    optimizer = {name: {size: (round(t[1], 3), round(t[2], 3)) for size, t in sizes.items()}
                 for name, sizes in opt.items()}
    train = [r for r in rows if r["kind"] == "train"]
    short = round(statistics.median(r["row_len"] for r in train if not r["packed"]))
    net: dict = {}
    for r in train:
        p_item = 2 if (r["method"] == "full" and r["precision"] == "bf16") else 4
        kind = "full" if r["method"] == "full" else "adapters"
        key = (kind, r["d_model"], r["precision"], r["threads"], r["micro_batch"], SEQ if r["packed"] else short)
        net[key] = (r["step_s"] - r["trainable"] * opt[r["optimizer"]][p_item][r["threads"]] * 1e-9, r["flops"],
                    r["layers"])
    widths = sorted({k[1] for k in net})
    kinds = ("full", "adapters")
    overhead = {}
    for kind in kinds:
        for w in widths:
            (t_big, f_big, layers), (t_small, f_small, _) = (net[(kind, w, "fp32", 1, mb, SEQ)]
                                                             for mb in (MICRO, SMALL_MICRO))
            rate = (f_big - f_small) / (t_big - t_small)
            # at least 0: where the larger micro-batch ran slower per FLOP (a 512-wide full fine-tuning's activations
            # outgrow the caches) the line through the two points crosses below zero, and its rate says nothing more
            overhead[(kind, w)] = max(0.0, round((t_big - f_big / rate) / layers * 1e3, 4))  # ms per layer
    shapes = ((MICRO, SEQ), (SHORT_MICRO, short))
    rates = {k: f / (t - overhead[(k[0], k[1])] * layers * 1e-3) for k, (t, f, layers) in net.items()
             if (k[4], k[5]) in shapes}

    def rate(kind, w, precision, threads, row_len):
        return rates[(kind, w, precision, threads, MICRO if row_len == SEQ else SHORT_MICRO, row_len)]

    lens = (short, SEQ)
    return {
        "CPU_OPTIMIZER_NS_PER_PARAM": optimizer,
        "CPU_OVERHEAD_MS_PER_LAYER": {k: tuple((w, overhead[(k, w)]) for w in widths) for k in kinds},
        "CPU_FP32_RATE": {k: {n: tuple((w, round(rate(k, w, "fp32", 1, n) / 1e9, 2)) for w in widths) for n in lens}
                          for k in kinds},
        "CPU_BF16_SPEED": {k: {p: {n: tuple((w, round(rate(k, w, p, 1, n) / rate(k, w, "fp32", 1, n), 3))
                                            for w in widths) for n in lens} for p in PRECISIONS[1:]} for k in kinds},
        "CPU_EXTRA_CORE_GAIN": {k: {p: {n: tuple((w, round(rate(k, w, p, 2, n) / rate(k, w, p, 1, n) - 1, 3))
                                                 for w in widths) for n in lens} for p in PRECISIONS} for k in kinds},
    }


def _trainable(spec, plan) -> int:
    from memplan.estimator import estimate

    return estimate(spec, plan, kernels="cpu").params_trainable


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu-time-calibration.jsonl"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the training cases (default 3)")
    parser.add_argument("--shapes", default="packed,short",
                        help="which training cases to measure: packed, short or both (default packed,short)")
    parser.add_argument("--no-optimizer", action="store_true", help="skip the optimizer measurement")
    parser.add_argument("--only", help="measure just these precision:threads cases, e.g. amp-bf16:2,bf16:2")
    parser.add_argument("--fit", action="store_true", help="print the tables fitted to --out's rows; measure nothing")
    args = parser.parse_args()
    if args.fit:
        rows = [json.loads(line) for line in Path(args.out).read_text().splitlines()]
        for name, table in fit(rows).items():
            print(f"{name} = {table!r}")
        return
    head = {"kind": "machine", "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "load_start": os.getloadavg()[0]}
    rows = [] if args.no_optimizer else optimizer_rows()
    with tempfile.TemporaryDirectory() as tmp:
        only = {(p, int(n)) for p, n in (c.split(":") for c in args.only.split(","))} if args.only else None
        rows += train_rows(Path(tmp), args.rounds, tuple(args.shapes.split(",")), only)
    head["load_end"] = os.getloadavg()[0]
    out = Path(args.out)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text("".join(json.dumps(r) + "\n" for r in [head, *rows]))
    tmp_out.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
