"""The caching allocator model against what the H100 reserved: every stored gpu_check row, replayed.

For each row of benchmarks/results/gpu-h100-run*.jsonl (measured with benchmarks/gpu_check.py): the same plan's
step is traced at full size on fake tensors with CUDA's kernel memory (memplan.profile.trace, kernels="cuda"),
its allocations and frees in order are served by memplan.estimator.allocator, and the reserved peak after each
of the 3 steps is set against the measured `torch.cuda.max_memory_reserved`. Each run measured its rows one
after another in one process, whose allocator kept what earlier rows left: the rows of a run are replayed the
same way, in order, in one allocator (`replay_run`). Beside it, each row replayed alone as a fresh process
would run it (`memplan.estimator.allocator.replay`; default allocator and expandable segments). The total adds
the CUDA context (memplan.estimator.overhead) against NVML's used memory. The estimate's own reserved figure
(memplan estimate: the allocation stream it builds from its terms, memplan.estimator.stream, replayed through
the same allocator model; no trace) is set against both, and the flat ratio it used before beside them. A DDP row
(measured over a one-rank NCCL group) is traced in one process with DDP's own allocations spliced in.
`--jsonl` keeps each row's numbers; tests/estimator/test_stream.py holds the estimate to the stored fresh replays.

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
RUNS = sorted((ROOT / "benchmarks" / "results").glob("gpu-h100-*.jsonl"))
GiB, MiB = 2**30, 2**20


def rows(picks: set[int]) -> list[dict]:
    """The measured rows of every run in the order the run measured them; with `picks`, each run's rows up to the
    last picked one (the rows before it shaped its process's allocator) and `report` set on the picked ones."""
    out = []
    for path in RUNS:
        run = [json.loads(line) for line in path.read_text().splitlines()]
        run = [dict(row, run=path.name, report=not picks or row["case"] in picks) for row in run
               if "case" in row and row.get("measured")]
        last = max((i for i, row in enumerate(run) if row["report"]), default=-1)
        out += run[:last + 1]
    return out


def check(row: dict) -> dict:
    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.estimator.allocator import THREAD_WORKSPACES, replay
    from memplan.estimator.overhead import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, reserved_bytes
    from memplan.plan import Plan
    from memplan.profile.trace import trace_training

    plan = Plan(model=row["preset"], **row["plan"])
    spec = resolve_model(row["preset"])
    t0 = time.perf_counter()
    # DDP: one rank's step traced in one process, DDP's own allocations spliced in where it makes them
    traced = trace_training(str(models_dir() / row["preset"]), plan.model_copy(update={"gpus": 1}), steps=3,
                            record_events=True, kernels="cuda")
    if plan.world_size > 1:
        traced.events = with_ddp(traced.events, spec, plan)
    out = {"case": row["case"], "run": row["run"], "report": row["report"], "preset": row["preset"],
           "fresh": row.get("fresh", False),
           "plan": row["plan"], "measured_reserved": [s["reserved"] for s in row["measured"]["steps"]],
           "measured_nvml": [s.get("nvml_used") for s in row["measured"]["steps"]],
           "measured_allocated": max(max(s[p] for p in ("forward", "backward", "optimizer"))
                                     for s in row["measured"]["steps"]),
           "traced_allocated": traced.peak + CUBLAS_WORKSPACE_BYTES,
           "estimate_reserved": estimate(spec, plan, kernels="cuda").reserved,
           "estimate_expandable": estimate(spec, plan.model_copy(update={"allocator": "expandable"}),
                                           kernels="cuda").reserved,
           "ratio_reserved": reserved_bytes(estimate(spec, plan, kernels="cuda").peak_allocated),
           "context": CUDA_CONTEXT_BYTES,
           "events": traced.events, "after_load": traced.after_load,
           "tied": spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else 0}
    assert 2 * sum(THREAD_WORKSPACES) == CUBLAS_WORKSPACE_BYTES
    for allocator in ("default", "expandable"):
        out[f"fresh_{allocator}"] = replay(traced.events, allocator).step_reserved
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def with_ddp(events: list[tuple], spec, plan) -> list[tuple]:
    """A one-process trace's events with DistributedDataParallel's (memplan.estimator.stream.ddp_events, checked
    against gloo ranks by benchmarks/ddp_stream_check.py): its wrap once the model is loaded (before the first
    step), its buckets' rebuild as the second step begins."""
    from memplan.estimator.stream import ddp_events

    wrap, rebuild = ddp_events(spec, plan, ids_step=-1)
    out, steps = [], 0
    for ev in events:
        steps += ev[0] == "s"
        if ev[0] == "s" and steps == 1:
            out += wrap
        out.append(ev)
        if ev[0] == "s" and steps == 2:
            out += rebuild
    return out


def replay_run(results: list[dict]) -> None:
    """Serve a run's rows one after another in one default allocator, as the process that measured them did
    (benchmarks/gpu_check.py without --fresh): `torch.empty(1, device="cuda")` before the first row;
    per row its model's weights in parameter order, then for tied embeddings the output embedding's own copy,
    which `to_empty` gave it (torch.nn.Module._apply makes a new Parameter for each module holding the tied one)
    and `tie_weights` freed; its steps; each thread's cuBLAS workspaces at the process's first cuBLAS op on that
    thread, never freed; then every tensor freed and `torch.cuda.empty_cache()`. Sets each row's "as_measured" to
    the reserved peak after each step since the row began (`reset_peak_memory_stats`). A row measured in a process
    of its own (`gpu_check.py --fresh`), or with expandable segments, is served alone, by its own allocator, as
    the fresh replay."""
    from memplan.estimator.allocator import THREAD_WORKSPACES, CachingAllocator

    alloc = CachingAllocator("default")
    alloc.free(alloc.malloc(1))
    workspaces = set()
    for r in results:
        if r.get("fresh") or _allocator(r) != "default":
            r["as_measured"] = r[f"fresh_{_allocator(r)}"]
            continue
        alloc.peak_reserved = alloc.reserved
        handles, steps = {}, []
        for ev in _with_untied_copy(r):
            if ev[0] == "a":
                handles[ev[1]] = alloc.malloc(ev[2])
            elif ev[0] == "f" and ev[1] in handles:
                alloc.free(handles.pop(ev[1]))
            elif ev[0] == "w" and ev[1] not in workspaces:
                workspaces.add(ev[1])
                for size in THREAD_WORKSPACES:
                    alloc.malloc(size)
            elif ev[0] == "s":
                steps.append(alloc.peak_reserved)  # the step before this one ended (none before the first)
        r["as_measured"] = steps[1:] + [alloc.peak_reserved]
        for handle in handles.values():
            alloc.free(handle)
        alloc.release_cache()


def _measured() -> str:
    """The measured runs: their files, what measured them, and how (one process, or one per row)."""
    parts = []
    for path in RUNS:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        head = next((r["header"] for r in lines if "header" in r), {})
        fresh = any(r.get("fresh") for r in lines if "case" in r)
        parts.append(f"`benchmarks/results/{path.name}` (torch {head.get('torch', '?')}, {head.get('device', '?')}; "
                     + ("each row in a process of its own)" if fresh else "its rows one after another in one process)"))
    return ", ".join(parts)


def _allocator(r: dict) -> str:
    return r["plan"].get("allocator", "default")


def _with_untied_copy(r: dict) -> list[tuple]:
    """The row's events with a tied output embedding's own copy allocated and freed right after the weights (the
    first allocations, `after_load` bytes); the copy has the size of the tied weight, the first of them that is
    a multiple of vocab x hidden elements."""
    events = r["events"]
    if not r["tied"]:
        return events
    live, end = 0, 0
    while live < r["after_load"]:
        live += events[end][2] if events[end][0] == "a" else 0
        end += 1
    size = next(ev[2] for ev in events[:end] if ev[0] == "a" and ev[2] % r["tied"] == 0)
    return events[:end] + [("a", -1, size), ("f", -1)] + events[end:]


def _err(predicted: float, measured: float) -> float:
    return 100 * (predicted - measured) / measured


def table(results: list[dict]) -> str:
    lines = ["# The caching allocator model vs what an H100 reserved", "",
             f"Measured: {_measured()}. Traced and "
             "replayed: each plan's step traced at full size with CUDA's kernel memory (`trace_training(..., "
             "record_events=True, kernels=\"cuda\")`), its allocations served by `memplan.estimator.allocator` "
             "(benchmarks/allocator_check.py): *as measured*, the run's rows one after another in one allocator, as "
             "the measuring process served them (`replay_run`: what earlier rows left, the harness's untied copy of a "
             "tied embedding, cuBLAS workspaces made once per thread); *fresh*, the row alone in a new process. "
             "*Estimate*: `memplan estimate`'s reserved figure, the allocation stream it builds from its own terms "
             "(`memplan.estimator.stream`, no trace) replayed through the same allocator as a fresh process; beside "
             "it the flat ratio (+7.4 %) it used before. cuBLAS workspaces: 32 MiB + 1 MiB for each of the main and "
             "the autograd thread, allocated at each thread's first cuBLAS op. Reserved = "
             "`torch.cuda.max_memory_reserved` after step 3; total = NVML's used memory vs reserved (as measured) + "
             "the CUDA context (1251 MiB). error % = 100 x (predicted - measured) / measured; *vs fresh*: against "
             "the traced step replayed fresh.", "",
             "| # | model | plan | allocated GiB (measured / traced) | reserved GiB measured | traced, as measured "
             "| error % | traced, fresh | error % | estimate | error % | vs fresh % | ratio | error % "
             "| expandable: traced / estimate | NVML GiB | traced total | error % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errs, fresh_errs, est_errs, est_fresh, ratio_errs = [], [], [], [], []
    for r in results:
        meas, rep, fresh = r["measured_reserved"][-1], r["as_measured"][-1], r[f"fresh_{_allocator(r)}"][-1]
        plan = ", ".join(f"{k}={v}" for k, v in r["plan"].items())
        nvml = r["measured_nvml"][-1]
        total = rep + r["context"]
        e, ef, ee = _err(rep, meas), _err(fresh, meas), _err(r["estimate_reserved"], meas)
        eef, er = _err(r["estimate_reserved"], fresh), _err(r["ratio_reserved"], meas)
        for acc, v in ((errs, e), (fresh_errs, ef), (est_errs, ee), (est_fresh, eef), (ratio_errs, er)):
            acc.append(v)
        lines.append(f"| {r['case']} | {r['preset']} | {plan} | {r['measured_allocated'] / GiB:.2f} / "
                     f"{r['traced_allocated'] / GiB:.2f} | {meas / GiB:.2f} | {rep / GiB:.2f} | {e:+.2f} | "
                     f"{fresh / GiB:.2f} | {ef:+.2f} | {r['estimate_reserved'] / GiB:.2f} | {ee:+.2f} | {eef:+.2f} | "
                     f"{r['ratio_reserved'] / GiB:.2f} | {er:+.2f} | "
                     f"{r['fresh_expandable'][-1] / GiB:.2f} / {r['estimate_expandable'] / GiB:.2f} | "
                     f"{nvml / GiB:.2f} | {total / GiB:.2f} | {_err(total, nvml):+.2f} |")
    exp_errs = [_err(r["estimate_expandable"], r["fresh_expandable"][-1]) for r in results]
    lines += ["", _summary("Traced, replayed as measured", errs), "", _summary("Traced, replayed fresh", fresh_errs),
              "", _summary("The estimate (its own allocation stream, replayed fresh)", est_errs), "",
              _summary("The estimate against the traced step replayed fresh", est_fresh), "",
              _summary("The estimate with expandable segments against the traced step replayed so", exp_errs), "",
              _summary("The flat ratio", ratio_errs), "",
              "The measured rows were taken one after another in one process, whose allocator kept what earlier "
              "rows left; a fresh process (what the estimate predicts) can reserve less or more than those rows "
              "show, which the traced replays bound: the estimate's error against the measured rows is, row by row, "
              "close to the fresh traced replay's.", ""]
    return "\n".join(lines)


def _summary(what: str, errs: list[float]) -> str:
    return (f"{what}: median error {statistics.median(errs):+.2f} %, range {min(errs):+.2f} ... {max(errs):+.2f} %, "
            f"within ±3 % on {sum(abs(e) <= 3 for e in errs)} of {len(errs)} rows.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", type=int)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "allocator-h100.md"))
    ap.add_argument("--jsonl", default=None, help="also write each row's numbers here (one JSON object a line)")
    args = ap.parse_args()
    results = []
    for row in rows(set(args.cases)):
        results.append(check(row))
        print(row["case"], row["preset"], f"traced in {results[-1]['seconds']} s", flush=True)
    for run in RUNS:
        replay_run([r for r in results if r["run"] == run.name])
    results = [r for r in results if r.pop("report")]
    for r in results:
        del r["events"]
        print(r["case"], r["preset"], f"measured {r['measured_reserved'][-1] / GiB:.2f} GiB",
              f"replayed {r['as_measured'][-1] / GiB:.2f} GiB (fresh {r[f'fresh_{_allocator(r)}'][-1] / GiB:.2f})")
    if args.jsonl:  # the rows of this run, replacing the file's
        write_table(Path(args.jsonl), "".join(json.dumps(r) + "\n" for r in results))
    write_table(Path(args.out), table(results))


def write_table(out: Path, text: str) -> None:
    """A results file written whole or not at all: a temporary file beside it, then renamed."""
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
