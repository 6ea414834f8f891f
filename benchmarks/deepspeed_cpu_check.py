"""DeepSpeed on the CPU: `memplan train` runs demo-tiny through accelerate's DeepSpeed integration (ZeRO 1-2,
DeepSpeed's CPU accelerator, gloo) and its losses are compared with memplan's own DDP run on the same
effective batch, with the trainer's measured peak memory next to memplan's estimate.

Every run trains 8 optimizer steps of 8 sequences (seq_len 128) from the shipped demo data, precision
bf16-master (DeepSpeed: its bf16 optimizer with fp32 masters; DDP: memplan.runtime.optim) unless named
fp32. Two processes use micro_batch 2, one process micro_batch 4; grad_accum 2 everywhere. The resume row is
the ZeRO-2 run killed (SIGKILL) after its step-4 checkpoint and continued with --resume. The plan
directories are written as `memplan recommend -o` writes them (ds_config.json with "auto" values and the
plan's AdamW section, which memplan train fills and checks) and moved before training.

ZeRO-Offload is a CUDA plan (a CPU run has nothing to offload to), so its rows are the furthest DeepSpeed's
CPU accelerator goes: benchmarks/deepspeed_offload_probe.py builds one engine with ZeRO-2 and
offload_optimizer the way memplan train does and the way HF Trainer does from the JSON's optimizer section,
and steps it 4 times next to torch's AdamW without offload.

DeepSpeed is not a memplan dependency; run this with a Python that has it, for instance a virtual
environment over the system's packages (never let pip replace torch):

    python -m venv --system-site-packages /tmp/dsenv
    /tmp/dsenv/bin/pip install --no-build-isolation deepspeed
    /tmp/dsenv/bin/python benchmarks/deepspeed_cpu_check.py [--out benchmarks/results/deepspeed-cpu.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
KILL_AFTER = 4

RUNS = [  # (name, plan fields, reference run)
    ("ddp x2, bf16-master", dict(sharding="ddp", zero=0, gpus=2, micro_batch=2), None),
    ("deepspeed ZeRO-2 x2, bf16-master", dict(sharding="deepspeed", zero=2, gpus=2, micro_batch=2),
     "ddp x2, bf16-master"),
    ("deepspeed ZeRO-1 x2, bf16-master", dict(sharding="deepspeed", zero=1, gpus=2, micro_batch=2),
     "ddp x2, bf16-master"),
    ("deepspeed ZeRO-2 x1, bf16-master", dict(sharding="deepspeed", zero=2, gpus=1, micro_batch=4),
     "ddp x2, bf16-master"),
    ("ddp x2, fp32", dict(sharding="ddp", zero=0, gpus=2, micro_batch=2, precision="fp32"), None),
    ("deepspeed ZeRO-2 x2, fp32", dict(sharding="deepspeed", zero=2, gpus=2, micro_batch=2, precision="fp32"),
     "ddp x2, fp32"),
]
RESUMED = ("deepspeed ZeRO-2 x2, killed + resumed", "deepspeed ZeRO-2 x2, bf16-master")


def plan_fields(out: Path, fields: dict) -> dict:
    plan = {
        "model": "demo-tiny", "method": "full", "precision": "bf16-master", "device": "cpu", "optimizer": "adamw",
        "grad_accum": 2, "seq_len": 128, "grad_ckpt": False, "attn": "sdpa",
        "hparams": {"lr": 5e-5, "max_steps": STEPS, "warmup_steps": 1, "lr_scheduler": "cosine", "max_grad_norm": 1.0,
                    "eval_every": 4, "save_every": 4, "eval_samples": 8, "log_every": 1, "seed": 1},
        "data": {"train": str(ROOT / "data" / "demo" / "train.jsonl"),
                 "validation": str(ROOT / "data" / "demo" / "val.jsonl")},
        "output_dir": str(out),
    }
    plan.update(fields)
    return plan


def write_run(directory: Path, fields: dict) -> Path:
    """plan.yaml, and for DeepSpeed accelerate_config.yaml + ds_config.json as `memplan recommend -o` writes
    them, written elsewhere and moved to `directory` (the files must not depend on where they were written)."""
    import shutil

    import yaml

    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan
    from memplan.recommend.writers import accelerate_config, ds_config

    written = directory.with_name(directory.name + "-written")
    written.mkdir(parents=True)
    fields = plan_fields(directory / "out", fields)
    plan = build_plan(fields)
    (written / "plan.yaml").write_text(yaml.safe_dump(fields, sort_keys=False))
    if plan.sharding == "deepspeed":
        spec = resolve_model(plan.model)
        (written / "ds_config.json").write_text(json.dumps(ds_config(plan, spec), indent=2))
        (written / "accelerate_config.yaml").write_text(
            yaml.safe_dump(accelerate_config(plan, spec, "127.0.0.1"), sort_keys=False))
    shutil.move(written, directory)
    return directory / "plan.yaml"


OFFLOAD_RUNS = [  # (name, offload, how the engine gets its optimizer)
    ("torch AdamW, no offload (memplan train)", "none", "memplan"),
    ("ZeRO-Offload, memplan train's path", "optimizer", "memplan"),
    ("ZeRO-Offload, the JSON's optimizer section (HF Trainer)", "optimizer", "section"),
]


def offload_probe(tmp: Path) -> list[list[str]]:
    """benchmarks/deepspeed_offload_probe.py for each OFFLOAD_RUNS row: a ZeRO-2 bf16-master plan, AdamW
    lr 1e-2, weight decay 0."""
    import socket

    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan
    from memplan.recommend.writers import ds_config

    rows, first = [], None
    for name, offload, mode in OFFLOAD_RUNS:
        fields = dict(model="demo-tiny", precision="bf16-master", sharding="deepspeed", zero=2, micro_batch=4,
                      offload=offload, hparams={"lr": 1e-2})
        cfg = ds_config(build_plan(fields), resolve_model("demo-tiny"))
        cfg["zero_optimization"].get("offload_optimizer", {})["pin_memory"] = False  # no CUDA memory to pin
        path = tmp / f"offload-{len(rows)}.json"
        path.write_text(json.dumps(cfg))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "deepspeed_offload_probe.py"),
                               json.dumps(fields), mode, str(port), str(path)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode != 0:
            raise SystemExit(f"offload probe {name} failed:\n{done.stderr[-4000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        first = first or r["losses"]
        diff = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], first))
        rows.append([name, r["optimizer"], str(r["cpu_offload"]), " -> ".join(f"{x:.6f}" for x in r["losses"]),
                     f"{diff:.1e}", f"{time.perf_counter() - t0:.0f}"])
        print(f"{name}: {rows[-1][-1]} s", flush=True)
    return rows


def train(path: Path, *args: str, kill_after: int | None = None) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "memplan", "train", str(path), "--quiet", *args]
    t0 = time.perf_counter()
    if kill_after is None:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
        return time.perf_counter() - t0
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    marker = path.parent / "out" / "checkpoints" / f"checkpoint-{kill_after:06d}" / "trainer.json"
    while proc.poll() is None and not marker.is_file():
        time.sleep(0.02)
    # the launcher and every training process (torchrun gives each worker a session of its own)
    import psutil

    descendants = psutil.Process(proc.pid).children(recursive=True)
    for p in descendants + [psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)  # not our own child: proc.wait collects its status
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit("the run finished before it could be killed")
    return time.perf_counter() - t0


def records(path: Path) -> list[dict]:
    lines = (path.parent / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def curve(path: Path) -> dict:
    return {(r["step"], k): r[k] for r in records(path) for k in ("loss", "eval_loss") if k in r}


def max_rel_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise SystemExit(f"different logged steps: {sorted(set(a) ^ set(b))}")
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def main() -> None:
    import accelerate
    import deepspeed
    import torch
    from tabulate import tabulate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deepspeed-cpu.txt"))
    args = ap.parse_args()

    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="memplan-ds-") as tmp:
        for i, (name, fields, ref) in enumerate(RUNS):
            path = write_run(Path(tmp) / f"run{i}", fields)
            seconds = train(path)
            curves[name] = curve(path)
            summary = json.loads((path.parent / "out" / "summary.json").read_text())
            rows.append((name, ref, summary, seconds))
            print(f"{name}: {seconds:.0f} s", flush=True)
        name, ref = RESUMED
        path = write_run(Path(tmp) / "resumed", RUNS[1][1])
        train(path, kill_after=KILL_AFTER)
        killed_at = max(r["step"] for r in records(path) if "loss" in r)
        if killed_at >= STEPS:
            raise SystemExit("the killed run had already finished")
        seconds = train(path, "--resume")
        curves[name] = curve(path)
        summary = json.loads((path.parent / "out" / "summary.json").read_text())
        rows.append((f"{name} (killed after step {killed_at})", ref, summary, seconds))
        print(f"{name}: {seconds:.0f} s", flush=True)
        offload_rows = offload_probe(Path(tmp))

    table = []
    for (name, ref, summary, seconds), key in zip(rows, [r[0] for r in RUNS] + [RESUMED[0]]):
        mem = summary["memory"]
        diff = max_rel_diff(curves[key], curves[ref]) if ref else None
        evals = [v for (step, k), v in sorted(curves[key].items()) if k == "eval_loss"]
        table.append([name, ref or "-", f"{diff:.1e}" if diff is not None else "-",
                      f"{summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}",
                      f"{evals[0]:.4f} -> {evals[-1]:.4f}",
                      *((f"{mem['measured_bytes'] / 2**20:.2f}", f"{mem['estimated_bytes'] / 2**20:.2f}",
                         f"{100 * mem['gap']:+.1f} %") if mem else ("-", "-", "-")), f"{seconds:.0f}"])
    text = "\n".join([
        "memplan train under DeepSpeed on the CPU (benchmarks/deepspeed_cpu_check.py)",
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()} {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}, torch {torch.__version__}, "
        f"accelerate {accelerate.__version__}, deepspeed {deepspeed.__version__}",
        f"demo-tiny full FT, {STEPS} optimizer steps of 8 sequences (grad_accum 2), seq_len 128, AdamW lr 5e-5 "
        "cosine, clipping 1.0; x2 = 2 processes (gloo), micro_batch 2; x1 = 1 process, micro_batch 4.",
        "max rel. diff: largest |loss - reference| / reference over every logged training and validation loss.",
        "memory: the trainer's peak (live tensor bytes, first 2 steps, per process) vs memplan's estimate at the "
        "measured shape.",
        "",
        tabulate(table, headers=["run", "reference", "max rel. diff", "train loss", "validation loss",
                                 "measured MiB", "estimate MiB", "gap", "s"], tablefmt="github",
                 disable_numparse=True),
        "",
        "ZeRO-Offload on DeepSpeed's CPU accelerator (benchmarks/deepspeed_offload_probe.py): one ZeRO-2 "
        "bf16-master engine, a 16-64-1 MLP, 4 AdamW steps (lr 1e-2); max rel. diff against the first row.",
        "",
        tabulate(offload_rows, headers=["run", "optimizer DeepSpeed steps", "cpu_offload", "losses",
                                        "max rel. diff", "s"], tablefmt="github", disable_numparse=True),
        "",
    ])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
