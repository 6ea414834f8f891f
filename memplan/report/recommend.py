"""A recommendation for people: assumptions, the decision path, the plan with its memory and time,
hyperparameters, the runners-up and why they lost, warnings, files."""

from __future__ import annotations

from memplan.recommend import throughput
from memplan.recommend.core import Recommendation, why_not
from memplan.report import estimate as report
from memplan.report.units import format_bytes, gib


def _duration(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.0f} s"
    if hours < 2:
        return f"{seconds / 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def header(rec: Recommendation) -> list[str]:
    spec = rec.spec
    first = (f"{spec.name}: {spec.params_total:,} parameters ({report.count(spec.params_total)}) on "
             f"{rec.target.describe()}; plans must fit {format_bytes(rec.target.usable_bytes)} per device "
             f"({100 * rec.target.headroom:g} % headroom)")
    lines = report.model_lines(spec, first)
    if rec.data:
        d = rec.data
        measured = "" if d.measured == d.examples else f" (lengths of a random {d.measured:,})"
        lines.append(f"data: {d.path}: {d.examples:,} examples ({d.format}){measured}, tokens p50 {d.p50} / "
                     f"p95 {d.p95} / max {d.max} [{d.tokenizer}] -> sequence length {rec.workload.seq_len} "
                     f"(p95 rounded up to 64); {rec.samples:,} train after the validation split")
    else:
        lines.append(f"data: {rec.samples:,} training examples (--dataset-size), {rec.workload.seq_len} tokens each")
    if rec.assumptions:
        lines.append("assumptions:")
        lines += [f"  - {a}" for a in rec.assumptions]
    return lines


def decision(rec: Recommendation) -> list[str]:
    lines = ["decision:"]
    for i, s in enumerate(rec.steps, 1):
        lines.append(f"  {i}. {s.question} {'yes' if s.answer else 'no'}: {s.reason}")
    lines.append(f"  => {rec.method_reason}")
    return lines


def plan_line(rec: Recommendation) -> str:
    p = rec.plan
    return (f"{rec.chosen.family()}{report.processes(p, ' on ')}: "
            f"micro-batch {p.micro_batch} x {p.seq_len} tokens, grad-accum {p.grad_accum} (effective batch "
            f"{p.effective_batch}), checkpointing {'on' if p.grad_ckpt else 'off'}, {p.optimizer}, attn {p.attn}, "
            f"loss {p.loss}" + (", expandable segments (PYTORCH_CUDA_ALLOC_CONF)" if p.allocator != "default" else ""))


def verdict(rec: Recommendation) -> str:
    e, t = rec.estimate, rec.target
    return (f"fits: {format_bytes(e.total)} {t.per_device} of {t.usable_explained()}; host RAM "
            f"{format_bytes(e.host_bytes)} of {format_bytes(t.usable_host_bytes)} usable per node")


def time_lines(rec: Recommendation) -> list[str]:
    c = rec.chosen
    s = c.step
    if rec.target.device == "cpu":
        rate = (f"{s.peak_flops / 1e9:.1f} GFLOP/s ({c.plan.precision} training rate measured per core, on "
                f"{rec.target.cpu.cores} core(s) / {c.plan.world_size} process(es))")
    else:
        rate = f"MFU {s.mfu:g} x {s.peak_flops / 1e12:.1f} TFLOP/s"
    terms = ", ".join(f"{name} {seconds:.3g} s" for name, seconds in s.terms.items() if seconds)
    span = throughput.time_range(rec.spec, s, rec.target)
    low, high = (c.steps * x / 3600 for x in (span.low_s, span.high_s))
    return [f"time: {c.steps:,} optimizer steps x {s.total_s:.3g} s = {_duration(c.hours)}, likely "
            f"{_duration(low)} to {_duration(high)} ({span.basis})",
            f"  per step: {terms}; matmuls at {rate}"]


def readme_summary(rec: Recommendation) -> list[str]:
    """The recommendation as README.md in the output directory states it (markdown lines)."""
    return ([f"Recommended by `memplan recommend` for {rec.target.describe()}.", "", "```"] + decision(rec)
            + ["", plan_line(rec), verdict(rec)] + time_lines(rec) + ["```"]
            + ([""] + [f"- warning: {w}" for w in rec.warnings] if rec.warnings else []))


def alternatives_table(rec: Recommendation) -> str:
    from tabulate import tabulate

    rows = []
    for a in rec.alternatives:
        c = a.candidate
        p = c.plan
        rows.append([c.family(), f"{p.micro_batch}x{p.grad_accum}",
                     "on" if p.grad_ckpt else "off", p.optimizer, p.loss, gib(c.total),
                     _duration(c.hours) if c.fits else "-", a.why_not])
    return tabulate(rows, headers=["alternative", "mb x accum", "ckpt", "optimizer", "loss", "GiB", "time", "why not"],
                    tablefmt="simple", disable_numparse=True)


def render(rec: Recommendation, explain: bool = False) -> str:
    lines = header(rec) + [""]
    if explain:
        lines += ["decision tree (>> = the path taken):", rec.tree.render(rec.steps, rec.leaf, rec.request.method), ""]
    lines += decision(rec) + [""]
    lines += ["recommended: " + plan_line(rec), "", report.breakdown_table(rec.estimate), verdict(rec)]
    lines += time_lines(rec) + [""]
    h = rec.plan.hparams
    warmup = h.warmup_steps if h.warmup_steps is not None else h.warmup_ratio
    lines.append(f"hyperparameters: lr {h.lr:g}, warmup {warmup}"
                 f", {h.lr_scheduler} to 0, {h.epochs:g} epochs, eval every {h.eval_every} steps, early stopping "
                 f"patience {h.early_stopping_patience}"
                 + (f", replay {rec.plan.data.replay_ratio:g} of {rec.plan.data.replay}"
                    if rec.plan.data.replay else ""))
    lines += [f"  - {r}" for r in rec.hparams.reasons]
    if rec.alternatives:
        lines += ["", "runners-up:", alternatives_table(rec)]
    if rec.warnings:
        lines += ["", "warnings:"] + [f"  ! {w}" for w in rec.warnings]
    if rec.files:
        lines += ["", "wrote:"] + [f"  {f}" for f in rec.files]
    if rec.emitted:
        from memplan.trainers.emit import report_lines

        lines += ["", "trainer configs (launch commands in README.md):"] + report_lines(rec.emitted)
    return "\n".join(lines)


def no_fit_json(rec: Recommendation) -> dict:
    """--json when no plan fits: the recommendation so far, with its suggestions, marked as an error."""
    out = rec.to_json()
    out["error"] = "no plan fits"
    return out


def render_no_fit(rec: Recommendation, explain: bool = False) -> str:
    lines = header(rec) + [""]
    if explain:
        lines += ["decision tree (>> = the path taken):", rec.tree.render(rec.steps, rec.leaf, rec.request.method), ""]
    lines += decision(rec) + ["", "no plan fits:"]
    for m, r in rec.searches.items():
        small = r.smallest()
        if small is not None and not r.fitting:
            lines.append(f"  {m}: the smallest plan, {small.family()}, "
                         f"{why_not(small, small, rec.request.priority, rec.target)}")
    if rec.suggestions:
        lines += ["what would fit instead:"] + [f"  - {s}" for s in rec.suggestions]
    return "\n".join(lines)
