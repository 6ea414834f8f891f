"""CPU training-step time by precision regime: fp32 vs amp-bf16 vs bf16, side by side in one run.

`memplan train` (its own loop, in this process, one torch thread) trains each model for `--steps` optimizer
steps in each regime, the regimes alternating within every round so that a change in the machine's load
hits them alike. Per step: the CPU time the process spent on it (batch preparation included; the loop's
step clock reads time.process_time here, so time other programs hold the core does not count: a per-core
figure even on a shared machine; metrics.jsonl's elapsed_s with log_every 1) and the model FLOPs of the padded
batch as `memplan recommend`'s time model counts them
(`throughput.train_flops_per_token` x micro-batch x the batch's padded length). The first `WARMUP` steps
are left out (memplan measures its memory there). Reported: the median over all rounds' steps of the
step time and of the achieved FLOP/s, each regime's speed relative to fp32 (median over rounds of the
per-round ratio of median step times), and what the time model predicts for the same steps.

    python benchmarks/cpu_precision_speed.py [--steps 14] [--rounds 5] [--out FILE]

Results: benchmarks/results/cpu-precision-speed.txt. The models: the shipped demo-tiny (hidden 192) and a
randomly initialised 4-layer Llama of hidden 512 (14.7M parameters, demo-tiny's tokenizer), both on
data/demo/general.jsonl as plain text (most examples fill the sequence), and demo-tiny on the CPU demo's
own task data (data/demo/train.jsonl) at the demo plan's micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 3
PRECISIONS = ("fp32", "amp-bf16", "bf16")

GENERAL = ("data/demo/general.jsonl", "text")  # Python's documentation: most examples fill the sequence
DEMO = ("data/demo/train.jsonl", "auto")  # the CPU demo's task: about 43 tokens per example

# (name, model builder key, method, micro-batch, sequence length, (data, format))
CASES = [
    ("demo-tiny, full FT", "demo-tiny", "full", 16, 128, GENERAL),
    ("demo-tiny, LoRA r16", "demo-tiny", "lora", 16, 128, GENERAL),
    ("llama h512 x4, full FT", "h512", "full", 8, 128, GENERAL),
    ("llama h512 x4, LoRA r16", "h512", "lora", 8, 128, GENERAL),
    ("demo-tiny, LoRA r16, demo data", "demo-tiny", "lora", 32, 64, DEMO),
    ("demo-tiny, full FT, demo data", "demo-tiny", "full", 32, 64, DEMO),
    ("llama h512 x4, full FT, demo data", "h512", "full", 32, 64, DEMO),
    ("llama h512 x4, LoRA r16, demo data", "h512", "lora", 32, 64, DEMO),
]


def make_h512(workdir: Path) -> str:
    """A 4-layer Llama, hidden 512, random weights, saved with demo-tiny's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = workdir / "llama-h512"
    if out.is_dir():
        return str(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    demo = ROOT / "data" / "models" / "demo-tiny"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(demo / name, out / name)
    return str(out)


def plan_dict(model: str, method: str, precision: str, mb: int, seq: int, steps: int, out: Path,
              data: tuple[str, str] = GENERAL) -> dict:
    return {
        "model": model, "method": method, "precision": precision, "device": "cpu", "optimizer": "adamw-fused",
        "micro_batch": mb, "grad_accum": 1, "seq_len": seq, "grad_ckpt": False, "attn": "sdpa",
        "hparams": {"max_steps": steps, "warmup_steps": 2, "lr": 1e-4, "eval_every": 10 * steps,
                    "eval_samples": 0, "save_every": 10 * steps, "log_every": 1, "seed": 1},
        "data": {"train": str(ROOT / data[0]), "format": data[1], "val_ratio": 0.0},
        "output_dir": str(out),
    }


def padded_lengths(plan, steps: int) -> list[int]:
    """The padded length of each step's micro-batch, from the same stream the loop draws."""
    from memplan.runtime.model import load_tokenizer, model_dir
    from memplan.train import data as D

    tok = load_tokenizer(model_dir(plan.model), False)
    run_data = D.load_run_data(plan, tok)
    stream = D.Stream(run_data.train, plan.micro_batch, 1, 0, plan.hparams.seed)
    return [max(len(e.input_ids) for e in stream.micro_batch_at(k)) for k in range(steps)]


def run_once(fields: dict, workdir: Path, clock: str = "cpu") -> tuple[list[float], list[float], object]:
    """(step seconds, step FLOPs) for the steps after WARMUP, and the resolved plan."""
    import time
    import types

    import yaml

    from memplan.catalog.resolve import resolve_model
    from memplan.recommend import throughput
    from memplan.train import loop
    from memplan.train.loop import train
    from memplan.train.settings import resolve_plan

    path = workdir / "plan.yaml"
    path.write_text(yaml.safe_dump(fields))
    resolved = resolve_plan(str(path))
    # The loop times its steps with time.perf_counter; here it reads the process's CPU time instead, so
    # that the time other programs hold the core does not count (one torch thread: CPU time = core time).
    if clock == "cpu":
        loop.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        train(resolved, echo=lambda _m: None, progress=False)
    finally:
        loop.time = time
    lines = [json.loads(x) for x in (Path(fields["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in lines if "elapsed_s" in r}
    steps = fields["hparams"]["max_steps"]
    plan = resolved.plan
    spec = resolve_model(plan.model)
    lengths = padded_lengths(plan, steps)
    secs, flops = [], []
    for s in range(WARMUP + 1, steps + 1):
        secs.append(elapsed[s] - elapsed[s - 1])
        flops.append(throughput.train_flops_per_token(spec, plan, lengths[s - 1]) * plan.micro_batch * lengths[s - 1])
    return secs, flops, plan


def measure(args) -> dict:
    import torch
    import transformers

    load_before = os.getloadavg()[0]
    keep = tempfile.mkdtemp(prefix="memplan-cpu-speed-")
    models = {"demo-tiny": "demo-tiny", "h512": make_h512(Path(keep))}
    cases = []
    for idx in [int(i) for i in args.cases.split(",")]:
        name, model_key, method, mb, seq, data = CASES[idx]
        precisions = tuple(args.precisions.split(","))
        per_round: dict[str, list[float]] = {p: [] for p in precisions}
        secs: dict[str, list[float]] = {p: [] for p in precisions}
        rates: dict[str, list[float]] = {p: [] for p in precisions}
        flops: dict[str, list[float]] = {p: [] for p in precisions}
        for r in range(args.rounds):
            order = precisions if r % 2 == 0 else precisions[::-1]
            for precision in order:
                with tempfile.TemporaryDirectory(prefix="memplan-bench-") as tmp:
                    fields = plan_dict(models[model_key], method, precision, mb, seq, args.steps, Path(tmp) / "out",
                                       data)
                    s, f, _plan = run_once(fields, Path(tmp), args.clock)
                secs[precision] += s
                flops[precision] += f
                rates[precision] += [x / y for x, y in zip(f, s)]
                per_round[precision].append(statistics.median(s))
                print(f"{name} round {r + 1} {precision}: {statistics.median(s):.3f} s/step", file=sys.stderr)
        results = {}
        for precision in precisions:
            results[precision] = {
                "step_s_median": statistics.median(secs[precision]),
                "flops_median": statistics.median(flops[precision]),
                "achieved_flops_median": statistics.median(rates[precision]),
                "speed_vs_fp32": statistics.median(f / b for f, b in zip(per_round["fp32"], per_round[precision])),
                "round_medians_s": per_round[precision],
            }
        cases.append({"name": name, "model": model_key, "method": method, "micro_batch": mb, "seq_len": seq,
                      "data": data[0], "results": results})
    shutil.rmtree(keep, ignore_errors=True)
    from memplan.recommend.hardware import cpu_name

    return {
        "cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "capability": torch.backends.cpu.get_cpu_capability(), "transformers": transformers.__version__,
        "cpus": os.cpu_count(), "load_start": load_before, "load_end": os.getloadavg()[0],
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "steps": args.steps, "rounds": args.rounds,
        "clock": args.clock,
        "cases": cases,
    }


def render_threads(runs: list[dict]) -> str:
    """The wall-time runs (--clock wall, fp32): each case's step time by thread count, and 2 threads' gain."""
    from tabulate import tabulate

    by_case: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        for case in run["cases"]:
            by_case.setdefault(case["name"], {}).setdefault(run["threads"], []).append(
                case["results"]["fp32"]["step_s_median"])
    rows = []
    for name, threads in by_case.items():
        one, two = statistics.median(threads.get(1, [float("nan")])), statistics.median(threads.get(2, [float("nan")]))
        rows.append((name, ", ".join(f"{x:.3f}" for x in threads.get(1, [])),
                     ", ".join(f"{x:.3f}" for x in threads.get(2, [])), f"{one / two:.2f}"))
    loads = ", ".join(f"{r['load_start']:.1f}" for r in runs)
    return (f"# fp32, WALL time per step on the idle machine (1-minute load average at each run's start: {loads}); "
            f"median over each run's steps after the first {WARMUP}, runs alternating 2 threads / 1 thread\n"
            + tabulate(rows, headers=["model, method", "1 thread s", "2 threads s", "2 threads' speed-up"],
                       tablefmt="simple", disable_numparse=True))


def render(runs: list[dict]) -> str:
    from tabulate import tabulate

    parts = []
    wall = [r for r in runs if r.get("clock") == "wall"]
    runs = [r for r in runs if r.get("clock", "cpu") == "cpu"]
    for run in runs:
        rows = []
        for case in run["cases"]:
            for precision, r in case["results"].items():
                rows.append((case["name"], precision, f"{r['step_s_median']:.3f}",
                             f"{r['achieved_flops_median'] / 1e9:.2f}", f"{r['speed_vs_fp32']:.2f}"))
        isa = run["onednn_max_cpu_isa"]
        parts.append(
            f"# {run['cpu']}, torch {run['torch']} ({run['threads']} thread(s), capability {run['capability']}"
            + (f", ONEDNN_MAX_CPU_ISA={isa}" if isa else "") + f"), transformers {run['transformers']}, "
            f"{run['cpus']} CPUs, 1-minute load average {run['load_start']:.1f} at the start and "
            f"{run['load_end']:.1f} at the end (other work shares the CPUs); median over steps {WARMUP + 1}-"
            f"{run['steps']} of {run['rounds']} rounds; step time = the process's CPU time\n"
            + tabulate(rows, headers=["model, method", "precision", "step s (median)", "achieved GFLOP/s",
                                      "speed vs fp32"], tablefmt="simple", disable_numparse=True))
    head = ("# memplan train on the CPU by precision regime; the regimes alternate within each round; speed vs fp32 = "
            "median over rounds of (fp32 step time / this regime's), within the round\n"
            "# fused AdamW, no checkpointing, SDPA; 'demo data': data/demo/train.jsonl, micro-batch 32 of about "
            "43 tokens (the CPU demo's task; recommend's CPU time model is calibrated on these rows), else "
            "data/demo/general.jsonl "
            "as text, micro-batch 16 (h512: 8) of 128 tokens; achieved = model FLOPs as recommend's time model counts "
            "them / step time; written by benchmarks/cpu_precision_speed.py\n")
    if wall:
        parts.append(render_threads(wall))
    return head + "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                    help="comma list of case indices to run")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cpu-precision-speed.jsonl"),
                    help="raw results, one JSON line per run (appended)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-precision-speed.txt"))
    ap.add_argument("--render-only", action="store_true", help="only rewrite --out from --json")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="step time: the process's CPU time (default; one thread: per-core time whatever else runs) "
                         "or wall time (several threads, on an idle machine)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of precision regimes")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: a per-core rate; on a shared machine several threads wait "
                         "for each other at every parallel region and the timings scatter by 10x)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.render_only:
        import torch

        torch.set_num_threads(args.threads)
    raw = Path(args.json)
    if not args.render_only:
        run = measure(args)
        raw.parent.mkdir(parents=True, exist_ok=True)
        with raw.open("a") as fh:
            fh.write(json.dumps(run) + "\n")
    runs = [json.loads(x) for x in raw.read_text().splitlines() if x.strip()]
    text = render(runs)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
