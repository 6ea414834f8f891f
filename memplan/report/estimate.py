"""Turns estimates into tables for people and objects for --json. Bytes in, GiB (2^30) out.

`memplan estimate` prints one plan (`one_plan_text`, `one_plan_json`) or the comparison table
(`comparison_text`, `comparison_json`); recommend, profile and train's dry run reuse the breakdown table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from memplan.estimator import overhead
from memplan.estimator.host import PROCESS_BASELINE_BYTES
from memplan.estimator.phases import PHASES, TERMS, Estimate
from memplan.report.units import format_bytes, gib

if TYPE_CHECKING:
    from memplan.catalog.spec import ModelSpec
    from memplan.fit import Comparison, Verdict
    from memplan.plan import Plan


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
    method = {"full": "full FT", "lora": f"LoRA r{p.lora.rank}", "qlora": f"QLoRA r{p.lora.rank}",
              "lora-8bit": f"LoRA r{p.lora.rank} on int8"}[p.method]
    return f"{method} · {shard} · {p.precision}"


def processes(p: Plan, sep: str = ", ") -> str:
    """`sep` and how many GPUs (processes on the CPU) run the plan; nothing where `describe_plan` says "1 GPU"."""
    if p.sharding == "ddp" and p.world_size == 1:
        return ""
    return f"{sep}{p.world_size} {'process(es)' if p.device == 'cpu' else 'GPU(s)'}"


def plans_table(rows: list[tuple[Estimate, float, list[str]]], fits_headers: list[str]) -> str:
    """The comparison table: per row (estimate, step seconds, fits marks), with the marks' headers."""
    from tabulate import tabulate

    headers = ["plan", "trainable", "peak alloc", "reserved", "total", "host RAM/node", "step s"] + fits_headers
    table = []
    for e, step_s, marks in rows:
        table.append([describe_plan(e), count(e.params_trainable), gib(e.peak_allocated), gib(e.reserved),
                      gib(e.total), gib(e.host_bytes), f"{step_s:.2f}", *marks])
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
        setup = e.setup_allocated
        extra = [
            f"peak allocated {gib(e.peak_allocated)} GiB in the {e.peak_phase} phase "
            "(predicts torch.cuda.max_memory_allocated"
            + (f"; {setup_moment(e.plan)} peaks higher, at {gib(setup)} GiB, before the first step)"
               if setup else ")"),
            f"reserved {gib(e.reserved)} GiB ({reserved_note(e)}), "
            f"total {gib(e.total)} GiB with the CUDA context"
            + (" and NCCL" if e.plan.world_size > 1 else ""),
        ]
    extra.append(host_line(e))
    extra.append(f"disk: resumable checkpoint {gib(e.disk['checkpoint_bytes'])} GiB, "
                 f"final {'model' if e.plan.method == 'full' else 'adapter'} {gib(e.disk['artifact_bytes'])} GiB")
    return table + "\n" + "\n".join(extra)


def host_line(e: Estimate) -> str:
    """The host RAM line: the peak per node, its phase, each phase and what the processes count
    (memplan.estimator.host)."""
    h = e.host
    phases = ", ".join(f"{p} {gib(v)}" for p, v in h.phase_peaks.items())
    offload = f"; {gib(e.host_offload_bytes)} GiB offloaded states" if e.host_offload_bytes else ""
    n = e.plan.gpus
    return (f"host RAM per node: peak {gib(e.host_bytes)} GiB in the {h.peak_phase} phase ({phases} GiB; "
            f"{n} process{'es' if n > 1 else ''} x {format_bytes(PROCESS_BASELINE_BYTES, 'MiB', digits=0)} "
            f"baseline bound{offload})")


def count(n: int) -> str:
    """A count in thousands, millions or billions: count(6738415616) == '6.74B'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def estimate_json(model_name: str, params_total: int, estimates: Iterable[Estimate], **extra) -> dict:
    out = {"model": {"name": model_name, "params_total": params_total},
           "results": [e.to_json() for e in estimates]}
    out.update(extra)
    return out


def frozen_json(spec: ModelSpec) -> dict:
    """A multimodal model's frozen vision parts, for the --json model object (empty for a text model)."""
    if not spec.frozen_items:
        return {}
    from memplan.catalog.vision import FROZEN_ASSUMPTION

    return {"multimodal": spec.wrapper, "language_model": spec.model_type, "params_frozen": spec.params_frozen,
            "frozen": [{"module": i.path, "params": i.params, "what": i.formula} for i in spec.frozen_items],
            "frozen_assumption": FROZEN_ASSUMPTION}


def model_lines(spec: ModelSpec, first: str) -> list[str]:
    """The model's header line ``first``, then, for a multimodal model, what it counts as frozen."""
    if not spec.frozen_items:
        return [first]
    from memplan.catalog.vision import FROZEN_ASSUMPTION

    parts = ", ".join(f"{i.path} {i.params:,}" for i in spec.frozen_items)
    return [first, f"multimodal ({spec.wrapper}): the counts above are its {spec.model_type} language model; "
                   f"+ {spec.params_frozen:,} frozen parameters ({count(spec.params_frozen)}: {parts}); "
                   f"{FROZEN_ASSUMPTION}"]


def _model_label(spec: ModelSpec) -> str:
    """"; calibrated by trace (first run N s)" for a model without a family module, else ""."""
    from memplan.estimator.calibrated import label

    text = label(spec)
    return f"; {text}" if text else ""


def _with_calibration(spec: ModelSpec, out: dict) -> dict:
    from memplan.estimator.calibrated import label

    if label(spec):
        out["model"]["calibration"] = label(spec)
    return out


def one_plan_json(spec: ModelSpec, verdict: Verdict, limits: dict[str, int]) -> dict:
    out = _with_calibration(spec, estimate_json(spec.name, spec.params_total, [verdict.estimate], **limits))
    out["model"].update(frozen_json(spec))
    out["results"][0]["fits"] = verdict.fits
    out["results"][0]["fit"] = verdict.to_json()
    return out


def one_plan_text(spec: ModelSpec, plan: Plan, verdict: Verdict, limits: dict[str, int], recorded: bool) -> str:
    """One plan by phase, with its target (`recorded`: the plan's own), assumptions, limits and verdict."""
    result, target = verdict.estimate, verdict.target
    lines = [*model_lines(spec, f"{spec.name}: {spec.params_total:,} parameters ({count(spec.params_total)})"
                                f"{_model_label(spec)}"),
             f"plan: {describe_plan(result)}{processes(plan)}, micro-batch {plan.micro_batch} x "
             f"{plan.seq_len} tokens, grad-accum {plan.grad_accum}, checkpointing {plan.checkpointing}, "
             f"{plan.optimizer}, attn {plan.attn}"
             + (f", allocator {plan.allocator}" if plan.allocator != "default" else "")]
    if target is not None:
        lines.append(f"target: {target.describe()}" + (" (the plan's recorded target)" if recorded else ""))
    if verdict.assumptions:
        lines += ["assumptions:"] + [f"  - {a}" for a in dict.fromkeys(verdict.assumptions)]
    lines += ["", breakdown_table(result)]
    lines += [f"{key.replace('_', ' ')}: {value}" for key, value in limits.items()]
    lines.append(verdict.text)
    return "\n".join(lines)


def comparison_json(spec: ModelSpec, comparison: Comparison) -> dict:
    rows, judge = comparison.rows, comparison.judge
    out = _with_calibration(spec, estimate_json(spec.name, spec.params_total, [r.candidate.estimate for r in rows]))
    out["model"].update(frozen_json(spec))
    for r, res in zip(rows, out["results"]):
        res["fits"] = r.candidate.fits
        res["step_s"] = r.candidate.step.total_s
        if comparison.target is None:
            res["fits_common_sizes_gib"] = [g for g, m in zip(comparison.sizes_gib, r.marks) if m.startswith("yes")]
    out["best"] = rows.index(comparison.best) if comparison.best else None
    out["target"] = {"name": judge.describe(), "usable_bytes": judge.usable_bytes,
                     "host_usable_bytes": judge.usable_host_bytes, "headroom": judge.headroom,
                     "common_sizes": comparison.target is None}
    out["assumptions"] = comparison.assumptions
    return out


def _comparison_header(spec: ModelSpec, comparison: Comparison) -> list[str]:
    target, judge = comparison.target, comparison.judge
    if target is not None:
        where = target.describe()
        rule = (f"fits: total within {format_bytes(target.usable_bytes)} per GPU (\"cache released\": once the "
                f"caching allocator releases its cache) and the host RAM peak within "
                f"{format_bytes(target.usable_host_bytes)} per node ({100 * target.headroom:g} % "
                "headroom kept free)")
    else:
        where = "no GPU given: fits by common size"
        rule = (f"fits: total within {100 - 100 * judge.headroom:g} % of each size and the host RAM peak "
                f"within {format_bytes(judge.usable_host_bytes)} per node; best plan for "
                f"{comparison.sizes_gib[-1]} GiB")
    n = comparison.rows[0].candidate.plan.world_size
    lines = [*model_lines(spec, f"{spec.name}: {spec.params_total:,} parameters on {n} GPU(s); {where}"
                                f"{_model_label(spec)}"),
             "defaults: micro-batch 1 x 2048 tokens, checkpointing on, AdamW (foreach), SDPA attention; memory per "
             "GPU in GiB (2^30); reserved: the step's allocations replayed through PyTorch's caching allocator "
             "(one GPU, DDP, FSDP, DeepSpeed ZeRO), else the measured median reserve; step s: recommend's "
             "time model", rule]
    if comparison.assumptions:
        lines += ["assumptions:"] + [f"  - {a}" for a in comparison.assumptions]
    return lines


def comparison_text(spec: ModelSpec, comparison: Comparison) -> str:
    """The comparison table under its header, then the best plan's breakdown and verdict (or why none fits)."""
    rows, best = comparison.rows, comparison.best
    fits_headers = [f"{g}G" for g in comparison.sizes_gib] if comparison.target is None else ["fits"]
    lines = _comparison_header(spec, comparison) + [""]
    lines.append(plans_table([(r.candidate.estimate, r.candidate.step.total_s, r.marks) for r in rows], fits_headers))
    if best is None:
        small = min(rows, key=lambda r: r.candidate.total).candidate
        e = small.estimate
        why = comparison.judge.why_not(e)
        lines.append(f"\nno plan fits: the smallest, {describe_plan(small.estimate)}, {why}")
        return "\n".join(lines)
    e = best.candidate.estimate
    lines.append(f"\nbest plan: {describe_plan(e)} (recommend's rule: the first of full FT, LoRA, QLoRA that "
                 "fits without parameter offload, its fastest row)\n")
    lines += [breakdown_table(e), comparison.verdict.text]
    return "\n".join(lines)


def reserved_note(e) -> str:
    """Where the reserved figure comes from: the step replayed through the allocator model, or the ratio."""
    if e.replayed is not None:
        return (f"the step's allocations replayed through PyTorch's caching allocator, {e.plan.allocator} "
                f"{'segments' if e.plan.allocator == 'default' else 'segments (expandable_segments:True)'}")
    why = e.reserved_basis.removeprefix("measured ratio (").removesuffix(")")
    return (f"the measured median allocator reserve, +{100 * overhead.ALLOCATOR_FRAGMENTATION:.1f} %: {why}"
            + ("; measured with the default allocator" if e.plan.allocator != "default" else ""))



def setup_moment(plan) -> str:
    """What allocates the most before the first step, where that is the run's peak (Estimate.setup_allocated)."""
    if plan.sharding == "deepspeed":
        return "DeepSpeed's initialization, cloning this rank's partition on the GPU beside the flat weights,"
    if plan.sharding == "fsdp" and plan.quantized_base:
        return "loading, with the whole 4-bit model on every GPU until FSDP has made its shards,"
    if plan.sharding == "fsdp":
        return "FSDP's sharded load"
    return "DDP's broadcast as it wraps the model"
