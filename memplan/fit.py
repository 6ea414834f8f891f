"""Does a plan fit its hardware? The verdict for one resolved plan, as `memplan estimate` prints it and exits by.

The rule is `memplan.recommend.hardware.Target.fits`, the one `recommend` searches with: the device's total
(reserved + CUDA context) within (1 - headroom) x its memory, and the run's host RAM peak per node (loading,
offloaded states, saving: memplan.estimator.host) within (1 - headroom) x the node's RAM. This module
finds the hardware to judge against and words the answer:

1. --gpu / --gpu-memory / --host-memory / --headroom, each overriding
2. the plan's recorded `target` (what `recommend` planned it for), else
3. the local GPUs (NVML) for a CUDA plan, this machine's CPU and RAM for a CPU plan, else
4. nothing: a CUDA plan is then checked against common GPU sizes (COMMON_SIZES_GIB).

`plan_verdict(spec, plan)` is the entry point for other commands (e.g. a dry run); `limits` adds the largest
micro-batch and sequence that fit; `compare` scores the standard plans of `memplan estimate`'s table, and
`resolve_capacity` is the memory per GPU from --gpu / --gpu-memory or the local GPUs. Nothing here imports
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# COMMON_SIZES_GIB: the GPU sizes (GiB) a CUDA plan is checked against when no GPU is known
from memplan.catalog.gpus import COMMON_SIZES_GIB
from memplan.catalog.spec import ModelSpec
from memplan.errors import UserError
from memplan.estimator import Estimate, estimate
from memplan.estimator.activations import attention_runs
from memplan.estimator.search import largest
from memplan.plan import Plan, build_plan
from memplan.recommend.hardware import (
    Target,
    check_headroom,
    cpu_target,
    default_host_assumption,
    gpu_target,
    parse_size,
)
from memplan.report.units import GiB, format_bytes, gib

if TYPE_CHECKING:  # the table's scoring is imported when a table is asked for
    from memplan.recommend.search import Candidate
#: The headroom when neither --headroom nor the plan's target gives one (recommend's default).
DEFAULT_HEADROOM = 0.10

# Exit codes (README "Exit codes"): 0 the answer is yes, 1 it is no, 2 bad input.
FITS, DOES_NOT_FIT = 0, 1


@dataclass
class Verdict:
    """The answer for one plan. `fits` is None only for a CUDA plan with no GPU known; then `sizes` lists the
    common sizes (GiB) it fits and the exit code says whether it fits the largest."""

    fits: bool | None
    text: str
    target: Target | None = None
    sizes: list[int] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    estimate: Estimate | None = None

    @property
    def exit_code(self) -> int:
        if self.fits is None:
            return FITS if self.sizes else DOES_NOT_FIT
        return FITS if self.fits else DOES_NOT_FIT

    def to_json(self) -> dict:
        t, e = self.target, self.estimate
        within = e is not None and t is not None and t.device == "cuda"
        releases = e.cache_releases(t.usable_bytes) if within else None
        return {"fits": self.fits, "verdict": self.text, "fits_common_sizes_gib": self.sizes if t is None else None,
                "usable_bytes": t.usable_bytes if t else None,
                "host_usable_bytes": t.usable_host_bytes if t else None,
                # the total on this GPU: the allocator releases its cache where `total_bytes` is over the usable
                "total_within_usable_bytes": e.total_within(t.usable_bytes) if within else None,
                "cache_releases": {"first_step": releases[0], "per_step": releases[1]} if releases else None,
                "headroom": t.headroom if t else None, "assumptions": self.assumptions}


def resolve_plan_target(plan: Plan, gpu: str | None = None, gpu_memory: str | None = None,
                        host_memory: str | None = None, headroom: float | None = None,
                        assumptions: list[str] | None = None) -> Target | None:
    """The hardware to judge `plan` against (see the module docstring); None when no GPU is known for a
    CUDA plan. --gpu or --gpu-memory replaces the recorded GPU; --host-memory and --headroom their fields."""
    if gpu and gpu_memory:
        raise UserError("give either --gpu or --gpu-memory, not both")
    assumptions = [] if assumptions is None else assumptions
    recorded = plan.target
    if headroom is None:
        headroom = recorded.headroom if recorded else DEFAULT_HEADROOM
        if not recorded:
            assumptions.append(f"headroom {100 * headroom:g} %: a plan must fit {100 - 100 * headroom:g} % of each "
                               "memory (--headroom to change)")
    check_headroom(headroom)
    if plan.device == "cpu":
        if gpu or gpu_memory:
            raise UserError("--gpu / --gpu-memory do not apply to a CPU plan (device: cpu), which must fit host "
                            "RAM: give --host-memory, or plan for GPUs with --device cuda")
        if recorded and (recorded.gpu or recorded.gpu_memory):
            assumptions.append("the plan's target is a GPU but the plan runs on the CPU (device: cpu): checked "
                               "against this machine's RAM")
            recorded = None
        size = host_memory or (recorded.host_memory if recorded else None)
        return cpu_target(plan.gpus, headroom, assumptions, parse_size(size))
    if not (gpu or gpu_memory) and recorded:
        gpu, gpu_memory = recorded.gpu, recorded.gpu_memory
    if host_memory is None and recorded:
        host_memory = recorded.host_memory
    return gpu_target(gpu, gpu_memory, plan.gpus, plan.nodes, headroom, host_memory, assumptions)


def common_size_target(plan: Plan, size_gib: int, headroom: float, host_memory: str | None = None) -> Target:
    """A GPU of `size_gib` GiB for the plan's cluster (host RAM as --host-memory or the default per GPU)."""
    return gpu_target(None, size_gib * GiB, plan.gpus, plan.nodes, headroom, host_memory, [])


def judge(e: Estimate, target: Target | None, headroom: float = DEFAULT_HEADROOM,
          host_memory: str | None = None) -> Verdict:
    """The verdict for an estimate on `target` (None: the common GPU sizes)."""
    if target is not None:
        reason = target.why_not(e)
        if reason is None:
            host = f"; host RAM {gib(e.host_bytes)} of {format_bytes(target.usable_host_bytes)} usable per node"
            text = (f"fits: {format_bytes(e.total_within(target.usable_bytes))} {target.per_device} of "
                    f"{target.usable_explained()}{_clause(target.cache_release_note(e))}{host}")
        else:
            text = f"does not fit: {reason}"
        return Verdict(fits=reason is None, text=text, target=target)
    sized = [common_size_target(e.plan, s, headroom, host_memory) for s in COMMON_SIZES_GIB]
    sizes = [s for s, t in zip(COMMON_SIZES_GIB, sized) if t.fits(e)]
    if sizes:
        text = (f"fits GPUs of {', '.join(f'{s} GiB' for s in sizes)} ({100 * headroom:g} % headroom; no GPU given: "
                "--gpu ID or --gpu-memory SIZE for a verdict)")
    elif sized[-1].device_holds(e):
        text = f"does not fit a {COMMON_SIZES_GIB[-1]} GiB GPU: {sized[-1].why_not(e)}"
    else:
        text = (f"does not fit a {COMMON_SIZES_GIB[-1]} GiB GPU: {format_bytes(e.total)} per GPU, "
                f"{format_bytes(e.host_bytes)} host RAM per node ({100 * headroom:g} % headroom)")
    return Verdict(fits=None, text=text, sizes=sizes)


def _clause(note: str | None) -> str:
    return f"; {note}" if note else ""


def plan_verdict(spec: ModelSpec, plan: Plan, gpu: str | None = None, gpu_memory: str | None = None,
                 host_memory: str | None = None, headroom: float | None = None,
                 result: Estimate | None = None) -> Verdict:
    """Does a resolved plan fit? Its estimate (or `result`, already computed) against the hardware from the
    flags, the plan's recorded target, the local GPUs or this machine's CPU (module docstring).
    `Verdict.exit_code` is the command's exit status; `Verdict.text` the line to print."""
    assumptions: list[str] = []
    target = resolve_plan_target(plan, gpu, gpu_memory, host_memory, headroom, assumptions)
    result = result or estimate(spec, plan, target.memory_bytes if target else None)
    used = target.headroom if target else (headroom if headroom is not None else
                                           (plan.target.headroom if plan.target else DEFAULT_HEADROOM))
    verdict = judge(result, target, used, host_memory)
    verdict.estimate = result
    verdict.assumptions = list(dict.fromkeys(assumptions + (target.assumptions if target else [])))
    if target is None:  # the common sizes are judged with the default host RAM per GPU (or --host-memory)
        verdict.assumptions.append(default_host_assumption(plan.gpus) if host_memory is None else
                                   f"host RAM {host_memory} per node (--host-memory)")
    return verdict


def resolve_capacity(gpu: str | None, gpu_memory: str | None) -> int | None:
    """Memory per GPU in bytes: --gpu's preset, --gpu-memory, else the smallest local GPU's; None if none."""
    from memplan.catalog import gpus

    if gpu and gpu_memory:
        raise UserError("give either --gpu or --gpu-memory, not both")
    if gpu:
        return gpus.resolve_gpu(gpu).memory_bytes
    if gpu_memory:
        return gpus.parse_memory(gpu_memory)
    local = gpus.local_gpus()
    return min(g.memory_bytes for g in local) if local else None


#: The ranges --max-batch and --max-seq search: micro-batches up to 4096, sequences up to 2^20 tokens.
MAX_BATCH_SEARCHED, MAX_SEQ_SEARCHED = 4096, 1 << 20


def limits(spec: ModelSpec, plan: Plan, target: Target | None, max_batch: bool, max_seq: bool) -> dict[str, int]:
    """The largest micro-batch / sequence that fits the target, by the verdict's own rule (0: not even 1)."""
    if not (max_batch or max_seq):
        return {}
    if target is None:
        raise UserError("--max-batch / --max-seq need the GPU's memory: give --gpu or --gpu-memory")

    def largest_of(name: str, hi: int) -> int:
        def fits(n: int) -> bool:
            return target.fits(estimate(spec, plan.model_copy(update={name: n})))

        return largest(fits, range(1, hi + 1)) or 0

    out = {}
    if max_batch:
        out["max_batch"] = largest_of("micro_batch", MAX_BATCH_SEARCHED)
    if max_seq:
        out["max_seq"] = largest_of("seq_len", MAX_SEQ_SEARCHED)
    return out


# ------------------------------------------------------------------------------- the comparison table

#: Flags that size the cluster rather than choose a plan: with only these, `memplan estimate` compares plans.
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

METHOD_ORDER = ("full", "lora", "qlora")


@dataclass
class Row:
    """One plan of the comparison table, scored as `recommend` scores its candidates."""

    candidate: Candidate
    marks: list[str]  # "yes" / "no" / "no (host RAM)": for the target, or for each common size


@dataclass
class Comparison:
    """The standard plans for one model and cluster, marked against the target, or against each common GPU size
    when no GPU is known (`sizes_gib`); the best is judged against `judge` (the target, else the largest size)."""

    rows: list[Row]
    best: Row | None
    target: Target | None
    judge: Target
    sizes_gib: list[int]
    assumptions: list[str]
    verdict: Verdict | None  # the best plan's, on `judge`

    @property
    def exit_code(self) -> int:
        return FITS if self.best is not None else DOES_NOT_FIT


def _mark(target: Target, e: Estimate) -> str:
    if target.fits(e):
        return "yes (cache released)" if target.device == "cuda" and any(e.cache_releases(target.usable_bytes)) \
            else "yes"
    return "no" if not target.device_holds(e) else "no (host RAM)"


def best_row(rows: list[Row], target: Target) -> Row | None:
    """recommend's rule (search.choose): the methods in the order full FT, LoRA, QLoRA; the first that fits
    without parameter offload, else the first that fits at all; within it the best fitting row by
    recommend's default priority (quality, then time by its time model)."""
    from memplan.recommend.search import choose_fitting, rank

    fitting = {m: [r.candidate for r in rows if r.candidate.plan.method == m and r.candidate.fits]
               for m in METHOD_ORDER}
    for plans in fitting.values():
        rank(plans, "quality")
    chosen = choose_fitting(METHOD_ORDER, fitting, target)
    return next((r for r in rows if r.candidate is chosen), None)


def compare(spec: ModelSpec, model_ref: str, cluster: dict[str, Any], gpu: str | None = None,
            gpu_memory: str | None = None, host_memory: str | None = None,
            headroom: float | None = None) -> Comparison:
    """STANDARD_PLANS for `model_ref` on the cluster (`gpus`, `nodes`), each one optimizer step of its own batch
    scored by recommend's scorer, marked, and the best chosen by recommend's rule."""
    from memplan.recommend.search import Scorer, Workload, search_lora

    cluster = dict(cluster, attn=attention_runs(spec, "sdpa"))  # eager for a model without an SDPA path
    lora = search_lora(spec, model_ref, None)  # dropout 0 where an expert stack is a target
    if lora:
        cluster["lora"] = lora
    plans = [build_plan(dict(row, model=model_ref, **cluster)) for row in STANDARD_PLANS]
    assumptions: list[str] = []
    target = resolve_plan_target(plans[0], gpu, gpu_memory, host_memory, headroom, assumptions)
    if target is not None:
        judge_target, sizes, sizes_gib = target, [target], []
    else:  # no GPU known: a mark for each common size, the best plan for the largest
        used = DEFAULT_HEADROOM if headroom is None else headroom
        sizes_gib = list(COMMON_SIZES_GIB)
        sizes = [common_size_target(plans[0], g, used, host_memory) for g in sizes_gib]
        judge_target = sizes[-1]
    assumptions += judge_target.assumptions
    scorer = Scorer(spec, judge_target)
    rows = []
    for plan in plans:
        work = Workload(seq_len=plan.seq_len, effective_batch=plan.effective_batch,
                        examples_per_epoch=plan.effective_batch, epochs=1)
        c = scorer.score(plan, work)
        rows.append(Row(c, [_mark(t, c.estimate) for t in sizes]))
    best = best_row(rows, judge_target)
    verdict = judge(best.candidate.estimate, judge_target) if best is not None else None
    return Comparison(rows, best, target, judge_target, sizes_gib, list(dict.fromkeys(assumptions)), verdict)
