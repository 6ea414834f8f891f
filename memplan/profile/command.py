"""`memplan profile`'s work: build the plan, refuse before allocating what cannot fit where it runs,
measure its steps (memplan.profile.launch) and compare them with the estimate, per phase and per breakdown
term. `gather` returns everything the command shows; memplan.report.profile prints it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memplan.catalog.resolve import config_file, resolve_model
from memplan.catalog.spec import ModelSpec, read_config
from memplan.errors import UserError
from memplan.estimator import Estimate, estimate, overhead
from memplan.estimator.phases import PHASES, TERMS
from memplan.plan import Plan, build_plan, merge
from memplan.report.units import format_bytes, size

GOAL = (-2.0, 3.0)  # memplan's accuracy goal per phase, in % (README: Accuracy)
#: A term below this share of its phase's estimated peak gets no error % (e.g. the 8-byte loss: noise).
NEGLIGIBLE = 0.005
#: Terms that tell where in a phase its peak is: the gradients grow layer by layer through the backward, and
#: logits_loss exists only around the loss. A measured and an estimated peak holding different amounts of them
#: are at different points of the phase (e.g. the first layer's backward vs the last one's, when both are
#: about as high): their other terms then differ for that reason alone, and are not compared one by one.
LOCATING_TERMS = ("gradients", "logits_loss")
MAX_BATCH_LIMIT = 4096


@dataclass
class Profiled:
    """What `memplan profile` found: the plan and its estimate, and either why nothing ran (`refused`) or
    the measured ranks next to the estimate."""

    spec: ModelSpec
    plan: Plan
    est: Estimate
    backend: str
    kernels: str  # the kernels the estimate is for: cuda on the cuda backend, else cpu
    steps: int
    weights: str | None
    refused: str | None = None  # the one line saying why nothing ran (it does not fit where it would run)
    exit_code: int = 0  # 1: does not fit (refused, or out of memory in a step)
    main: Any = None  # the most-loaded rank's memplan.profile.run.Measured, as the estimate
    ranks: list = field(default_factory=list)
    measured: dict | None = None  # measured_json
    errors: dict = field(default_factory=dict)  # error_json
    verdict: str = ""
    max_batch: dict | None = None
    replayed: dict | None = None  # trace backend, CUDA plan: reserved per allocator, replayed (replayed_json)
    config_source: Any = None  # --config of a trainer: memplan.trainers.source.ConfigSource (what came from where)


def default_backend(plan: Plan) -> str:
    import torch

    if plan.device == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "trace"


def gather(model: str | None, config_path: str | None, steps: int, backend: str | None,
           weights: str | None, find_max_batch: bool, gpu: str | None, gpu_memory: str | None,
           overrides: dict, announce: Callable[[Profiled], None] | None = None,
           accelerate_path: str | None = None) -> Profiled:
    """Estimate the plan (the plan file's fields, `overrides` the flags given over them), then measure it
    unless it cannot fit where `backend` runs it (`announce` is called just before the steps run). Bad input
    and plans that cannot run here raise UserError."""
    from transformers.utils import logging as hf_logging

    from memplan.fit import resolve_capacity
    from memplan.plan import check_lora_targets
    from memplan.profile.launch import MeasureRequest, measure_plan
    from memplan.profile.run import check_runnable

    hf_logging.disable_progress_bar()  # loading/saving bars of the QLoRA round trip are not the user's work
    plan, source = _plan(model, config_path, weights, overrides, accelerate_path)
    spec = resolve_model(plan.model)
    if spec.wrapper:
        from memplan.catalog.vision import refuse_profile

        refuse_profile(plan.model, read_config(config_file(plan.model)[0]), weights, plan.method)
    check_lora_targets(spec, plan)
    backend = backend or default_backend(plan)
    check_runnable(plan, backend, steps)
    capacity = resolve_capacity(gpu, gpu_memory)
    kernels = "cuda" if backend == "cuda" else "cpu"
    found = Profiled(spec, plan, estimate(spec, plan, capacity, kernels=kernels), backend, kernels, steps, weights,
                     config_source=source)
    req = MeasureRequest(config=str(config_file(weights or plan.model)[0]), plan=plan.model_dump(mode="json"),
                  backend=backend, steps=steps, weights=weights,
                  memory_limit=capacity if (backend == "cuda" and (gpu or gpu_memory)) else None)
    refused = room_here(found.est, plan, backend, req.memory_limit)  # before anything is allocated
    if refused is not None:
        code, line = refused
        if code == UserError.exit_code:
            raise UserError(line)
        found.refused, found.exit_code = line, code
        return found
    if find_max_batch:  # before this process touches the GPU: every probe gets all of it
        found.max_batch = _find_max_batch(spec, plan, req, capacity, backend)
    if announce is not None:
        announce(found)
    _compare(found, measure_plan(req))
    if backend == "trace" and plan.device == "cuda" and found.main.oom is None:
        from memplan.profile.trace import replayed_reserved

        found.replayed = replayed_json(replayed_reserved(req.config, plan, max(steps, 2)), found.est)
    return found


def replayed_json(reserved: dict[str, int], est: Estimate) -> dict:
    """The GPU's reserved and total memory the trace's allocations would leave, per allocator, by the caching
    allocator model, with the plan's own allocator first and the estimate's figures beside them."""
    context = overhead.cuda_context_bytes(est.plan)
    return {"allocator": est.plan.allocator,
            "reserved_bytes": reserved, "total_bytes": {a: r + context for a, r in reserved.items()},
            "estimate_reserved_bytes": est.reserved, "estimate_total_bytes": est.total}


def _plan(model: str | None, config_path: str | None, weights: str | None, overrides: dict,
          accelerate_path: str | None = None):
    """The plan: the config's fields (a plan file, or a trainer's config read by memplan.trainers), the flags
    over them, the model from --model, the file or --weights; and the trainer config's provenance (or None)."""
    from memplan.trainers import read_config

    if accelerate_path and not config_path:
        raise UserError("--accelerate-config goes with --config (the trainer's config it launches)")
    source = read_config(config_path, accelerate_path) if config_path else None
    base = source.plan if source is not None else {}
    model_ref = model or base.get("model") or weights
    if not model_ref:
        raise UserError("no model: give --model (a preset such as llama-2-7b; `memplan models` lists them), "
                        "a config.json path, a plan file with `model:`, or --weights DIR")
    plan = build_plan(merge(dict(base, model=model_ref), overrides), source=config_path or "plan")
    return plan, source if source is not None and source.format != "memplan" else None


def _compare(found: Profiled, ranks: list) -> None:
    """The measured ranks next to the estimate: the most-loaded rank is the one the estimate is for."""
    found.ranks = ranks
    found.main = max(ranks, key=lambda r: (r.oom is not None, r.peak))
    found.measured = measured_json(found.main, ranks)
    found.errors = error_json(found.est, found.measured)
    found.verdict = verdict_line(found.est, found.main, found.measured)
    found.exit_code = 1 if found.main.oom else 0


# ---------------------------------------------------------------- room to run


def room_here(est: Estimate, plan: Plan, backend: str, memory_limit: int | None = None) -> tuple[int, str] | None:
    """Whether the steps fit where `backend` runs them, by the estimate, before anything is allocated: None
    when they do, else (exit code, one line). A step that cannot fit would allocate until it fails: on the CPU
    that took 105 s of swapping and thrashing for 10^9 tokens before the allocation error.

    cpu: every process in this machine's available RAM (recommend's PROCESS_BASELINE_BYTES each for the
    interpreter and libraries); cuda: each rank's tensors at the estimated peak within its GPU less the CUDA
    context (or within --gpu / --gpu-memory, the allocator's cap); trace: fake tensors, nothing to hold. Only
    the tensors are counted, not the allocator's reserve: a plan is refused only when even they cannot fit.
    On the plan's own hardware (cuda, or cpu for a `device: cpu` plan) that is its answer, "does not fit"
    (exit 1, as a step that ran out of memory reports); a GPU plan whose cpu measurement does not fit this
    machine's RAM is a plan that cannot be measured here (exit 2)."""
    if backend == "cpu":
        from memplan.recommend.hardware import PROCESS_BASELINE_BYTES, available_memory_bytes

        n = plan.world_size
        need, have = n * (est.peak_allocated + PROCESS_BASELINE_BYTES), available_memory_bytes()
        if need <= have:
            return None
        line = (f"by the estimate the cpu backend needs {size(need)} of RAM ({n} process(es) x "
                f"({size(est.peak_allocated)} of tensors + {size(PROCESS_BASELINE_BYTES)} for the interpreter)), "
                f"and this machine has "
                f"{size(have)} available; nothing was run")
        if plan.device == "cpu":
            return 1, f"does not fit: {line}"
        return UserError.exit_code, (f"{line}. Hint: --backend trace measures the steps at any size on fake tensors, "
                                     "allocating nothing")
    if backend == "cuda":
        from memplan.catalog import gpus

        local = gpus.local_gpus()  # NVML: this process stays off the GPU, which the measurement gets whole
        if memory_limit is not None:
            have, where = memory_limit, "the allocator's cap (--gpu / --gpu-memory)"
        elif local:
            smallest = min(g.memory_bytes for g in local)
            have = smallest - overhead.cuda_context_bytes(plan)
            where = f"this machine's GPU ({size(smallest)}) less {size(overhead.cuda_context_bytes(plan))} CUDA context"
        else:
            return None
        if est.peak_allocated <= have:
            return None
        return 1, (f"does not fit: by the estimate each GPU holds {size(est.peak_allocated)} of tensors at the "
                   f"{est.peak_phase} peak, more than the {size(have)} of {where}; nothing was run")
    return None


# ---------------------------------------------------------------- figures


def error_pct(est: int, meas: int | None) -> float | None:
    """100 x (estimate - measured) / measured, negative = under-estimate; None without a measurement."""
    return None if not meas else round(100 * (est - meas) / meas, 3)


def measured_json(main, ranks: list) -> dict:
    """The `measured` object of --json: null where the backend cannot see a figure."""
    steady, first = main.steady, main.first
    phase_breakdown = {}
    if steady is not None:
        for ph in PHASES:
            terms = steady.breakdown.get(ph)
            if terms is None:
                continue
            row = {t: terms.get(t) for t in TERMS}
            if main.backend == "cuda" and ph in steady.tensor_peaks:
                row["workspace"] = steady.peaks[ph] - steady.tensor_peaks[ph]
            else:
                row["workspace"] = None
            phase_breakdown[ph] = row
    peak_phase = max(steady.peaks, key=steady.peaks.get) if steady is not None else None
    out = {
        "backend": main.backend,
        "peak_allocated_bytes": main.peak if main.steps else None,
        "reserved_bytes": main.reserved_peak,
        "nvml_used_bytes": main.nvml_used,
        "nvml_scope": main.nvml_scope,
        "after_load_bytes": main.after_load,
        "phase_peaks": {ph: steady.peaks.get(ph) for ph in PHASES} if steady is not None else None,
        "first_step_phase_peaks": {ph: first.peaks.get(ph) for ph in PHASES} if first is not None else None,
        "peak_phase": peak_phase,
        "breakdown": phase_breakdown.get(peak_phase) if peak_phase else None,
        "phase_breakdown": phase_breakdown or None,
        "oom": main.oom,
        "seconds": main.seconds,
    }
    if len(ranks) > 1:
        out["ranks"] = [{"rank": r.rank, "peak_allocated_bytes": r.peak, "reserved_bytes": r.reserved_peak,
                         "nvml_used_bytes": r.nvml_used, "oom": r.oom,
                         "phase_peaks": r.steady.peaks if r.steady is not None else None} for r in ranks]
    return out


def different_point(est: Estimate, measured: dict) -> str | None:
    """Why the breakdowns at the measured and the estimated peak of the peak phase are not comparable term by
    term (they are at different points of the phase: LOCATING_TERMS), or None when they are."""
    ph = measured["peak_phase"]
    for t in LOCATING_TERMS:
        m, e = measured["breakdown"].get(t) or 0, est.phases[ph][t]
        if abs(m - e) > NEGLIGIBLE * est.phase_peaks[ph]:
            return (f"the measured and the estimated {ph} peak are at different points of the {ph} ({t}: "
                    f"{size(m)} measured, {size(e)} estimated): only the {ph} totals above are compared, "
                    "not the terms")
    return None


def error_json(est: Estimate, measured: dict) -> dict:
    """error_pct = 100 x (estimate - measured) / measured for the peak, per phase, and per term at the peak when
    the two peaks are at the same point of the phase (term_note says why not otherwise)."""
    if measured["oom"] or not measured["phase_peaks"]:
        return {"error_pct": None, "phase_error_pct": None, "term_error_pct": None, "term_note": None}
    phases = {ph: error_pct(est.phase_peaks[ph], measured["phase_peaks"][ph]) for ph in PHASES}
    terms = note = None
    if measured["breakdown"]:
        ph = measured["peak_phase"]
        note = different_point(est, measured)
        if note is None:
            terms = {t: error_pct(est.phases[ph][t], m) for t, m in measured["breakdown"].items()
                     if m is not None and (m or est.phases[ph][t])}
    return {"error_pct": error_pct(est.peak_allocated, measured["peak_allocated_bytes"]), "phase_error_pct": phases,
            "term_error_pct": terms, "term_note": note}


def verdict_line(est: Estimate, main, measured: dict) -> str:
    if main.oom:
        where = main.oom["phase"] if main.oom["phase"] != "load" else "loading the model"
        return (f"does not fit: out of memory in {where} at {format_bytes(main.oom['allocated_bytes'])}"
                + (f" (step {main.oom['step']})" if main.oom["phase"] != "load" else ""))
    errors = error_json(est, measured)
    err, phases = errors["error_pct"], errors["phase_error_pct"]
    lo, hi = min(phases.values()), max(phases.values())
    within = GOAL[0] <= lo and hi <= GOAL[1]
    line = (f"estimate {err:+.2f} % vs the measured peak (phases {lo:+.2f} % .. {hi:+.2f} %): "
            + (f"within memplan's goal ({GOAL[0]:+.0f} % .. {GOAL[1]:+.0f} %)" if within
               else f"outside memplan's goal ({GOAL[0]:+.0f} % .. {GOAL[1]:+.0f} %); "
                    "the report helps fix the estimator"))
    if main.backend == "cuda":
        used = measured["nvml_used_bytes"] or measured["reserved_bytes"]
        line += f"; it ran, using {size(used)} of this GPU"
    return line


def fit_needs(peak: int, plan: Plan) -> int:
    """What a GPU needs for a measured (cpu/trace) tensor peak: the peak plus the kernels' workspace, times the
    allocator's reserve, plus the CUDA context (memplan.estimator.overhead); on a CPU plan the peak itself."""
    if plan.device == "cpu":
        return peak
    return overhead.reserved_bytes(peak + overhead.workspace_bytes("cuda")) + overhead.cuda_context_bytes(plan)


# ---------------------------------------------------------------- --find-max-batch


def _find_max_batch(spec, plan: Plan, req, capacity: int | None, backend: str) -> dict:
    from tqdm import tqdm

    from memplan.estimator.search import largest_fitting
    from memplan.profile.launch import MeasureRequest, probe_in_subprocess, search_max

    if backend != "cuda" and capacity is None:
        raise UserError(f"--find-max-batch with the {backend} backend needs the GPU's memory to fit against: "
                        "give --gpu or --gpu-memory (nothing runs out of memory on fake or CPU tensors)")
    start = 1
    if capacity is not None:
        start = max(1, largest_fitting(lambda b: estimate(spec, plan.model_copy(update={"micro_batch": b})),
                                       capacity, MAX_BATCH_LIMIT))
    probes: list[dict] = []
    bar = tqdm(desc="find-max-batch probes", unit="probe", file=sys.stderr, leave=False)

    def fits(b: int) -> bool:
        fields = dict(req.plan, micro_batch=b)
        kernels = "cuda" if backend == "cuda" else "cpu"
        at_b = estimate(spec, plan.model_copy(update={"micro_batch": b}), kernels=kernels)
        refused = room_here(at_b, plan, backend, req.memory_limit)
        if refused is not None:  # not run: it would allocate until it failed
            code, line = refused
            if code == UserError.exit_code:
                raise UserError(f"--find-max-batch, micro-batch {b}: {line}")
            probes.append({"micro_batch": b, "peak_allocated_bytes": None, "oom_phase": None, "fits": False,
                           "not_run": line})
            bar.update(1)
            return False
        ranks = probe_in_subprocess(MeasureRequest(**dict(req.to_json(), plan=fields)))
        worst = max(ranks, key=lambda r: (r.oom is not None, r.peak))
        row = {"micro_batch": b, "peak_allocated_bytes": worst.peak if worst.steps else None,
               "oom_phase": worst.oom["phase"] if worst.oom else None}
        if backend == "cuda":
            row["fits"] = worst.oom is None
        else:
            row["needed_bytes"] = fit_needs(worst.peak, plan)
            row["fits"] = row["needed_bytes"] <= capacity
        probes.append(row)
        bar.update(1)
        bar.set_postfix(batch=b, fits=row["fits"])
        return row["fits"]

    best = search_max(fits, start, MAX_BATCH_LIMIT)
    bar.close()
    if backend == "cuda":
        criterion = "no out-of-memory error in any step" + (
            f" with the allocator capped at {format_bytes(capacity)}" if req.memory_limit else " on this GPU")
    else:
        criterion = (f"measured peak (+{format_bytes(overhead.workspace_bytes('cuda'), 'MiB', digits=0)} workspace) x "
                     f"{1 + overhead.ALLOCATOR_FRAGMENTATION:.3f} allocator reserve + "
                     f"{format_bytes(overhead.cuda_context_bytes(plan))} CUDA context <= "
                     f"{format_bytes(capacity)}" if plan.device != "cpu"
                     else f"measured peak <= {format_bytes(capacity)}")
        criterion += f" (the {backend} backend cannot run out of GPU memory; the overheads are the estimate's)"
    return {"value": best, "estimate": start if capacity is not None else None, "criterion": criterion,
            "probes": probes}
