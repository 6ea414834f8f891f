"""How fast `memplan estimate` answers: cold CLI wall time (median of N runs) and estimates per second.

    python benchmarks/estimate_speed.py [--runs 21]
    python benchmarks/estimate_speed.py --python /path/to/venv/bin/python   # an installed (non-editable) memplan
    python benchmarks/estimate_speed.py --against /path/to/other/checkout  # A/B against another checkout

Cold = a new Python process running `python -m memplan estimate ...` end to end, as a user waits for it;
the same process is checked not to import torch, transformers or PyYAML. The interpreter's own start-up
(`python -c pass`), the import of pydantic's BaseModel (the Plan's base) and the import of everything
third-party the table needs (pydantic, click, tabulate) are measured side by side, since they bound what
the CLI can reach. Python writes its bytecode cache as it does for any user (PYTHONDONTWRITEBYTECODE is
cleared), and one unmeasured run of each command warms that cache first. The commands take turns, round
after round, so a change in the machine's load touches all of them alike.

By default memplan runs from this checkout (the working directory is the repository root). With
--python, that interpreter runs from an empty temporary directory, so it uses the memplan installed in
its environment, and its `memplan` console script is timed too when it sits next to it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ["estimate", "--model", "llama-7b", "--gpus", "4"]
ONE_PLAN = ["estimate", "--model", "llama-3-8b", "--method", "lora", "--gpu", "h100-80gb", "--json"]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
CHECK = ("import sys\nfrom memplan.cli import main\ntry:\n main(['estimate', '--model', 'llama-7b', '--json'])\n"
         "except SystemExit:\n pass\n"
         "print(' '.join(f'{m}={m in sys.modules}' for m in ('torch', 'transformers', 'yaml')))")


def commands(python: str, cwd: Path, against: Path | None) -> dict[str, tuple[list[str], Path]]:
    out = {
        "python -c pass": ([python, "-c", "pass"], cwd),
        "import pydantic.BaseModel": ([python, "-c", "from pydantic import BaseModel"], cwd),
        "import pydantic, click, tabulate": ([python, "-c", "import click, tabulate\nfrom pydantic import BaseModel"],
                                             cwd),
        "estimate table (llama-7b, 4 GPUs)": ([python, "-m", "memplan", *TABLE], cwd),
        "estimate one plan --json": ([python, "-m", "memplan", *ONE_PLAN], cwd),
    }
    script = Path(python).parent / "memplan"
    if cwd != ROOT and script.is_file():
        out["console script: estimate table"] = ([str(script), *TABLE], cwd)
    if against is not None:
        out[f"{against.name}: estimate table"] = ([python, "-m", "memplan", *TABLE], against)
        out[f"{against.name}: estimate one plan --json"] = ([python, "-m", "memplan", *ONE_PLAN], against)
    return out


def cold(cmds: dict[str, tuple[list[str], Path]], runs: int) -> dict[str, float]:
    for cmd, cwd in cmds.values():
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=ENV)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, (cmd, cwd) in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env=ENV)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def per_second() -> float:
    sys.path.insert(0, str(ROOT))
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import Plan

    spec, plan = resolve_model("llama-2-7b"), Plan(method="lora", precision="bf16")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        estimate(spec, plan)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=21)
    ap.add_argument("--python", default=None, help="interpreter of an environment with memplan installed")
    ap.add_argument("--against", type=Path, default=None, help="another checkout to time alongside this one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as empty:
        python = args.python or sys.executable
        cwd = Path(empty) if args.python else ROOT
        check = subprocess.run([python, "-c", CHECK], cwd=cwd, capture_output=True, text=True, check=True)
        where = f"as installed in {Path(python).parent.parent}" if args.python else "from this checkout"
        print(f"memplan {where}; modules the estimate path imports: {check.stdout.strip().splitlines()[-1]}")
        load = os.getloadavg()
        medians = cold(commands(python, cwd, args.against and args.against.resolve()), args.runs)
        load_after = os.getloadavg()
    for name, median in medians.items():
        print(f"{name:42} median {median * 1000:7.0f} ms over {args.runs} runs")
    if not args.python:
        print(f"{'estimates per second (one process)':42} {per_second():7.0f}")
    print(f"load average (1 min) {load[0]:.2f} before, {load_after[0]:.2f} after; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
