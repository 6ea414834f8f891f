"""Turns estimates into tables for people and objects for --json. Bytes in, GiB (2^30) out."""

from __future__ import annotations

from typing import Iterable

from memplan.estimator.phases import PHASES, TERMS, Estimate

GiB = 1 << 30


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def describe_plan(e: Estimate) -> str:
    p = e.plan
    if p.sharding == "ddp":
        shard = "DDP" if p.world_size > 1 else ("1 process" if p.device == "cpu" else "1 GPU")
    elif p.sharding == "fsdp":
        shard = {0: "FSDP NO_SHARD", 2: "FSDP SHARD_GRAD_OP", 3: "FSDP FULL_SHARD"}[p.zero]
    else:
        shard = f"ZeRO-{p.zero}"
    if p.offload != "none":
        shard += f" + offload {p.offload}"
    method = {"full": "full FT", "lora": f"LoRA r{p.lora.rank}", "qlora": f"QLoRA r{p.lora.rank}"}[p.method]
    return f"{method} · {shard} · {p.precision}"


def plans_table(rows: list[tuple[Estimate, float, list[str]]], fits_headers: list[str]) -> str:
    """The comparison table: per row (estimate, step seconds, fits marks), with the marks' headers."""
    from tabulate import tabulate

    headers = ["plan", "trainable", "peak alloc", "reserved", "total", "host RAM/node", "step s"] + fits_headers
    table = []
    for e, step_s, marks in rows:
        table.append([describe_plan(e), _count(e.params_trainable), gib(e.peak_allocated), gib(e.reserved),
                      gib(e.total), gib(e.host_bytes) if e.host_bytes else "-", f"{step_s:.2f}", *marks])
    return tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True)


def breakdown_table(e: Estimate) -> str:
    from tabulate import tabulate

    rows = []
    for term in TERMS:
        vals = [e.phases[p][term] for p in PHASES]
        if any(vals):
            rows.append([term.replace("_", " ")] + [gib(v) for v in vals])
    rows.append(["= allocated"] + [gib(e.phase_peaks[p]) for p in PHASES])
    table = tabulate(rows, headers=["term (GiB)"] + list(PHASES), tablefmt="simple", disable_numparse=True)
    if e.plan.device == "cpu":
        extra = [f"peak tensor memory {gib(e.peak_allocated)} GiB in the {e.peak_phase} phase, per process "
                 "(live tensor bytes on the CPU; the Python process itself comes on top)"]
    else:
        extra = [
            f"peak allocated {gib(e.peak_allocated)} GiB in the {e.peak_phase} phase "
            "(predicts torch.cuda.max_memory_allocated)",
            f"reserved {gib(e.reserved)} GiB (allocator), total {gib(e.total)} GiB with the CUDA context"
            + (" and NCCL" if e.plan.world_size > 1 else ""),
        ]
    if e.host_bytes:
        extra.append(f"host RAM per node for offloaded states: {gib(e.host_bytes)} GiB")
    extra.append(f"disk: resumable checkpoint {gib(e.disk['checkpoint_bytes'])} GiB, "
                 f"final {'model' if e.plan.method == 'full' else 'adapter'} {gib(e.disk['artifact_bytes'])} GiB")
    return table + "\n" + "\n".join(extra)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def estimate_json(model_name: str, params_total: int, estimates: Iterable[Estimate], **extra) -> dict:
    out = {"model": {"name": model_name, "params_total": params_total},
           "results": [e.to_json() for e in estimates]}
    out.update(extra)
    return out
