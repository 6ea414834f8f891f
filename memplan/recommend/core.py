"""`memplan recommend`: the decision tree, the plan search, hyperparameters and the result object.

Gathering (this module) is apart from printing (memplan.report.recommend) and writing (`writers.py`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from memplan.catalog.resolve import resolve_model
from memplan.catalog.spec import ModelSpec
from memplan.errors import UserError
from memplan.estimator import Estimate, estimate
from memplan.estimator.activations import attention_runs
from memplan.plan import MAX_NUMBER, DataSettings, Plan, build_plan
from memplan.recommend import hparams as hp
from memplan.recommend import throughput
from memplan.recommend.data_stats import DataStats, measure_data
from memplan.recommend.hardware import HOST_RAM_PER_GPU, PROCESS_BASELINE_BYTES, Target, resolve_target
from memplan.recommend.search import (
    PRIORITIES,
    Candidate,
    Scorer,
    SearchResult,
    Workload,
    choose_fitting,
    layout,
    per_gpu_batch,
    search,
    smallest,
)
from memplan.recommend.tree import Context, Step, Tree, load_tree
from memplan.report.units import GiB, format_bytes, gib

#: Sequence length when neither --seq-len nor --data gives one (the Plan's default).
DEFAULT_SEQ_LEN = 2048
#: Default time budget for "enough compute" (the tree's second question), hours.
DEFAULT_MAX_HOURS = 72.0
METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}


class NoPlanFits(Exception):
    """No plan of the method(s) fits; carries the recommendation-so-far with its suggestions."""

    def __init__(self, rec: Recommendation):
        super().__init__("no plan fits")
        self.rec = rec


@dataclass
class RecommendRequest:
    """What `memplan recommend` was asked: its options, under the same names (memplan.cli.recommend)."""

    model: str
    gpus: int | None = None
    nodes: int = 1
    gpu: str | None = None
    gpu_memory: str | None = None
    data: str | None = None
    validation: str | None = None
    replay: str | None = None
    dataset_size: int | None = None
    seq_len: int | None = None
    domain_shift: str | None = None
    method: str | None = None
    effective_batch: int | None = None
    epochs: float | None = None
    max_hours: float | None = None
    priority: str = "quality"
    headroom: float = 0.10
    host_memory: str | None = None
    lr: float | None = None
    warmup_ratio: float | None = None
    out_dir: str | None = None
    emit: str | None = None
    plot: str | None = None
    show_progress: bool = False


@dataclass
class Alternative:
    candidate: Candidate
    why_not: str

    def to_json(self) -> dict:
        c = self.candidate
        return {"plan": c.plan.model_dump(mode="json"), "why_not": self.why_not, "fits": c.fits,
                "total_bytes": c.total, "hours": c.hours if math.isfinite(c.hours) else None}


@dataclass
class Recommendation:
    request: RecommendRequest
    spec: ModelSpec
    target: Target
    workload: Workload
    samples: int
    domain_shift: str
    max_hours: float
    data: DataStats | None
    validation_examples: int | None  # what `memplan train` will validate on (hparams.validation_examples)
    steps: list[Step]
    method_reason: str
    tree: Tree
    leaf: str | None
    searches: dict[str, SearchResult]
    chosen: Candidate | None = None
    plan: Plan | None = None
    estimate: Estimate | None = None
    hparams: hp.Hparams | None = None
    alternatives: list[Alternative] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    emitted: list = field(default_factory=list)  # memplan.trainers.emit.Emitted, one per --emit trainer

    @property
    def method(self) -> str | None:
        return self.plan.method if self.plan else None

    def decision_json(self) -> list[dict]:
        out = [s.to_json() for s in self.steps]
        out.append({"question": "Which method?", "answer": self.method or "none", "reason": self.method_reason})
        return out

    def to_json(self) -> dict:
        scored = sum(r.scored for r in self.searches.values())
        considered = sum(r.considered for r in self.searches.values())
        out = {
            "plan": self.plan.model_dump(mode="json") if self.plan else None,
            "decision": self.decision_json(),
            "estimate": self.estimate.to_json() if self.estimate else None,
            "alternatives": [a.to_json() for a in self.alternatives],
            "files": self.files,
            "trainer_configs": [e.to_json() for e in self.emitted],
            "time": None,
            "hparams": None,
            "target": {"device": self.target.device, "name": self.target.name, "gpus": self.target.gpus,
                       "nodes": self.target.nodes, "memory_bytes": self.target.memory_bytes,
                       "usable_bytes": self.target.usable_bytes, "headroom": self.target.headroom,
                       "host_memory_bytes": self.target.host_memory_bytes or None,
                       "host_usable_bytes": self.target.usable_host_bytes,
                       "cpu": dataclasses.asdict(self.target.cpu) if self.target.cpu else None},
            "data": self.data.to_json() if self.data else None,
            "samples": self.samples,
            "warnings": self.warnings,
            "assumptions": self.assumptions,
            "suggestions": self.suggestions,
            "search": {"plans_scored": scored, "plans_considered": considered},
        }
        if self.chosen:
            c = self.chosen
            span = throughput.time_range(self.spec, c.step, self.target)
            out["time"] = {"optimizer_steps": c.steps, "hours": c.hours, **c.step.to_json(),
                           "likely_hours": [c.steps * span.low_s / 3600, c.steps * span.high_s / 3600],
                           "likely_basis": span.basis, "extrapolating": span.extrapolating}
        if self.hparams:
            out["hparams"] = {"total_steps": self.hparams.total_steps, "replay_ratio": self.hparams.replay_ratio,
                              "reasons": self.hparams.reasons}
        return out


# ------------------------------------------------------------------------------- inputs


def _check_request(req: RecommendRequest) -> None:
    if req.priority not in PRIORITIES:
        raise UserError(f"--priority {req.priority}: allowed: {', '.join(PRIORITIES)}")
    for name, value in (("--gpus", req.gpus), ("--nodes", req.nodes), ("--dataset-size", req.dataset_size),
                        ("--seq-len", req.seq_len), ("--effective-batch", req.effective_batch)):
        if value is not None and value <= 0:
            raise UserError(f"{name} {value}: must be a positive whole number")
    for name, value in (("--epochs", req.epochs), ("--max-hours", req.max_hours)):
        if value is not None and not value > 0:
            raise UserError(f"{name} {value}: must be more than 0")
    if req.data and req.dataset_size:
        raise UserError("give either --data FILE.jsonl (counted) or --dataset-size N, not both")
    if not req.data and not req.dataset_size:
        raise UserError("give --data FILE.jsonl or --dataset-size N (training examples): the tree's 10K question, "
                        "the warmup and the training time depend on it")
    for flag, path in (("--validation", req.validation), ("--replay", req.replay)):
        if path and not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")


def _train_examples(stats: DataStats, has_validation: bool) -> int:
    """Examples the trainer trains on: all of --data with a validation file, else all but the held-out
    val_ratio (the Plan's default)."""
    from memplan.train.data import held_out_count

    if has_validation:
        return stats.examples
    return max(1, stats.examples - held_out_count(stats.examples, DataSettings.model_fields["val_ratio"].default))


# ------------------------------------------------------------------------------- the tree's compute test


def _full_ft_test(rec: Recommendation, scorer: Scorer, model_ref: str) -> tuple[bool, str]:
    r = search(rec.spec, model_ref, "full", rec.target, rec.workload, rec.request.priority, scorer,
               allow_param_offload=False)
    rec.searches["full (no parameter offload)"] = r
    where = rec.target.describe()
    if not r.fitting:
        small = r.smallest()
        return False, (f"full FT needs at least {format_bytes(small.total, digits=1)} per device "
                       f"({small.family()}, micro-batch 1) on {where}: "
                       f"> {format_bytes(rec.target.usable_bytes, digits=1)} usable -> does not fit")
    fastest = min(r.fitting, key=lambda c: c.hours)
    fits = (f"full FT needs {format_bytes(fastest.total, digits=1)} per device with {fastest.family()} "
            f"on {where} -> fits")
    if fastest.hours > rec.max_hours:
        return False, f"{fits}, but takes {fastest.hours:.1f} h > --max-hours {rec.max_hours:g}"
    return True, f"{fits}, {fastest.hours:.1f} h <= {rec.max_hours:g} h"


# ------------------------------------------------------------------------------- alternatives


def why_not(alt: Candidate, best: Candidate, priority: str, target: Target) -> str:
    if not alt.fits:
        return target.why_not(alt.estimate, at=" at micro-batch 1")
    slower = alt.hours > best.hours * (1 + 1e-9)
    parts = []
    if alt.quality_cost > best.quality_cost:
        if alt.plan.method == "full" and alt.plan.precision == "bf16" and best.plan.precision != "bf16":
            parts.append("pure bf16 weights lose small updates (quality)")
        if "8bit" in alt.plan.optimizer and "8bit" not in best.plan.optimizer:
            parts.append("8-bit optimizer states (quality)")
    if slower:
        a, b = alt.step, best.step
        diffs = [f"{name} {a.terms[name] - b.terms[name]:+.3g} s" for name in throughput.TERMS
                 if a.terms[name] != b.terms[name]]
        pct = 100 * (alt.hours / best.hours - 1)
        more = f"{pct:.0f}" if pct >= 10 else f"{pct:.2g}"
        parts.append(f"slower: {a.total_s:.4g} vs {b.total_s:.4g} s per step, +{more} % ({', '.join(diffs)})")
    if priority == "memory" and alt.total > best.total:
        parts.append(f"more memory: {gib(alt.total)} vs {format_bytes(best.total)}")
    if not parts:
        parts.append("as fast, with more moving parts (ties go to the simpler plan)")
    return "; ".join(parts)


def pick_alternatives(result: SearchResult, best: Candidate, priority: str, target: Target,
                      n_fit: int = 8, n_nofit: int = 4) -> list[Alternative]:
    """The best plan of each other data-parallel layout, then the smallest of each layout that does not fit."""
    out, seen = [], {layout(best)}
    for c in result.fitting:
        fam = layout(c)
        if fam in seen:
            continue
        seen.add(fam)
        out.append(Alternative(c, why_not(c, best, priority, target)))
        if len(out) >= n_fit:
            break
    seen |= {layout(c) for c in result.fitting}  # a layout that fits in some form is not "does not fit"
    nofit = 0
    for c in result.not_fitting:
        fam = layout(c)
        if fam in seen:
            continue
        seen.add(fam)
        out.append(Alternative(c, why_not(c, best, priority, target)))
        nofit += 1
        if nofit >= n_nofit:
            break
    return out


# ------------------------------------------------------------------------------- no fit: what would


def _host_ok(c: Candidate, target: Target) -> bool:
    return target.host_fits(c.estimate.host_bytes)


def _suggest(rec: Recommendation, scorer: Scorer, model_ref: str, tried: list[str]) -> list[str]:
    """What would fit instead: another method, more host RAM, a bigger GPU, more GPUs, a shorter sequence."""
    out = _other_methods(rec, scorer, model_ref, tried)
    pool = [c for m in tried for c in (rec.searches[m].fitting + rec.searches[m].not_fitting)]
    if not pool:
        return out
    target = rec.target
    host_ok = [c for c in pool if _host_ok(c, target)]
    least = smallest(host_ok or pool)
    need = least.total / (1 - target.headroom)
    if target.device == "cuda":
        out += _more_host_memory(pool, target)
        if host_ok:  # else no GPU helps: every plan is over the host's RAM, which the line above answers
            out += _bigger_gpus(least, need)
        out += _more_gpus(rec, least)
    else:
        # each process's tensors and interpreter within its share (Target.usable_bytes), and the host peak
        per_process = least.plan.world_size * (need + PROCESS_BASELINE_BYTES)
        ram = format_bytes(max(per_process, least.estimate.host_bytes / (1 - target.headroom)) + GiB / 2, digits=0)
        out.append(f"a machine with at least {ram} of RAM, or a GPU (--gpu ID); "
                   f"the smallest plan needs {format_bytes(least.total)} per process, "
                   f"{format_bytes(least.estimate.host_bytes)} of host RAM at its peak")
    if rec.workload.seq_len > 512:
        shorter = least.plan.model_copy(update={"seq_len": rec.workload.seq_len // 2})
        e = estimate(rec.spec, shorter, target.memory_bytes)
        if target.fits(e):
            out.append(f"--seq-len {shorter.seq_len}: {least.family()}, {format_bytes(e.total)}")
    return out


def _other_methods(rec: Recommendation, scorer: Scorer, model_ref: str, tried: list[str]) -> list[str]:
    """The best plan of each method not tried that fits (its search kept in rec.searches)."""
    out = []
    for m in ("full", "lora", "qlora"):
        if m in tried:
            continue
        r = rec.searches.get(m) or search(rec.spec, model_ref, m, rec.target, rec.workload, rec.request.priority,
                                          scorer)
        rec.searches[m] = r
        if r.best:
            out.append(f"{METHOD_NAMES[m]} fits: {r.best.family()}, {format_bytes(r.best.total)} per device, "
                       f"{r.best.hours:.1f} h (--method {m})")
    return out


def _more_host_memory(pool: list[Candidate], target: Target) -> list[str]:
    """The host RAM that the plan with the lowest host peak among those that fit the GPU needs."""
    by_host = sorted(pool, key=lambda c: c.estimate.host_bytes)  # then the first that fits the GPU: few replays
    c = next((c for c in by_host if target.device_holds(c.estimate)), None)
    if c is None:
        return []
    need = c.estimate.host_bytes / (1 - target.headroom) / GiB
    return [f"--host-memory {math.ceil(need)}GiB (RAM per node): {c.family()} then fits, "
            f"{format_bytes(c.total)} per GPU, {c.hours:.1f} h"]


def _bigger_gpus(smallest: Candidate, need: float) -> list[str]:
    """The GPUs with `need` bytes, enough for the smallest plan with headroom."""
    from memplan.catalog.gpus import load_gpus

    bigger = [g.id for g in load_gpus().values() if g.memory_bytes >= need]
    if not bigger:
        return []
    return [f"a GPU with at least {format_bytes(need, digits=1)}: {', '.join(bigger)} (then {smallest.family()}, "
            f"{format_bytes(smallest.total)})"]


def _more_gpus(rec: Recommendation, smallest: Candidate) -> list[str]:
    """The fewest GPUs (powers of two, 8 per node) on which DeepSpeed ZeRO-3 without offload fits."""
    target = rec.target
    for world in (2, 4, 8, 16, 32, 64, 128):
        if world <= target.world_size:
            continue
        gpus, nodes = min(world, 8), max(1, world // 8)
        fields = smallest.plan.model_dump()
        fields.update(gpus=gpus, nodes=nodes, offload="none", optimizer="adamw-fused",
                      attn=attention_runs(rec.spec, "sdpa"),
                      sharding="deepspeed", zero=3, precision="bf16-master" if target.supports_bf16 else "fp32")
        try:
            plan = build_plan(fields)
        except UserError:
            return []
        e = estimate(rec.spec, plan, target.memory_bytes)
        # the node's RAM: as given, else the default ratio for its GPUs
        host = target.host_memory_bytes if target.host_memory_given else HOST_RAM_PER_GPU * gpus
        if target.device_holds(e) and e.host_bytes <= host * (1 - target.headroom):
            ram = "" if target.host_memory_given else f" of {format_bytes(host, digits=0)}"
            return [f"{nodes} node(s) x {gpus} GPUs: DeepSpeed ZeRO-3 without offload needs "
                    f"{format_bytes(e.total)} per GPU and {format_bytes(e.host_bytes)} of host RAM per node{ram} "
                    f"(--gpus {gpus}{f' --nodes {nodes}' if nodes > 1 else ''})"]
    return []


# ------------------------------------------------------------------------------- the recommendation


def _relative(path: str | None, out_dir: str | None) -> str | None:
    if not path:
        return None
    if not out_dir:
        return path
    return os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())


def _model_field(model_ref: str) -> str:
    """Local paths become absolute (the Plan resolves only data paths against its own directory)."""
    p = Path(model_ref).expanduser()
    return str(p.resolve()) if p.exists() else model_ref


def recommend(req: RecommendRequest) -> Recommendation:
    """The decision tree's method, the fastest plan of it that fits, its hyperparameters, the warnings and
    the runners-up. Raises NoPlanFits (with suggestions) when no plan of the method(s) fits."""
    _check_request(req)
    spec = resolve_model(req.model)
    model_ref = _model_field(req.model)
    target = resolve_target(req.gpu, req.gpu_memory, req.gpus, req.nodes, req.headroom, req.host_memory)
    rec = _start(req, spec, target)
    # batches are padded to their longest example, not to seq_len: the time counts the tokens that run
    scorer = Scorer(spec, target, rec.data.expected_padded_length if rec.data else None)
    ctx = Context(domain_shift=rec.domain_shift, samples=rec.samples, priority=req.priority,
                  full_ft=lambda: _full_ft_test(rec, scorer, model_ref))
    methods = _methods(rec, ctx)
    _search_methods(rec, methods, scorer, model_ref)
    _hparams_and_plan(rec, model_ref)
    rec.warnings += _plan_warnings(rec, ctx)
    if rec.estimate.host_offload_bytes:
        rec.assumptions.append(f"offload keeps {format_bytes(rec.estimate.host_offload_bytes)} in host RAM per node")
    rec.alternatives = _alternatives(rec)
    return rec


def _start(req: RecommendRequest, spec: ModelSpec, target: Target) -> Recommendation:
    """The recommendation's inputs: the data (measured, or --dataset-size), sequence length, domain shift,
    time budget and workload, with the assumptions made for what the request leaves out."""
    assumptions = list(target.assumptions)
    if target.cpu:
        assumptions.append(target.cpu.time_assumption(spec.hidden_size))
    stats = measure_data(req.data, req.model, spec.name, req.show_progress) if req.data else None
    samples = _train_examples(stats, bool(req.validation)) if stats else req.dataset_size
    if req.seq_len:
        seq_len = req.seq_len
    elif stats:
        seq_len = stats.seq_len
    else:
        seq_len = DEFAULT_SEQ_LEN
        assumptions.append(f"sequence length {DEFAULT_SEQ_LEN} tokens (no --seq-len and no --data to measure)")
    if req.domain_shift is None:
        assumptions.append("domain shift low: the task is close to pre-training (say --domain-shift high for "
                           "medicine, law or other far domains)")
    if req.max_hours is None:
        assumptions.append(f"time budget {DEFAULT_MAX_HOURS:g} h for 'enough compute' (--max-hours)")
    warnings: list[str] = []
    workload, validation = _workload(req, target, stats, samples, seq_len, assumptions, warnings)
    return Recommendation(request=req, spec=spec, target=target, workload=workload, samples=samples,
                          domain_shift=req.domain_shift or "low", max_hours=req.max_hours or DEFAULT_MAX_HOURS,
                          data=stats, validation_examples=validation, steps=[], method_reason="", tree=load_tree(),
                          leaf=None, searches={}, warnings=warnings, assumptions=assumptions)


def _workload(req: RecommendRequest, target: Target, stats: DataStats | None, samples: int, seq_len: int,
              assumptions: list[str], warnings: list[str]) -> tuple[Workload, int | None]:
    """The sequences of a run: the effective batch (a multiple of the process count), the examples of an
    epoch with replay, the epochs; and the validation examples. With the warnings about the data's size
    and replay."""
    world = target.world_size
    effective = req.effective_batch or hp.default_effective_batch(samples)
    if req.effective_batch is None:
        assumptions.append(f"effective batch {effective} sequences (min({hp.DEFAULT_EFFECTIVE_BATCH}, a power of two "
                           f"giving >= {hp.MIN_STEPS_PER_EPOCH} steps per epoch); --effective-batch to change")
    if world > samples:  # each process takes its own examples of every step (memplan.train.data.Stream)
        raise UserError(f"{world:,} processes ({target.gpus:,} per node x {target.nodes:,} node(s)) need at least one "
                        f"training example each per optimizer step, and there are {samples:,}: use at most "
                        f"{samples:,} in all (--gpus x --nodes), or more data")
    rounded = per_gpu_batch(effective, world) * world
    if rounded != effective:
        warnings.append(f"effective batch {effective} is not a multiple of {world} processes: using {rounded}")
    validation = hp.validation_examples(stats.examples, req.validation) if stats else None
    warnings += hp.small_data_warnings(samples, rounded, validation)
    high = req.domain_shift == "high"
    replay_ratio = hp.REPLAY_RATIO_HIGH_SHIFT if (high and req.replay) else 0.0
    if high and not req.replay:
        warnings.append("high domain shift without --replay FILE (general text): the replay guard against "
                        "forgetting is off; " + ("early stopping still applies" if req.lr else
                                                 "the lower learning rate and early stopping still apply"))
    # replay examples make up replay_ratio of the mix (memplan.train.data.replay_count)
    examples_per_epoch = samples + (round(samples * replay_ratio / (1 - replay_ratio)) if replay_ratio else 0)
    workload = Workload(seq_len=seq_len, effective_batch=rounded, examples_per_epoch=examples_per_epoch,
                        epochs=req.epochs or 3.0)
    return workload, validation


def _methods(rec: Recommendation, ctx: Context) -> list[str]:
    """The methods to search, in order of preference: --method, else the decision tree's leaf."""
    req = rec.request
    if req.method:
        rec.method_reason = f"--method {req.method} given: the decision tree is skipped"
        return [req.method]
    rec.leaf, rec.steps = rec.tree.walk(ctx)
    leaf = rec.tree.leaves[rec.leaf]
    rec.method_reason = f"{leaf['label']} ({leaf['why']})"
    return list(leaf["methods"])


def _search_methods(rec: Recommendation, methods: list[str], scorer: Scorer, model_ref: str) -> None:
    """The plan search of each method; the chosen plan is the first method's that fits without parameter
    offload, else the first that fits at all (search.choose, the rule `estimate` uses too). Raises
    NoPlanFits, with what would fit instead, when none does."""
    progress = None
    if rec.request.show_progress:
        from tqdm import tqdm

        progress = lambda plans: tqdm(plans, desc="searching plans", unit="plan", leave=False)  # noqa: E731
    for m in methods:
        rec.searches[m] = search(rec.spec, model_ref, m, rec.target, rec.workload, rec.request.priority, scorer,
                                 progress=progress)
    rec.chosen = choose_fitting(methods, {m: rec.searches[m].fitting for m in methods}, rec.target)
    if rec.chosen is not None:  # the plan written runs expandable segments where they save memory
        fitting = rec.searches[rec.chosen.plan.method].fitting
        lowered = scorer.lower_reserve(rec.chosen)
        fitting[fitting.index(rec.chosen)] = rec.chosen = lowered
    if rec.chosen is None:
        rec.suggestions = _suggest(rec, scorer, model_ref, methods)
        raise NoPlanFits(rec)
    if len(methods) > 1:
        rec.method_reason += ": " + "; ".join(_passed_over(rec, methods))


def _passed_over(rec: Recommendation, methods: list[str]) -> list[str]:
    """Why each method before the chosen one was passed over, then the chosen one."""
    first = rec.chosen.plan.method
    notes = []
    for m in methods[:methods.index(first)]:
        r = rec.searches[m]
        if r.best:
            notes.append(f"{METHOD_NAMES[m]} fits only with parameter offload ({r.best.hours:.1f} h)")
        else:
            notes.append(f"{METHOD_NAMES[m]} does not fit (smallest plan {format_bytes(r.smallest().total)} > "
                         f"{format_bytes(rec.target.usable_bytes)} usable)")
    return notes + [f"{METHOD_NAMES[first]} fits"]


def _hparams_and_plan(rec: Recommendation, model_ref: str) -> None:
    """The chosen plan's hyperparameters (memplan.recommend.hparams), then the whole plan and its estimate."""
    req, best, w = rec.request, rec.chosen, rec.workload
    if rec.data:
        rec.assumptions.append(f"time counts {rec.data.expected_padded_length(best.plan.micro_batch, w.seq_len):.1f} "
                               f"tokens per sequence: batches of {best.plan.micro_batch} are padded to their longest "
                               f"example (expected from the measured lengths), at most {w.seq_len}")
    if best.steps > MAX_NUMBER:  # a plan's step counts are bounded like all its numbers
        raise UserError(f"{w.epochs:g} epochs of {w.examples_per_epoch:,} examples at {w.effective_batch} per "
                        f"optimizer step are {best.steps:,} steps, more than the {MAX_NUMBER:,} a plan can count. "
                        "Hint: fewer --epochs")
    rec.hparams = hp.choose(best.plan.method, rec.domain_shift, best.steps, w.epochs, req.lr, rec.spec.hidden_size,
                            rec.validation_examples)
    h = rec.hparams.plan_fields()
    if req.warmup_ratio is not None:
        h.pop("warmup_steps")
        h["warmup_ratio"] = req.warmup_ratio
        rec.hparams.reasons[1] = f"warmup {req.warmup_ratio:g} of the steps: given; then cosine decay to 0"
    fields = best.plan.model_dump(mode="json")
    fields["model"] = model_ref
    fields["hparams"] = {**fields["hparams"], "warmup_ratio": None, "warmup_steps": None, **h}  # the plan holds one
    fields["data"] = {**fields["data"], "train": _relative(req.data, req.out_dir),
                      "validation": _relative(req.validation, req.out_dir), "samples": rec.samples,
                      "domain_shift": rec.domain_shift, "replay": _relative(req.replay, req.out_dir),
                      "replay_ratio": rec.hparams.replay_ratio if req.replay else 0.0}
    fields["output_dir"] = "output" if req.out_dir else None
    fields["target"] = rec.target.plan_target()  # what `estimate --config` checks the plan against
    rec.plan = build_plan(fields, source="recommended plan")
    rec.estimate = estimate(rec.spec, rec.plan, rec.target.memory_bytes)


def _plan_warnings(rec: Recommendation, ctx: Context) -> list[str]:
    """The full-FT checklist, accumulation outside the recommended range, truncation, too few positions,
    and a plan without data."""
    req, plan, stats, seq_len = rec.request, rec.plan, rec.data, rec.workload.seq_len
    out = rec.tree.checklist_warnings(ctx) if plan.method == "full" else []
    lo, hi = hp.ACCUM_RANGE
    if rec.target.world_size == 1 and not lo <= plan.grad_accum <= hi:
        out.append(f"gradient accumulation {plan.grad_accum} is outside the recommended {lo}-{hi} steps for one "
                   f"GPU (micro-batch {plan.micro_batch} x {plan.grad_accum} = effective batch "
                   f"{plan.effective_batch})" + (": the whole batch fits at once, no accumulation needed"
                                                 if plan.grad_accum < lo else ""))
    if stats and seq_len < stats.max:
        cut = stats.truncated_fraction(seq_len)
        if cut > 0:
            out.append(f"{100 * cut:.1f} % of the measured examples are longer than {seq_len} tokens and "
                       "will be truncated")
    spec = rec.spec
    positions = spec.config.get("max_position_embeddings") or spec.config.get("n_positions") or spec.position_embeddings
    if positions and seq_len > positions:
        out.append(f"sequence length {seq_len} exceeds the model's {positions} positions (max_position_embeddings)")
    released = rec.target.cache_release_note(rec.estimate) if rec.target.device == "cuda" else None
    if released:
        out.append(f"the plan fits with little to spare: {released}")
    if not req.data:  # --dataset-size only: the written plan cannot train until it names its data
        where = f"{(req.out_dir.rstrip('/') or '.') if req.out_dir else 'DIR'}/plan.yaml"
        out.append(f"no --data: data.train is not set, and memplan train needs it: memplan train {where} "
                   "--set train=FILE.jsonl, or set data.train in plan.yaml (relative to its directory)")
    return out


def _alternatives(rec: Recommendation) -> list[Alternative]:
    """The runners-up of the chosen method (pick_alternatives), then the best plan of each other method
    searched, with why the chosen plan was preferred."""
    req, method = rec.request, rec.plan.method
    ranked, others = [], []
    for m, r in rec.searches.items():
        if r is rec.searches.get(method):
            ranked = pick_alternatives(r, rec.chosen, req.priority, rec.target) + ranked
        elif r.best and r.best.plan.method != method:
            reason = "the decision tree chose " + METHOD_NAMES[method] if not req.method else \
                f"--method {req.method} given"
            others.append(Alternative(r.best, f"{reason}; best {m}: {format_bytes(r.best.total)}, "
                                              f"{r.best.hours:.2f} h"))
    return ranked + others


def _trainer_configs(rec: Recommendation, trainers: list[str], files: dict[str, str]) -> dict[str, str]:
    """--emit: each trainer's config for the plan (memplan.trainers.emit), next to plan.yaml, with a README
    section on launching them; where a trainer cannot express the plan, the nearest plan it runs, estimated
    here for the same hardware."""
    from memplan.trainers.emit import Context, emit_all, readme_lines

    def check(plan: Plan) -> tuple[int, bool]:
        e = estimate(rec.spec, plan, rec.target.memory_bytes)
        return e.total, rec.target.fits(e)

    plan = rec.plan
    fmt = plan.data.format if plan.data.format != "auto" else (rec.data.format if rec.data else None)
    ctx = Context(plan, rec.spec, fmt if fmt in ("alpaca", "chat", "text") else None, rec.hparams.total_steps)
    rec.emitted = emit_all(trainers, plan, ctx, check)
    out = dict(files)
    for e in rec.emitted:
        out.update(e.files)
    shown = rec.request.out_dir.rstrip("/") or "."
    out["README.md"] = files["README.md"].rstrip("\n") + "\n\n" + "\n".join(
        readme_lines(rec.emitted, shown, format_bytes(rec.target.usable_bytes))).rstrip("\n") + "\n"
    return out


def gather(req: RecommendRequest) -> Recommendation:
    """What `memplan recommend` does: the recommendation, then its files (--output) and chart (--plot).
    Raises NoPlanFits (nothing written) when no plan fits."""
    from memplan.trainers.emit import parse_emit

    trainers = parse_emit(req.emit)  # before the search, as --plot's check
    if trainers and not req.out_dir:
        raise UserError(f"--emit {req.emit}: needs -o DIR, where the trainers' configs are written next to plan.yaml")
    if req.plot:
        from memplan.extras import require

        require("plot", "--plot")  # before the search, not after it
    rec = recommend(req)
    if req.out_dir:
        from memplan.recommend import writers
        from memplan.report.recommend import readme_summary

        files = writers.render_files(req.out_dir, rec.plan, rec.spec, readme_summary(rec),
                                     writers.main_ip() if rec.plan.nodes > 1 else "127.0.0.1")
        if trainers:
            files = _trainer_configs(rec, trainers, files)
        rec.files = writers.write_atomically(Path(req.out_dir), files)
    if req.plot:
        from memplan.recommend.plot import plot_recommendation

        rec.files.append(plot_recommendation(rec, req.plot))
    return rec
