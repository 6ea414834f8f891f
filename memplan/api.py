"""memplan's Python API: the answers of `memplan estimate` and `memplan recommend`, as typed results.

    import memplan

    e = memplan.estimate("llama-2-7b", method="lora", micro_batch=4, gpu="a100-80gb")
    e.fits, e.total_bytes, e.phase_peaks["backward"], e.breakdown["activations"]
    table = memplan.compare("llama-2-7b", gpus=4)              # memplan estimate --model llama-2-7b --gpus 4
    rec = memplan.recommend("llama-2-7b", gpu="h100-80gb", dataset_size=20_000)
    rec.plan, rec.estimate.total, rec.to_json()

Each function runs the code its command runs, so its numbers are the command's: `to_json()` returns the
object `--json` prints for the same inputs. Bad input raises `memplan.errors.UserError` with the command's
one-line message; `recommend` raises `NoPlanFits` (its `rec` says what would fit instead) where the command
exits with 1. Like the commands, `estimate` and `compare` import neither torch nor transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan.errors import UserError
from memplan.plan import Plan, build_plan, merge, plan_fields

if TYPE_CHECKING:
    from memplan.catalog.spec import ModelSpec
    from memplan.recommend.core import Recommendation
    from memplan.trainers.source import ConfigSource

__all__ = ["PlanEstimate", "PlanTable", "estimate", "compare", "recommend", "resolve_plan", "UserError"]  # + NoPlanFits

#: The plan sections a keyword argument may give as a mapping: `lora={"rank": 8}`, `hparams={"lr": 1e-4}`.
SECTIONS = ("lora", "hparams", "data", "target")


@dataclass(frozen=True)
class PlanEstimate:
    """One plan's estimate and verdict: the fields of one `results` entry of `memplan estimate --json`
    (bytes per GPU, or per process for a CPU plan; host bytes per node)."""

    model: str
    params_total: int
    plan: Plan
    params_trainable: int
    peak_phase: str  # forward, backward or optimizer
    phase_peaks: dict[str, int]  # phase -> allocated bytes at its peak
    breakdown: dict[str, int]  # term -> bytes at the peak phase (memplan.estimator.phases.TERMS)
    peak_allocated_bytes: int  # what torch.cuda.max_memory_allocated would report
    reserved_bytes: int  # with the caching allocator's reserve
    reserved_basis: str  # "replayed" (the step's allocations through the allocator model), else why the ratio
    total_bytes: int  # with the CUDA context: what the GPU must hold
    host_peak_bytes: int  # host RAM per node at its peak phase
    host_peak_phase: str
    gpu_memory_bytes: int | None  # the GPU judged against (None: none known)
    fits: bool | None  # None: no GPU known; `verdict` then lists the common sizes it fits
    verdict: str
    limits: dict[str, int]  # max_batch / max_seq when asked for
    _json: dict = field(repr=False, compare=False)

    def to_json(self) -> dict:
        """What `memplan estimate --json` prints for this plan."""
        return copy.deepcopy(self._json)

    @classmethod
    def _from_json(cls, out: dict, plan: Plan, index: int = 0) -> PlanEstimate:
        r = out["results"][index]
        limits = {k: out[k] for k in ("max_batch", "max_seq") if k in out}
        return cls(model=out["model"]["name"], params_total=out["model"]["params_total"], plan=plan,
                   params_trainable=r["params_trainable"], peak_phase=r["peak_phase"],
                   phase_peaks=dict(r["phase_peaks"]), breakdown=dict(r["breakdown"]),
                   peak_allocated_bytes=r["peak_allocated_bytes"], reserved_bytes=r["reserved_bytes"],
                   reserved_basis=r["reserved_basis"],
                   total_bytes=r["total_bytes"], host_peak_bytes=r["host_peak_bytes"],
                   host_peak_phase=r["host_peak_phase"], gpu_memory_bytes=r["gpu_memory_bytes"], fits=r["fits"],
                   verdict=(r.get("fit") or {}).get("verdict", ""), limits=limits, _json=out)


@dataclass(frozen=True)
class PlanTable:
    """The comparison of `memplan estimate --model M [--gpus N]`: full FT, LoRA and QLoRA across DDP, ZeRO
    and offload, each row scored as recommend scores its candidates; `best` is recommend's pick (or None)."""

    model: str
    rows: list[PlanEstimate]
    step_seconds: list[float]  # each row's optimizer step by recommend's time model
    best: PlanEstimate | None
    _json: dict = field(repr=False, compare=False)

    def to_json(self) -> dict:
        """What `memplan estimate --json` prints for the comparison."""
        return copy.deepcopy(self._json)


def _overrides(fields: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments as the Plan's dotted paths: a section given as a mapping sets only its keys."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            out[key] = value
    return out


def _base(plan: Plan | dict | str | Path | None, accelerate_config: str | Path | None = None,
          ) -> tuple[dict[str, Any], str, ConfigSource | None]:
    """The plan the keyword arguments override, its name in error messages, and - for a trainer's config
    file, with the accelerate config that launches it - what was read from where (memplan.trainers)."""
    if accelerate_config is not None and not isinstance(plan, (str, Path)):
        raise UserError("accelerate_config goes with plan= a trainer's config path (TRL, axolotl or LLaMA-Factory)")
    if plan is None:
        return {}, "plan", None
    if isinstance(plan, Plan):
        return plan_fields(plan), "plan", None
    if isinstance(plan, dict):
        return dict(plan), "plan", None
    if isinstance(plan, (str, Path)):
        from memplan.trainers import read_config

        source = read_config(plan, accelerate_config)
        return source.plan, str(plan), source if source.format != "memplan" else None
    raise UserError(f"plan must be a memplan Plan, a dict of plan fields or a config file path, got "
                    f"{type(plan).__name__}")


def resolve_plan(model: str | None = None, plan: Plan | dict | str | Path | None = None, *,
                 accelerate_config: str | Path | None = None, **fields: Any) -> Plan:
    """A validated Plan: `plan` (a Plan, a dict, a plan YAML or a trainer's config path), then `model` and the
    keyword arguments (the Plan's fields, sections as mappings) over it. Errors are the CLI's: UserError, one
    line per field."""
    return _plan_and_source(model, plan, fields, accelerate_config)[0]


def _plan_and_source(model: str | None, plan: Plan | dict | str | Path | None,
                     fields: dict[str, Any], accelerate_config: str | Path | None = None,
                     ) -> tuple[Plan, ConfigSource | None]:
    base, name, source = _base(plan, accelerate_config)
    if model is not None:
        base["model"] = model
    if not base.get("model"):
        raise UserError("no model: give model= (a preset such as llama-2-7b; `memplan models` lists them), a "
                        "config.json path, a Hub id, or a plan with `model`")
    return build_plan(merge(base, _overrides(fields)), source=name), source


def estimate(model: str | None = None, plan: Plan | dict | str | Path | None = None, *, gpu: str | None = None,
             gpu_memory: str | int | None = None, host_memory: str | int | None = None,
             headroom: float | None = None, max_batch: bool = False, max_seq: bool = False,
             trust_remote_code: bool = False, accelerate_config: str | Path | None = None,
             **fields: Any) -> PlanEstimate:
    """One plan's memory per GPU by phase and whether it fits: `memplan estimate` with plan flags.

    model: a preset, config.json path, model directory or Hub id (as --model); plan: a Plan, a dict of plan
    fields, a plan YAML or a TRL / axolotl / LLaMA-Factory / torchtune config (as --config; `to_json()` then has
    its `config_source`); accelerate_config: the accelerate config that launches that trainer's config (as
    --accelerate-config: processes, FSDP / DeepSpeed, mixed precision); fields: the Plan's fields
    (method="lora", micro_batch=4, lora={"rank": 8}), over the plan. gpu / gpu_memory / host_memory / headroom
    as the flags (sizes as text, "24GiB", or bytes); max_batch / max_seq also search the largest micro-batch /
    sequence that fits.
    """
    from memplan.catalog import traced

    traced.trust_remote_code(trust_remote_code)
    p, source = _plan_and_source(model, plan, fields, accelerate_config)
    result = estimate_spec(_resolve(p.model), p, gpu=gpu, gpu_memory=gpu_memory, host_memory=host_memory,
                           headroom=headroom, max_batch=max_batch, max_seq=max_seq)
    if source is not None:  # a trainer's config: --json reports what was read from where
        result._json["config_source"] = source.to_json()
    return result


def estimate_spec(spec: ModelSpec, plan: Plan, *, gpu: str | None = None, gpu_memory: str | int | None = None,
                  host_memory: str | int | None = None, headroom: float | None = None, max_batch: bool = False,
                  max_seq: bool = False) -> PlanEstimate:
    """`estimate` for a model already read (a ModelSpec, e.g. from a live model's config: memplan.integrations)."""
    from memplan import fit
    from memplan.plan import check_lora_targets
    from memplan.report import estimate as report

    check_lora_targets(spec, plan)
    verdict = fit.plan_verdict(spec, plan, gpu, _size(gpu_memory), _size(host_memory), headroom)
    limits = fit.limits(spec, plan, verdict.target, max_batch, max_seq)
    return PlanEstimate._from_json(report.one_plan_json(spec, verdict, limits), plan)


def compare(model: str, *, gpus: int | None = None, nodes: int | None = None, gpu: str | None = None,
            gpu_memory: str | int | None = None, host_memory: str | int | None = None,
            headroom: float | None = None, trust_remote_code: bool = False) -> PlanTable:
    """The standard plans side by side: `memplan estimate --model M [--gpus N --nodes K]`."""
    from memplan import fit
    from memplan.catalog import traced
    from memplan.report import estimate as report

    traced.trust_remote_code(trust_remote_code)
    spec = _resolve(model)
    cluster = {k: v for k, v in (("gpus", gpus), ("nodes", nodes)) if v is not None}
    if cluster:  # validated as the Plan validates them, with its messages
        build_plan(merge({"model": model}, cluster))
    table = fit.compare(spec, model, cluster, gpu, _size(gpu_memory), _size(host_memory), headroom)
    out = report.comparison_json(spec, table)
    rows = [PlanEstimate._from_json(out, r.candidate.plan, i) for i, r in enumerate(table.rows)]
    best = rows[out["best"]] if out["best"] is not None else None
    return PlanTable(model=spec.name, rows=rows, step_seconds=[r["step_s"] for r in out["results"]], best=best,
                     _json=out)


def recommend(model: str, **request: Any) -> Recommendation:
    """`memplan recommend`: the decision tree's method and the fastest plan that fits, with its estimate,
    time, hyperparameters and alternatives (memplan.recommend.core.Recommendation; `to_json()` is --json).

    request: recommend's options by their long names (gpu="h100-80gb", gpus=4, data="train.jsonl",
    dataset_size=20000, domain_shift="high", method="lora", max_hours=12, priority="speed", out_dir="plan/"
    to write its files, ...). Raises NoPlanFits (its `rec` has the suggestions) when nothing fits.
    """
    import dataclasses

    from memplan.recommend.core import RecommendRequest, gather

    allowed = [f.name for f in dataclasses.fields(RecommendRequest) if f.name not in ("model", "show_progress")]
    unknown = [k for k in request if k not in allowed]
    if unknown:
        from memplan.errors import did_you_mean

        raise UserError(f"recommend() got an unknown option '{unknown[0]}'{did_you_mean(unknown[0], allowed)}; "
                        f"allowed: {', '.join(allowed)}")
    for key in ("gpu_memory", "host_memory"):
        request[key] = _size(request.get(key))
    return gather(RecommendRequest(model=model, **request))


def __getattr__(name: str):
    if name == "NoPlanFits":  # imported on use: the recommend package is heavier than the estimate path
        from memplan.recommend.core import NoPlanFits

        return NoPlanFits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(model: str):
    from memplan.catalog.resolve import resolve_model

    return resolve_model(model)


def _size(value: str | int | None) -> str | None:
    """A memory size as the flags take it: text ("24GiB") as given, an int as bytes."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"a memory size is a positive number of bytes or a text such as 24GiB, got {value!r}")
    return f"{value}B"
