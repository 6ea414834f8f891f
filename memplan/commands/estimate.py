"""`memplan estimate`: gather the estimates (pure functions) and print them (a thin layer)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import click

from memplan import fit
from memplan.report import estimate as report
from memplan.cli.options import passed_overrides
from memplan.errors import UserError
from memplan.estimator import Estimate, estimate
from memplan.gpus import COMMON_SIZES_GIB
from memplan.models import ModelSpec, resolve_model
from memplan.plan import Plan, build_plan, merge, read_plan_yaml
from memplan.recommend.hardware import Target

if TYPE_CHECKING:  # the table's scoring is imported when a table is asked for
    from memplan.recommend.search import Candidate, Scorer

GiB = 1 << 30

# Flags that size the cluster rather than choose a plan: they keep the comparison table.
CLUSTER_FIELDS = {"gpus", "nodes"}

# The comparison table's rows: ordered by method (full FT first: best results when it fits), then by
# how little sharding and offload they need (less communication, faster steps).
STANDARD_PLANS: tuple[dict[str, Any], ...] = (
    dict(method="full", precision="amp-bf16"),
    dict(method="full", precision="bf16"),
    dict(method="full", precision="bf16-master", sharding="deepspeed", zero=1),
    dict(method="full", precision="bf16-master", sharding="deepspeed", zero=2),
    dict(method="full", precision="bf16-master", sharding="deepspeed", zero=3),
    dict(method="full", precision="bf16-master", sharding="deepspeed", zero=3, offload="optimizer"),
    dict(method="full", precision="bf16-master", sharding="deepspeed", zero=3, offload="optimizer+params"),
    dict(method="lora", precision="bf16"),
    dict(method="lora", precision="bf16-master", sharding="deepspeed", zero=3),
    dict(method="qlora", precision="bf16"),
)


def resolve_capacity(gpu: Optional[str], gpu_memory: Optional[str]) -> Optional[int]:
    from memplan import gpus

    if gpu and gpu_memory:
        raise UserError("give either --gpu or --gpu-memory, not both")
    if gpu:
        return gpus.resolve_gpu(gpu).memory_bytes
    if gpu_memory:
        return gpus.parse_memory(gpu_memory)
    local = gpus.local_gpus()
    return min(g.memory_bytes for g in local) if local else None


def check_lora_targets(spec: ModelSpec, plan: Plan) -> None:
    if not plan.trains_adapters:
        return
    allowed = [n for n in spec.linear_names() if n != "lm_head"]
    targets = allowed if plan.lora.targets == "all-linear" else plan.lora.targets
    for t in targets:
        if t not in allowed:
            raise UserError(f"LoRA target '{t}' is not a linear layer of {spec.name}'s decoder layers; "
                            f"allowed: {', '.join(allowed)} or all-linear")
    experts = [l.name for l in spec.layer_linears if l.kind == "experts" and l.name in targets]
    if experts and plan.lora.dropout > 0:
        dense = ",".join(l.name for l in spec.layer_linears if l.kind != "experts")
        raise UserError(f"peft adapts the MoE expert stacks ({', '.join(experts)}) through ParamWrapper, which "
                        f"has no LoRA dropout. Hint: --lora-dropout 0, or --lora-targets {dense}")


def largest(fits: Callable[[int], bool], hi: int) -> int:
    """Largest n in [1, hi] that fits (memory grows with n, so a binary search); 0 if even 1 does not."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_fitting(make: Callable[[int], Estimate], capacity: int, hi: int) -> int:
    """Largest n in [1, hi] whose estimate's total is within `capacity` bytes; 0 if even 1 is not."""
    return largest(lambda n: make(n).total <= capacity, hi)


METHOD_ORDER = ("full", "lora", "qlora")


@dataclass
class Row:
    """One plan of the comparison table, scored as `recommend` scores its candidates."""

    candidate: Candidate
    marks: list[str]  # "yes" / "no" / "no (host RAM)": for the target, or for each common size


def _mark(target: Target, e: Estimate) -> str:
    if target.fits(e.total, e.host_bytes):
        return "yes"
    return "no" if not target.device_fits(e.total) else "no (host RAM)"


def _score(plan: Plan, scorer: Scorer) -> Candidate:
    """recommend's candidate for one plan as given: one optimizer step of its own batch."""
    from memplan.recommend.search import Workload

    work = Workload(seq_len=plan.seq_len, effective_batch=plan.effective_batch,
                    examples_per_epoch=plan.effective_batch, epochs=1)
    return scorer.score(plan, work)


def best_row(rows: list[Row]) -> Optional[Row]:
    """recommend's rule (search.choose): the methods in the order full FT, LoRA, QLoRA; the first that fits
    without parameter offload, else the first that fits at all; within it the best fitting row by
    recommend's default priority (quality, then time by its time model)."""
    from memplan.recommend.search import choose

    fitting = {m: sorted((r.candidate for r in rows if r.candidate.plan.method == m and r.candidate.fits),
                         key=lambda c: c.key("quality")) for m in METHOD_ORDER}
    chosen = choose(METHOD_ORDER, fitting)
    return next((r for r in rows if r.candidate is chosen), None)


def _header(spec: ModelSpec, n: int, target: Optional[Target], judge_target: Target,
            assumptions: list[str]) -> list[str]:
    if target is not None:
        where = target.describe()
        rule = (f"fits: total within {target.usable_bytes / GiB:.2f} GiB per GPU and offloaded states within "
                f"{target.usable_host_bytes / GiB:.2f} GiB of host RAM per node ({100 * target.headroom:g} % "
                "headroom kept free)")
    else:
        where = "no GPU given: fits by common size"
        rule = (f"fits: total within {100 - 100 * judge_target.headroom:g} % of each size and offloaded states "
                f"within {judge_target.usable_host_bytes / GiB:.2f} GiB of host RAM per node; best plan for "
                f"{COMMON_SIZES_GIB[-1]} GiB")
    lines = [f"{spec.name}: {spec.params_total:,} parameters on {n} GPU(s); {where}",
             "defaults: micro-batch 1 x 2048 tokens, checkpointing on, AdamW (foreach), SDPA attention; memory per "
             "GPU in GiB (2^30); step s: recommend's time model", rule]
    if assumptions:
        lines += ["assumptions:"] + [f"  - {a}" for a in dict.fromkeys(assumptions)]
    return lines


def run(model: Optional[str], config_path: Optional[str], gpu: Optional[str], gpu_memory: Optional[str],
        host_memory: Optional[str], headroom: Optional[float], max_batch: bool, max_seq: bool, as_json: bool,
        **opts: Any) -> int:
    """The command's body; returns its exit code (0 fits, 1 does not fit: see the README's "Exit codes")."""
    overrides = passed_overrides(opts)
    base = read_plan_yaml(config_path) if config_path else {}
    model_ref = model or base.get("model")
    if not model_ref:
        raise UserError("no model: give --model (a preset such as llama-2-7b; `memplan models` lists them), "
                        "a config.json path, or a plan file with `model:`")
    if config_path or set(overrides) - CLUSTER_FIELDS:
        plan = build_plan(merge(dict(base, model=model_ref), overrides), source=config_path or "plan")
        spec = resolve_model(plan.model)
        check_lora_targets(spec, plan)
        return _one_plan(spec, plan, gpu, gpu_memory, host_memory, headroom, max_batch, max_seq, as_json)
    if max_batch or max_seq:
        raise UserError("--max-batch / --max-seq need one plan: add plan flags (e.g. --method lora) or --config")
    spec = resolve_model(model_ref)  # from --model: a plan file takes the branch above
    return _table(spec, model_ref, overrides, gpu, gpu_memory, host_memory, headroom, as_json)


def _one_plan(spec: ModelSpec, plan: Plan, gpu: Optional[str], gpu_memory: Optional[str], host_memory: Optional[str],
              headroom: Optional[float], max_batch: bool, max_seq: bool, as_json: bool) -> int:
    verdict = fit.plan_verdict(spec, plan, gpu, gpu_memory, host_memory, headroom)
    result, target = verdict.estimate, verdict.target
    limits = _limits(spec, plan, target, max_batch, max_seq)
    if as_json:
        out = report.estimate_json(spec.name, spec.params_total, [result], **limits)
        out["results"][0]["fits"] = verdict.fits
        out["results"][0]["fit"] = verdict.to_json()
        click.echo(json.dumps(out, indent=2))
        return verdict.exit_code
    unit = "process" if plan.device == "cpu" else "GPU"
    click.echo(f"{spec.name}: {spec.params_total:,} parameters ({report._count(spec.params_total)})")
    click.echo(f"plan: {report.describe_plan(result)}, {plan.world_size} {unit}(s), micro-batch {plan.micro_batch}"
               f" x {plan.seq_len} tokens, grad-accum {plan.grad_accum}, checkpointing "
               f"{'on' if plan.grad_ckpt else 'off'}, {plan.optimizer}, attn {plan.attn}")
    if target is not None:
        recorded = plan.target is not None and not (gpu or gpu_memory or host_memory)
        click.echo(f"target: {target.describe()}" + (" (the plan's recorded target)" if recorded else ""))
    if verdict.assumptions:
        click.echo("assumptions:\n" + "\n".join(f"  - {a}" for a in dict.fromkeys(verdict.assumptions)))
    click.echo("")
    click.echo(report.breakdown_table(result))
    for key, value in limits.items():
        click.echo(f"{key.replace('_', ' ')}: {value}")
    click.echo(verdict.text)
    return verdict.exit_code


def _table(spec: ModelSpec, model_ref: str, overrides: dict, gpu: Optional[str], gpu_memory: Optional[str],
           host_memory: Optional[str], headroom: Optional[float], as_json: bool) -> int:
    cluster = {k: v for k, v in overrides.items() if k in CLUSTER_FIELDS}
    if any(l.kind == "experts" for l in spec.layer_linears):
        cluster["lora"] = {"dropout": 0.0}  # peft's expert adapters take no dropout (see check_lora_targets)
    plans = [build_plan(dict(row, model=model_ref, **cluster)) for row in STANDARD_PLANS]
    assumptions: list[str] = []
    target = fit.resolve_plan_target(plans[0], gpu, gpu_memory, host_memory, headroom, assumptions)
    if target is not None:
        judge_target, sizes = target, [target]
    else:  # no GPU known: a mark for each common size, the best plan for the largest
        used = fit.DEFAULT_HEADROOM if headroom is None else headroom
        sizes = [fit.common_size_target(plans[0], g, used, host_memory) for g in COMMON_SIZES_GIB]
        judge_target = sizes[-1]
    assumptions += judge_target.assumptions
    from memplan.recommend.search import Scorer

    scorer = Scorer(spec, judge_target)
    rows = []
    for plan in plans:
        c = _score(plan, scorer)
        rows.append(Row(c, [_mark(t, c.estimate) for t in sizes]))
    best = best_row(rows)
    code = fit.FITS if best is not None else fit.DOES_NOT_FIT
    if as_json:
        out = report.estimate_json(spec.name, spec.params_total, [r.candidate.estimate for r in rows])
        for r, res in zip(rows, out["results"]):
            res["fits"] = r.candidate.fits
            res["step_s"] = r.candidate.step.total_s
            if target is None:
                res["fits_common_sizes_gib"] = [g for g, m in zip(COMMON_SIZES_GIB, r.marks) if m == "yes"]
        out["best"] = rows.index(best) if best else None
        out["target"] = {"name": judge_target.describe(), "usable_bytes": judge_target.usable_bytes,
                         "host_usable_bytes": judge_target.usable_host_bytes, "headroom": judge_target.headroom,
                         "common_sizes": target is None}
        out["assumptions"] = list(dict.fromkeys(assumptions))
        click.echo(json.dumps(out, indent=2))
        return code
    click.echo("\n".join(_header(spec, plans[0].world_size, target, judge_target, assumptions)) + "\n")
    fits_headers = ["fits"] if target else [f"{g}G" for g in COMMON_SIZES_GIB]
    click.echo(report.plans_table([(r.candidate.estimate, r.candidate.step.total_s, r.marks) for r in rows],
                                  fits_headers))
    if best is None:
        small = min(rows, key=lambda r: r.candidate.total).candidate
        click.echo(f"\nno plan fits: the smallest, {report.describe_plan(small.estimate)}, "
                   f"{judge_target.why_not(small.total, small.estimate.host_bytes)}")
        return code
    e = best.candidate.estimate
    click.echo(f"\nbest plan: {report.describe_plan(e)} (recommend's rule: the first of full FT, LoRA, QLoRA that "
               "fits without parameter offload, its fastest row)\n")
    click.echo(report.breakdown_table(e))
    click.echo(fit.judge(e, judge_target).text)
    return code


def _limits(spec: ModelSpec, plan: Plan, target: Optional[Target], max_batch: bool, max_seq: bool) -> dict:
    """The largest micro-batch / sequence that fits the target, by the verdict's own rule."""
    if not (max_batch or max_seq):
        return {}
    if target is None:
        raise UserError("--max-batch / --max-seq need the GPU's memory: give --gpu or --gpu-memory")

    def fits(p: Plan) -> bool:
        e = estimate(spec, p)
        return target.fits(e.total, e.host_bytes)

    out = {}
    if max_batch:
        out["max_batch"] = largest(lambda b: fits(plan.model_copy(update={"micro_batch": b})), 4096)
    if max_seq:
        out["max_seq"] = largest(lambda s: fits(plan.model_copy(update={"seq_len": s})), 1 << 20)
    return out
