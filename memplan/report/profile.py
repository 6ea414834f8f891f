"""`memplan profile`'s output: the --json object and the tables and lines for people, from what
memplan.profile.command gathered. Sizes in GiB (2^30 bytes) or MiB; error % = 100 x (estimate - measured) /
measured."""

from __future__ import annotations

from memplan.estimator.phases import PHASES, TERMS
from memplan.profile.command import NEGLIGIBLE, error_pct
from memplan.report.estimate import count, describe_plan, estimate_json, frozen_json, model_lines, processes
from memplan.report.units import size

NOT_SEEN = {
    "trace": "not seen by the trace (fake tensors, CPU kernels): CUDA kernels' workspaces (cuBLAS) and CUDA's own "
             "attention/optimizer kernel choices, the caching allocator (reserved: modelled above for a CUDA plan), "
             "the CUDA context, NCCL buffers",
    "cpu": "not seen on CPU tensors (CPU kernels): CUDA kernels' workspaces (cuBLAS) and CUDA's own "
           "attention/optimizer kernel choices, the caching allocator (reserved), the CUDA context, NCCL buffers",
    "cuda": "measured by the caching allocator (allocated, reserved) and NVML (used, CUDA context included); the "
            "breakdown is live tensor bytes at the tensor peak, workspace = allocator peak - tensor bytes "
            "(kernels' workspaces, 512 B rounding)",
}
BACKEND_WORDS = {"trace": "fake tensors on the CPU", "cpu": "real CPU tensors", "cuda": "the GPU"}


def measuring_line(p) -> str:
    """What runs now (on stderr, before the steps)."""
    return (f"measuring {p.steps} optimizer step(s) of {p.spec.name} on {BACKEND_WORDS[p.backend]}"
            + (f", {p.plan.world_size} processes" if p.plan.world_size > 1 else "") + " ...")


def profile_json(p) -> dict:
    """The estimate's JSON object with `measured` and the errors in its result, and a `profile` object."""
    out = estimate_json(p.spec.name, p.spec.params_total, [p.est])
    out["model"].update(frozen_json(p.spec))
    result = out["results"][0]
    result["measured"] = p.measured
    if p.config_source is not None:
        out["config_source"] = p.config_source.to_json()
    profile = {"backend": p.backend, "steps": p.steps, "estimate_kernels": p.kernels}
    if p.refused is not None:
        out["profile"] = dict(profile, ran=False, verdict=p.refused)
        return out
    result.update(p.errors)
    out["profile"] = dict(profile, not_seen=NOT_SEEN[p.backend], verdict=p.verdict)
    if p.replayed is not None:
        out["profile"]["replayed"] = p.replayed
    if p.max_batch is not None:
        out["max_batch"] = p.max_batch
    return out


def profile_lines(p) -> list[str]:
    """The text `memplan profile` prints, one item per printed chunk: a trainer config's provenance first (as
    `memplan estimate --config` prints it)."""
    source = []
    if p.config_source is not None:
        from memplan.trainers.source import source_lines

        source = ["\n".join(source_lines(p.config_source)) + "\n"]
    if p.refused is not None:
        return source + [p.refused]
    lines = source + _heading(p)
    if p.main.oom:
        return lines + [p.verdict]
    lines.append(_phase_table(p))
    if p.measured["breakdown"]:
        lines += _term_table(p)
    if len(p.ranks) > 1:
        lines += ["\nper rank", _rank_table(p.ranks)]
    return lines + [""] + _notes(p)


def _err(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _table(rows: list, headers: list) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)


def _heading(p) -> list[str]:
    spec, plan, main = p.spec, p.plan, p.main
    return [
        *model_lines(spec, f"{spec.name}: {spec.params_total:,} parameters ({count(spec.params_total)})"),
        f"plan: {describe_plan(p.est)}{processes(plan)}, micro-batch {plan.micro_batch} x "
        f"{plan.seq_len} tokens, grad-accum {plan.grad_accum}, checkpointing {plan.checkpointing}, "
        f"{plan.optimizer}, attn {plan.attn}",
        f"backend {p.backend}: {BACKEND_WORDS[p.backend]}, {len(main.steps)} optimizer step(s) "
        f"in {main.seconds:.1f} s; "
        f"estimate for {p.kernels.upper()} kernels" + (" (what the steps ran)" if p.kernels == "cpu" else "") + "\n",
    ]


def _phase_table(p) -> str:
    """Per phase: the first step's peak, the steady steps' peak, the estimate and its error (+ reserved on cuda)."""
    est, main, errors = p.est, p.main, p.errors
    steady, first = main.steady, main.first
    rows = [["after load (weights)", "", size(main.after_load), size(est.phases["forward"]["weights"]),
             _err(error_pct(est.phases["forward"]["weights"], main.after_load))]]
    for ph in PHASES:
        rows.append([ph, size(first.peaks.get(ph)), size(steady.peaks[ph]), size(est.phase_peaks[ph]),
                     _err(errors["phase_error_pct"][ph])])
    rows.append(["peak", size(first.peak), size(main.peak), size(est.peak_allocated), _err(errors["error_pct"])])
    headers = ["phase", "first step", "steady (2..n)", "estimate", "error %"]
    if p.backend == "cuda":
        headers.append("reserved")
        for row, ph in zip(rows, [None, *PHASES, None]):
            row.append(size(steady.reserved.get(ph)) if ph else size(main.reserved_peak if row[0] == "peak" else None))
    return _table(rows, headers)


def _term_table(p) -> list[str]:
    """The breakdown at the measured peak phase, term by term, next to the estimate's at its peak."""
    est, measured, errors = p.est, p.measured, p.errors
    ph = measured["peak_phase"]
    term_rows = []
    for t in TERMS:
        m, e = measured["breakdown"].get(t), est.phases[ph][t]
        if not m and not e:
            continue
        negligible = max(m or 0, e) < NEGLIGIBLE * est.phase_peaks[ph]
        term_rows.append([t, size(m) if m is not None else "not measured", size(e),
                          "-" if negligible or not m or errors["term_note"] else _err(error_pct(e, m))])
    lines = [f"\nbreakdown at the {ph} peak (live tensor bytes per term of the estimate, at the measured and "
             "at the estimated peak)",
             _table(term_rows, ["term", "measured", "estimate", "error %"])]
    if errors["term_note"]:
        lines.append(errors["term_note"])
    return lines


def _rank_table(ranks: list) -> str:
    rows = [[r.rank] + [size(r.steady.peaks.get(ph)) for ph in PHASES] + [size(r.peak), size(r.reserved_peak),
            size(r.nvml_used)] for r in ranks]
    return _table(rows, ["rank", *PHASES, "peak", "reserved", "NVML used"])


def _notes(p) -> list[str]:
    """What the backend cannot see, the backend's caveats, the largest micro-batch found, the verdict."""
    plan, main, backend = p.plan, p.main, p.backend
    lines = []
    if backend == "cuda":
        lines.append(f"reserved {size(main.reserved_peak)} (estimate {size(p.est.reserved)}), NVML used "
                     f"{size(main.nvml_used)}{' (' + main.nvml_scope + ')' if main.nvml_scope else ''} "
                     f"(estimate with context {size(p.est.total)})")
    if p.replayed is not None:
        r = p.replayed
        mine, other = r["allocator"], "expandable" if r["allocator"] == "default" else "default"
        lines.append(f"on a GPU (the step's allocations replayed through the caching allocator model, CUDA's kernel "
                     f"memory): reserved {size(r['reserved_bytes'][mine])} with the {mine} allocator "
                     f"({size(r['reserved_bytes'][other])} with {other}), with the CUDA context "
                     f"{size(r['total_bytes'][mine])} (estimate {size(r['estimate_reserved_bytes'])} and "
                     f"{size(r['estimate_total_bytes'])})")
    lines.append(NOT_SEEN[backend])
    lines += main.notes
    if backend == "trace" and p.weights:
        lines.append("--weights: the trace reads only the checkpoint's config (fake tensors hold no values)")
    if backend == "cpu" and plan.world_size > 1 and plan.sharding == "fsdp":
        lines.append("FSDP on gloo: its collectives allocate differently from NCCL's; take CPU FSDP figures as a "
                     "smoke test of the plan, not as what a GPU will hold")
    if p.max_batch is not None:
        mb = p.max_batch
        lines.append(f"largest micro-batch that fits: {mb['value']}"
                     + (f" (estimate: {mb['estimate']})" if mb["estimate"] is not None else "")
                     + f"; fits = {mb['criterion']}; probed "
                     + ", ".join(f"{q['micro_batch']}{'' if q['fits'] else '✗'}" for q in mb["probes"]))
    lines.append(f"verdict: {p.verdict}")
    return lines
