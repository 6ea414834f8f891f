"""`memplan train`'s text: the dry run (the resolved plan, its estimate, what the checks found) and the
summary of a finished run."""

from __future__ import annotations

import json

from memplan.report.units import GiB, format_bytes
from memplan.train.run import DryRun


def dry_run_json(d: DryRun) -> str:
    from memplan.report.estimate import estimate_json

    spec, verdict = d.spec, d.verdict
    return json.dumps({"plan": d.resolved.plan.model_dump(mode="json"),
                       "output_dir": str(d.resolved.output_dir),
                       "estimate": estimate_json(spec.name, spec.params_total, [verdict.estimate]) if verdict else None,
                       "fit": verdict.to_json() if verdict else None,
                       "runs_here": not d.problems, "problems": d.problems, "warnings": d.warnings}, indent=2)


def dry_run_text(d: DryRun) -> str:
    from memplan.plan import plan_to_yaml
    from memplan.report.estimate import breakdown_table

    resolved, spec, verdict = d.resolved, d.spec, d.verdict
    lines = [f"# resolved plan ({resolved.plan_path}"
             + (f" with --set {', '.join(resolved.overrides)}" if resolved.overrides else "") + ")",
             plan_to_yaml(resolved.plan), f"output directory: {resolved.output_dir}\n"]
    if verdict is not None:
        lines += [f"{spec.name}: {spec.params_total:,} parameters; estimate per "
                  f"{'process' if resolved.plan.device == 'cpu' else 'GPU'}:\n", breakdown_table(verdict.estimate)]
        lines += [f"assumed: {line}" for line in verdict.assumptions] + [verdict.text]
    lines += [f"warning: {line}" for line in d.warnings]
    if d.problems:
        lines.append(f"cannot run here: {len(d.problems)} problem(s), listed on stderr")
    return "\n".join(lines)


def interrupted(plan_file: str) -> str:
    return f"\nmemplan: interrupted; continue from the newest checkpoint with: memplan train {plan_file} --resume"


def _memory(n: int) -> str:
    """A run's memory: GiB from 1 GiB up, else MiB (a small model's run stays readable)."""
    return format_bytes(n, "GiB" if n >= GiB else "MiB")


def summary_table(summary: dict) -> str:
    """summary.json (memplan.train.metrics) as a two-column table."""
    from tabulate import tabulate

    rows = [["optimizer steps", f"{summary['steps']}" + (" (stopped early)" if summary["stopped_early"] else "")]]
    if summary["train_loss_first"] is not None:
        rows.append(["train loss (first -> last log)",
                     f"{summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}"])
    first, best, last = summary["eval_first"], summary["eval_best"], summary["eval_last"]
    if first:
        rows.append(["validation loss (start -> best)",
                     f"{first['eval_loss']:.4f} -> {best['eval_loss']:.4f} (step {best['step']})"])
        if first.get("eval_accuracy") is not None:
            rows.append(["exact match (start -> best-loss step -> last)",
                         f"{100 * first['eval_accuracy']:.1f} % -> {100 * best['eval_accuracy']:.1f} % -> "
                         f"{100 * last['eval_accuracy']:.1f} %"])
    ret = summary["retention"]
    if ret:
        rows.append(["retention perplexity (before -> after)",
                     f"{ret['perplexity_before']:.2f} -> {ret['perplexity_after']:.2f} ({100 * ret['change']:+.1f} %)"])
    if summary["tokens_per_s_median"]:
        rows.append(["throughput (median)", f"{summary['tokens_per_s_median']:.0f} tokens/s"])
    mem = summary["memory"]
    if mem:
        flag = "  <-- gap over 10 %" if mem["flag"] else ""
        rows.append(["peak memory measured", f"{_memory(mem['measured_bytes'])} ({mem['what']})"])
        rows.append([f"estimate at measured shape (seq {mem['measured_seq_len']})",
                     f"{_memory(mem['estimated_bytes'])}, gap {100 * mem['gap']:+.1f} %{flag}"])
        rows.append(["estimate for the plan (seq_len)", _memory(mem['estimate_plan_bytes'])])
        if mem.get("estimate_reserved_bytes"):
            rows.append(["reserved measured (max_memory_reserved)",
                         f"{_memory(mem['reserved_bytes'])}, estimate {_memory(mem['estimate_reserved_bytes'])} "
                         f"({mem['reserved_basis']}), gap {100 * mem['reserved_gap']:+.1f} %"])
    host = summary.get("host_memory")
    if host:
        rows.append(["host RAM peak measured (this process)",
                     f"{_memory(host['measured_bytes'])} in the {host['phase']} phase, estimate "
                     f"{_memory(host['estimated_bytes'])}, gap {100 * host['gap']:+.1f} %"])
    st = summary.get("step_time")
    if st:
        rows.append(["step time measured (median)", f"{st['measured_s']:.3g} s ({st['what']})"])
        rows.append(["time model (recommend's)", f"{st['predicted_s']:.3g} s, gap {100 * st['error']:+.1f} %"])
    for key, path in summary["files"].items():
        rows.append([key, path])
    return tabulate(rows, tablefmt="plain", disable_numparse=True)


def memory_line(mem: dict) -> str:
    """The run's measured peak against the estimate at the shape it measured (memplan.train.loop.memory_report)."""
    flag = " (gap over 10 %)" if mem["flag"] else ""
    line = (f"memory: measured peak {format_bytes(mem['measured_bytes'], 'MiB', digits=1)} ({mem['what']}), "
            f"memplan's estimate {format_bytes(mem['estimated_bytes'], 'MiB', digits=1)} at the measured shape: "
            f"{100 * mem['gap']:+.1f} %{flag}")
    if mem.get("estimate_reserved_bytes"):
        line += (f"; reserved {format_bytes(mem['reserved_bytes'], 'MiB', digits=1)}, estimate "
                 f"{format_bytes(mem['estimate_reserved_bytes'], 'MiB', digits=1)}: {100 * mem['reserved_gap']:+.1f} %")
    return line


def host_memory_line(host: dict) -> str:
    """The first process's measured host RAM peak against the host estimate (memplan.train.loop.host_report)."""
    peaks = [{p: v for p, v in m.items() if p != "rank"} for m in host["measured"]]
    phases = ", ".join(f"{p} {format_bytes(v, 'MiB', digits=0)}" for p, v in peaks[0].items())
    more = (f"; {len(peaks) - 1} other process(es) up to "
            f"{format_bytes(max(max(m.values()) for m in peaks[1:]), 'MiB', digits=0)}" if len(peaks) > 1 else "")
    return (f"host RAM: measured peak {format_bytes(host['measured_bytes'], 'MiB', digits=0)} resident in the "
            f"{host['phase']} phase ({phases}{more}), memplan's estimate "
            f"{format_bytes(host['estimated_bytes'], 'MiB', digits=0)} for this process: {100 * host['gap']:+.1f} %")


def step_time_line(st: dict) -> str:
    """The measured step time against recommend's time model (memplan.train.loop.time_report)."""
    terms = ", ".join(f"{name} {sec:.3g}" for name, sec in st["predicted_terms_s"].items() if sec)
    return (f"step time: measured {st['measured_s']:.3g} s ({st['what']}), memplan's time model "
            f"{st['predicted_s']:.3g} s on {st['hardware']} ({terms}): {100 * st['error']:+.1f} %")


def eval_line(rec: dict) -> str:
    """An evaluation's line: validation loss, perplexity and, for exact-answer tasks, exact match."""
    acc = f", exact match {100 * rec['eval_accuracy']:.1f} %" if rec.get("eval_accuracy") is not None else ""
    return f"step {rec['step']}: validation loss {rec['eval_loss']:.4f} (perplexity {rec['eval_ppl']:.2f}){acc}"
