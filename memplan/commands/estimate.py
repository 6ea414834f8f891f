"""`memplan estimate`: gather the estimates (pure functions) and print them (a thin layer)."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import click

from memplan.cli_options import passed_overrides
from memplan.errors import UserError
from memplan.estimator import Estimate, estimate
from memplan.models import ModelSpec, resolve_model
from memplan.plan import Plan, build_plan, merge, read_plan_yaml
from memplan import report

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


def largest_fitting(make: Callable[[int], Estimate], capacity: int, hi: int) -> int:
    """Largest n in [1, hi] whose estimate fits `capacity` (memory grows with n); 0 if even 1 does not."""
    if make(1).total > capacity:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if make(mid).total <= capacity:
            lo = mid
        else:
            hi = mid - 1
    return lo


def best_of(estimates: list[Estimate], capacity: Optional[int]) -> Estimate:
    limit = capacity if capacity is not None else max(report.COMMON_SIZES_GIB) * report.GiB
    for e in estimates:
        if e.total <= limit:
            return e
    return min(estimates, key=lambda e: e.total)


def run(model: Optional[str], config_path: Optional[str], gpu: Optional[str], gpu_memory: Optional[str],
        max_batch: bool, max_seq: bool, as_json: bool, **opts: Any) -> None:
    overrides = passed_overrides(opts)
    base = read_plan_yaml(config_path) if config_path else {}
    model_ref = model or base.get("model")
    if not model_ref:
        raise UserError("no model: give --model (a preset such as llama-2-7b; `memplan models` lists them), "
                        "a config.json path, or a plan file with `model:`")
    capacity = resolve_capacity(gpu, gpu_memory)
    single = bool(config_path) or bool(set(overrides) - CLUSTER_FIELDS)

    if single:
        plan = build_plan(merge(dict(base, model=model_ref), overrides), source=config_path or "plan")
        spec = resolve_model(plan.model)
        check_lora_targets(spec, plan)
        result = estimate(spec, plan, capacity)
        limits = _limits(spec, plan, capacity, max_batch, max_seq)
        if as_json:
            click.echo(json.dumps(report.estimate_json(spec.name, spec.params_total, [result], **limits), indent=2))
            return
        click.echo(f"{spec.name}: {spec.params_total:,} parameters ({report._count(spec.params_total)})")
        click.echo(f"plan: {report.describe_plan(result)}, {plan.world_size} GPU(s), micro-batch {plan.micro_batch}"
                   f" x {plan.seq_len} tokens, grad-accum {plan.grad_accum}, checkpointing "
                   f"{'on' if plan.grad_ckpt else 'off'}, {plan.optimizer}, attn {plan.attn}\n")
        click.echo(report.breakdown_table(result))
        for key, value in limits.items():
            click.echo(f"{key.replace('_', ' ')}: {value}")
        click.echo(report.verdict(result))
        return

    spec = resolve_model(model_ref)  # from --model: a plan file makes the branch above
    cluster = {k: v for k, v in overrides.items() if k in CLUSTER_FIELDS}
    if any(l.kind == "experts" for l in spec.layer_linears):
        cluster["lora"] = {"dropout": 0.0}  # peft's expert adapters take no dropout (see check_lora_targets)
    estimates = [estimate(spec, build_plan(dict(row, model=str(model_ref), **cluster)), capacity)
                 for row in STANDARD_PLANS]
    if max_batch or max_seq:
        raise UserError("--max-batch / --max-seq need one plan: add plan flags (e.g. --method lora) or --config")
    if as_json:
        click.echo(json.dumps(report.estimate_json(spec.name, spec.params_total, estimates), indent=2))
        return
    n = estimates[0].plan.world_size
    where = f"{report.gib(capacity)} GiB per GPU" if capacity is not None else "no GPU given: fits by common size"
    click.echo(f"{spec.name}: {spec.params_total:,} parameters on {n} GPU(s); {where}")
    click.echo("defaults: micro-batch 1 x 2048 tokens, checkpointing on, AdamW (foreach), SDPA attention; "
               "memory per GPU in GiB (2^30)\n")
    click.echo(report.plans_table(estimates, capacity))
    best = best_of(estimates, capacity)
    click.echo(f"\nbest plan: {report.describe_plan(best)}\n")
    click.echo(report.breakdown_table(best))
    click.echo(report.verdict(best))


def _limits(spec: ModelSpec, plan: Plan, capacity: Optional[int], max_batch: bool, max_seq: bool) -> dict:
    if not (max_batch or max_seq):
        return {}
    if capacity is None:
        raise UserError("--max-batch / --max-seq need the GPU's memory: give --gpu or --gpu-memory")
    out = {}
    if max_batch:
        out["max_batch"] = largest_fitting(
            lambda b: estimate(spec, plan.model_copy(update={"micro_batch": b})), capacity, 4096)
    if max_seq:
        out["max_seq"] = largest_fitting(
            lambda s: estimate(spec, plan.model_copy(update={"seq_len": s})), capacity, 1 << 20)
    return out
