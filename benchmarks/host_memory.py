"""Host RAM: memplan's host estimate (memplan.estimator.host) against the peak resident set of real `memplan train`
and `memplan profile --backend cpu` processes on this machine's CPU.

Models: the shipped demo-tiny, and GPT-2 (the `gpt2` preset's config.json) cut to 2 and to 12 decoder layers
(53.6M and 124.4M parameters), random weights saved in fp32 and in bf16 with demo-tiny's tokenizer, so that the
part of the estimate that is arithmetic (model bytes, optimizer states, the loaded copy) is 0.3-2.4 GB beside
the ~0.45 GB that every process carries anyway. Runs: full FT fp32 (the parameters are the mapped checkpoint
pages), LoRA bf16 (a bf16 copy made beside the mapped fp32 file), full FT fp32 from the same models saved in
bf16 (the mapped file and the fp32 copy made beside it), all on 1 process, and full FT fp32 on 2 processes (DDP
over gloo under torchrun), each `memplan train` with 3 optimizer steps of 8 x <= 64 tokens (2 x <= 64 for LoRA),
a checkpoint and the final save; and `memplan profile --backend cpu` of the full FT plans.

`memplan train` measures itself: the peak resident set (VmHWM) of each of its processes in each phase, load /
train / save (memplan.runtime.host_rss), next to the estimate for the run as it ran (summary.json
`host_memory`). The processes that launch a 2-process run are watched from here (their VmHWM, polled);
`memplan profile`'s peak is its ru_maxrss (os.wait4). Every run is made twice:
  - with MALLOC_MMAP_THRESHOLD_=131072: glibc then gives every freed tensor from 128 KiB back at once, so the
    resident set follows the live tensors. Here the estimate's arithmetic is checked (the difference between
    the 12- and the 2-layer model of one plan, and between 2 processes and 1, per phase; goal +-3 %) and the
    baseline is measured (what the resident set holds beyond those terms: PROCESS_BASELINE_BYTES bounds it);
  - with glibc's defaults, as users run: the heap it keeps (memplan.estimator.host.HEAP_RETENTION_OF_ACTIVATIONS)
    is measured against the activations, and the estimate must bound the measured peak of every phase.

    python benchmarks/host_memory.py [--out benchmarks/results/host-memory.txt]
    python benchmarks/host_memory.py --stored   # the stored measurements against the current estimate

Beside the table, every run's plan, model config and measured resident sets go to host-memory.jsonl
(`save_runs`); `load_runs` rebuilds the comparisons from them with the current estimate, which is how the
tests check the estimate against these measurements without starting the processes again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # glibc: a fixed mmap threshold, freed tensors returned at once
PHASES = ("load", "train", "save")
MODES = (("fixed", FIXED), ("default", {}))


def build_model(root: Path, preset: str, layers: int, dtype: str = "float32") -> Path:
    """The preset's config with `layers` decoder layers, random weights saved in `dtype`, demo-tiny's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((ROOT / "data" / "models" / preset / "config.json").read_text())
    cfg["n_layer" if "n_layer" in cfg else "num_hidden_layers"] = layers
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out = root / f"{preset}-{layers}l-{dtype}-v{config.vocab_size}"
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ROOT / "data" / "models" / "demo-tiny" / name, out / name)
    return out


def write_plan(directory: Path, model: str, **fields) -> Path:
    """A CPU plan on the demo data: 3 optimizer steps of 8 sequences, a checkpoint, the final save."""
    plan = {"model": str(model), "method": "full", "precision": "fp32", "device": "cpu", "optimizer": "adamw",
            "micro_batch": 8, "grad_accum": 1, "seq_len": 64, "grad_ckpt": False,
            "hparams": {"lr": 1e-4, "max_steps": 3, "warmup_steps": 0, "eval_every": 1000, "eval_samples": 0,
                        "log_every": 1, "seed": 1},
            "data": {"train": str(ROOT / "data" / "demo" / "train.jsonl"), "samples": 950},
            "output_dir": "out"}
    for key, value in fields.items():
        plan[key] = {**plan[key], **value} if isinstance(value, dict) and isinstance(plan.get(key), dict) else value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def _status(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    if "VmHWM" not in fields:  # a zombie
        return None
    return {"ppid": int(fields["PPid"]), "hwm": int(fields["VmHWM"].split()[0]) * 1024, "cmd": cmd}


def _tree(root: int) -> dict[int, dict]:
    """The processes under `root` (itself included), from /proc."""
    procs = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _status(int(p)))}
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out[pid] = procs[pid]
            todo += [c for c, s in procs.items() if s["ppid"] == pid]
    return out


def run_train(plan: Path, env: dict) -> dict:
    """`memplan train` in a fresh process (one intra-op thread); its summary's host_memory, and the peak
    resident sets of the processes that launched the ranks (polled: the `memplan train` started here and the
    agent running torchrun)."""
    shutil.rmtree(plan.parent / "out", ignore_errors=True)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    log = plan.parent / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "memplan", "train", str(plan), "--quiet"], env=full_env,
                                stdout=subprocess.DEVNULL, stderr=err)
        seen: dict[int, dict] = {}
        while proc.poll() is None:
            for pid, s in _tree(proc.pid).items():
                seen[pid] = s
            time.sleep(0.2)
    if proc.returncode:
        raise RuntimeError(f"memplan train {plan} failed ({proc.returncode}): {log.read_text()[-2000:]}")
    summary = json.loads((plan.parent / "out" / "summary.json").read_text())
    launchers = {s["cmd"]: s["hwm"] for pid, s in seen.items()
                 if pid == proc.pid or "memplan.train.agent" in s["cmd"]}
    return {"host": summary["host_memory"], "launchers": launchers if len(seen) > 1 else {}}


def run_profile(plan: Path, env: dict) -> int:
    """`memplan profile --backend cpu` of the plan in a fresh process: its peak resident set (ru_maxrss)."""
    proc = subprocess.Popen([sys.executable, "-m", "memplan", "profile", "--config", str(plan), "--backend", "cpu",
                             "--steps", "3", "--json"], env=dict(os.environ, OMP_NUM_THREADS="1", **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"memplan profile {plan} failed ({proc.returncode})")
    return usage.ru_maxrss * 1024  # kB on Linux


def host_estimate(plan: Path, as_run: dict | None = None):
    """The host estimate of the plan file, at the sequence length and examples it ran with (None: as written,
    without its dataset: what memplan profile holds)."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import build_plan

    fields = yaml.safe_load(plan.read_text())
    fields.pop("output_dir", None)
    if as_run:
        fields["seq_len"] = as_run["seq_len"]
        fields["data"] = dict(fields["data"], samples=as_run["samples"])
    else:
        fields["data"] = dict(fields["data"], samples=None)
    return estimate(resolve_model(fields["model"]), build_plan(fields)).host


def arithmetic(terms: dict) -> int:
    """The estimate's deterministic part: everything but the baseline bound and glibc's heap allowance."""
    return sum(v for k, v in terms.items() if k not in ("processes", "heap_retention", "launcher"))


def activations(host) -> int:
    """The activations and logits at their peak: the heap allowance less its margin (HEAP_RETENTION_OF_ACTIVATIONS
    is 1)."""
    from memplan.estimator.host import HEAP_RETENTION_EXTRA_BYTES

    return host.phases["train"].rank0.get("heap_retention", 0) - HEAP_RETENTION_EXTRA_BYTES


# ---------------------------------------------------------------- the runs and the comparisons


def train_cases(models: dict[str, Path]) -> dict[str, tuple[Path, dict]]:
    return {
        # the CPU demo's plan, its evaluations included: validation loss and exact match by greedy decoding
        "demo-tiny LoRA amp-bf16 mb32": ("demo-tiny", dict(method="lora", precision="amp-bf16", micro_batch=32,
                                                            hparams=dict(max_steps=12, eval_every=4, eval_samples=16))),
        "gpt2-2l full fp32": (models["2"], {}),
        "gpt2-12l full fp32": (models["12"], {}),
        # 2 sequences a step: on the CPU, bf16 GEMMs of the 50257-row head are most of a LoRA run's time
        "gpt2-2l LoRA bf16": (models["2"], dict(method="lora", precision="bf16", micro_batch=2)),
        "gpt2-12l LoRA bf16": (models["12"], dict(method="lora", precision="bf16", micro_batch=2)),
        "gpt2-2l full fp32 x2 DDP": (models["2"], dict(gpus=2)),
        # a bf16 checkpoint trained in fp32: the load maps the file (2 B/parameter) and makes the fp32 copy (4 B)
        "gpt2-2l bf16 file, full fp32": (models["2-bf16"], {}),
        "gpt2-12l bf16 file, full fp32": (models["12-bf16"], {}),
    }


PROFILED = ("gpt2-2l full fp32", "gpt2-12l full fp32")


def measure_all(work: Path, models: dict[str, Path]) -> tuple[dict, list[dict]]:
    """The comparisons ({"train": {(name, mode): (run, estimate)}, "profile": {(name, mode): (peak, estimate)}})
    and the records `save_runs` stores."""
    results: dict = {"train": {}, "profile": {}}
    records: list[dict] = []
    for name, (model, fields) in train_cases(models).items():
        plan = write_plan(work / name.replace(" ", "_"), str(model), **fields)
        for mode, env in MODES:
            run = run_train(plan, env)
            est = host_estimate(plan, run["host"]["plan_as_run"])
            results["train"][(name, mode)] = (run, est)
            records.append(_record("train", name, mode, plan, measured=run["host"]["measured"],
                                   as_run=run["host"]["plan_as_run"], launchers=run["launchers"]))
            print(f"{name} [{mode}]: {[{p: m[p] // MiB for p in PHASES} for m in run['host']['measured']]}",
                  file=sys.stderr)
    for name in PROFILED:
        plan = work / name.replace(" ", "_") / "plan.yaml"
        for mode, env in MODES:
            peak = run_profile(plan, env)
            results["profile"][(name, mode)] = (peak, host_estimate(plan))
            records.append(_record("profile", name, mode, plan, peak=peak))
    return results, records


def _record(kind: str, name: str, mode: str, plan: Path, **measured) -> dict:
    """A run as stored: its plan as written, and the config.json of a model built here (a catalog name stays)."""
    fields = yaml.safe_load(plan.read_text())
    model = Path(fields["model"])
    config = json.loads((model / "config.json").read_text()) if model.is_dir() else None
    fields["data"] = dict(fields["data"], train=str(Path(fields["data"]["train"]).relative_to(ROOT)))  # the repo's
    return {"kind": kind, "name": name, "mode": mode, "plan": fields, "model_config": config, **measured}


def save_runs(records: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    os.replace(tmp, path)


def load_runs(path: Path, work: Path) -> dict:
    """The stored runs compared with the current estimate: `measure_all`'s comparisons, no process started. Each
    built model's config.json is written under `work`, where the plan then finds it."""
    results: dict = {"train": {}, "profile": {}}
    for r in map(json.loads, path.read_text().splitlines()):
        directory = work / r["kind"] / r["name"].replace(" ", "_") / r["mode"]
        fields = dict(r["plan"], data=dict(r["plan"]["data"], train=str(ROOT / r["plan"]["data"]["train"])))
        directory.mkdir(parents=True, exist_ok=True)
        if r["model_config"] is not None:
            (directory / "model").mkdir()
            (directory / "model" / "config.json").write_text(json.dumps(r["model_config"]))
            fields["model"] = str(directory / "model")
        plan = directory / "plan.yaml"
        plan.write_text(yaml.safe_dump(fields, sort_keys=False))
        if r["kind"] == "train":
            run = {"host": {"measured": r["measured"]}, "launchers": r["launchers"]}
            results["train"][(r["name"], r["mode"])] = (run, host_estimate(plan, r["as_run"]))
        else:
            results["profile"][(r["name"], r["mode"])] = (r["peak"], host_estimate(plan))
    return results


def _pct(measured: float, estimated: float) -> str:
    """The error %, where the difference is large enough for one (50 MiB: the baseline's own spread is ~7 MiB)."""
    if max(abs(measured), abs(estimated)) < 50 * MiB:
        return "- (under 50 MiB)"
    return f"{100 * (estimated - measured) / measured:+.1f}"


def per_run_table(results: dict) -> list[list]:
    rows = []
    for (name, mode), (run, est) in results["train"].items():
        for rank, measured in enumerate(run["host"]["measured"]):
            for p in PHASES:
                ph = est.phases[p]
                terms = ph.rank0 if rank == 0 else ph.other
                det = arithmetic(terms)
                total = sum(terms.values())
                rows.append([name, mode, rank, p, measured[p] // MiB, total // MiB, det // MiB,
                             (measured[p] - det) // MiB, terms.get("heap_retention", 0) // MiB,
                             "yes" if measured[p] <= total else "NO"])
    for (name, mode), (peak, est) in results["profile"].items():
        terms = est.phases["train"].rank0
        det = arithmetic(terms)
        total = sum(terms.values())
        rows.append([f"profile {name}", mode, 0, "train", peak // MiB, total // MiB, det // MiB, (peak - det) // MiB,
                     terms.get("heap_retention", 0) // MiB, "yes" if peak <= total else "NO"])
    return rows


def difference_table(results: dict) -> list[list]:
    """The arithmetic, with glibc returning freed memory: measured vs estimated differences between two runs."""
    t = results["train"]
    pairs = [("gpt2-2l full fp32", "gpt2-12l full fp32"), ("gpt2-2l LoRA bf16", "gpt2-12l LoRA bf16"),
             ("gpt2-2l bf16 file, full fp32", "gpt2-12l bf16 file, full fp32"),
             ("gpt2-2l full fp32", "gpt2-2l full fp32 x2 DDP")]
    rows = []
    for a, b in pairs:
        (ra, ea), (rb, eb) = t[(a, "fixed")], t[(b, "fixed")]
        for rank in range(len(rb["host"]["measured"])):
            for p in PHASES:
                mb = rb["host"]["measured"][rank][p]
                ma = ra["host"]["measured"][0][p]
                db = arithmetic(eb.phases[p].rank0 if rank == 0 else eb.phases[p].other)
                da = arithmetic(ea.phases[p].rank0)
                rows.append([f"{b} - {a}", rank, p, (mb - ma) / MiB, (db - da) / MiB, _pct(mb - ma, db - da)])
    (pa, ea), (pb, eb) = (results["profile"][(name, "fixed")] for name in PROFILED)
    da, db = arithmetic(ea.phases["train"].rank0), arithmetic(eb.phases["train"].rank0)
    rows.append(["profile gpt2-12l - gpt2-2l full fp32", 0, "train", (pb - pa) / MiB, (db - da) / MiB,
                 _pct(pb - pa, db - da)])
    return rows


def retention_table(results: dict) -> list[list]:
    """glibc's default against a fixed threshold: the heap it keeps, against the activations and logits."""
    rows = []
    for (name, mode), (run, est) in results["train"].items():
        if mode != "default":
            continue
        fixed = results["train"][(name, "fixed")][0]["host"]["measured"][0]
        default = run["host"]["measured"][0]
        act = activations(est)
        for p in ("train", "save"):
            kept = default[p] - fixed[p]
            rows.append([name, p, kept / MiB, act / MiB, f"{100 * kept / act:.0f}" if act else "-"])
    return rows


def report(results: dict) -> str:
    from tabulate import tabulate

    from memplan.estimator import host

    diff = difference_table(results)
    rows = per_run_table(results)
    fixed = [r for r in rows if r[1] == "fixed"]
    errors = [float(r[5]) for r in diff if not r[5].startswith("- ")]
    launched = [run["launchers"] for run, _ in results["train"].values() if run["launchers"]]
    lines = [
        "# Host RAM: memplan's host estimate vs the peak resident set (VmHWM) of memplan train / profile",
        f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
        f"python benchmarks/host_memory.py",
        "",
        "Per run, process (rank) and phase, MiB: measured peak resident set; the estimate for that process; its",
        "arithmetic (the estimate less the baseline bound and glibc's heap allowance); measured - arithmetic (the",
        "baseline, plus under glibc's default the heap it keeps); the heap allowance; whether the estimate bounds it.",
        "fixed = MALLOC_MMAP_THRESHOLD_=131072 (freed tensors go back to the OS at once), default = glibc's defaults.",
        "",
        tabulate(rows, headers=["run", "malloc", "rank", "phase", "measured", "estimate", "arithmetic",
                                "measured-arith", "heap allowance", "bounded"], tablefmt="simple"),
        "",
        "The arithmetic, with freed memory returned at once: differences between two runs, MiB (error % = "
        "(estimated - measured) / measured)",
        "",
        tabulate(diff, headers=["runs", "rank", "phase", "measured diff", "estimated diff", "error %"],
                 tablefmt="simple", floatfmt=".1f"),
        "",
        f"error over the differences from 50 MiB: {min(errors):+.1f} % .. {max(errors):+.1f} % (goal +-3 %); "
        "under 50 MiB: " + ", ".join(f"{r[3]:.1f} vs {r[4]:.1f}" for r in diff if r[5].startswith("- ")) + " MiB",
        "(LoRA's adapter tensors - gradients, AdamW's temporaries, the copies saved - are under the 128 KiB "
        "threshold: glibc serves them from its heap and keeps them there when freed, beyond the arithmetic)",
        f"baseline (measured - arithmetic, fixed threshold), every process and phase: "
        f"{min(r[7] for r in fixed)}-{max(r[7] for r in fixed)} MiB; "
        f"bound PROCESS_BASELINE_BYTES = {host.PROCESS_BASELINE_BYTES // MiB} MiB",
        "",
        "glibc's default: the heap it keeps (default - fixed, rank 0), MiB, against the activations and logits at "
        f"their peak (the allowance: {host.HEAP_RETENTION_OF_ACTIVATIONS:g} x them + "
        f"{host.HEAP_RETENTION_EXTRA_BYTES // MiB} MiB)",
        "",
        tabulate(retention_table(results), headers=["run", "phase", "kept", "activations", "% of them"],
                 tablefmt="simple", floatfmt=".0f"),
        "",
        "launching processes of the 2-process runs (VmHWM, MiB): "
        + "; ".join(" + ".join(f"{'agent (torchrun)' if 'memplan.train.agent' in cmd else 'memplan train'} "
                               f"{hwm // MiB}" for cmd, hwm in run.items()) + f" = {sum(run.values()) // MiB}"
                    for run in launched)
        + f"; bound LAUNCHER_BYTES = {host.LAUNCHER_BYTES // MiB} MiB",
        f"every phase bounded by the estimate: {'yes' if all(r[9] == 'yes' for r in rows) else 'NO'}",
    ]
    return "\n".join(lines) + "\n"


STORED = ROOT / "benchmarks" / "results" / "host-memory.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "host-memory.txt"))
    parser.add_argument("--stored", action="store_true",
                        help=f"compare the runs stored in {STORED.relative_to(ROOT)} with the current estimate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="memplan-host-") as tmp:
        work = Path(tmp)
        if args.stored:
            print(report(load_runs(STORED, work)))
            return
        models = {f"{layers}{suffix}": build_model(work, "gpt2", layers, dtype)
                  for layers in (2, 12) for suffix, dtype in (("", "float32"), ("-bf16", "bfloat16"))}
        results, records = measure_all(work, models)
        text = report(results)
        save_runs(records, STORED)
    out = Path(args.out)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(text)
    os.replace(tmp_out, out)
    print(text)


if __name__ == "__main__":
    main()
