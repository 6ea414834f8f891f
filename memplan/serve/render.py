"""The page as HTML: the form (memplan.serve.form), the figures of memplan.serve.view, the chart of
memplan.serve.chart, with the words the command line prints (memplan.report). One self-contained document:
its style, script and chart are inline, so it works offline and `memplan estimate --html` can write it.

Templates are Jinja2's (installed with Flask), with HTML escaping on: model names, paths and error messages
echo what the user typed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from memplan.serve import form

if TYPE_CHECKING:
    import jinja2

    from memplan.serve.view import Answer, View

TEMPLATES = Path(__file__).parent / "templates"


@functools.cache
def _environment() -> jinja2.Environment:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                              lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def query(values: Mapping[str, str], **more: str) -> str:
    """"?model=llama-7b&gpus=4": the address of the page for `values`."""
    return "?" + urlencode({**values, **more})


def form_groups(values: Mapping[str, str], errors: Mapping[str, str]) -> list[dict]:
    """The form's fieldsets: each group's fields with their value, default and error."""
    groups: dict[str, list[dict]] = {g: [] for g in form.GROUPS}
    for f in form.fields().values():
        groups[f.group].append({"f": f, "value": values.get(f.key, ""), "error": errors.get(f.key, "")})
    return [{"name": name, "fields": items, "given": any(i["value"] or i["error"] for i in items)}
            for name, items in groups.items()]


def _choices() -> dict[str, list[str]]:
    """The suggestions of the text fields: model presets and GPU presets."""
    from memplan.catalog.gpus import load_gpus
    from memplan.catalog.presets import preset_ids

    return {"model": preset_ids(), "gpu": list(load_gpus())}


def table_rows(v: View) -> list[dict]:
    """The comparison table as memplan estimate prints it, each row with its bytes and the page of its plan."""
    from memplan.report.estimate import count, describe_plan
    from memplan.serve.view import plan_values

    base = {k: t for k, t in v.request.values.items() if form.fields()[k].group in ("model", "hardware")}
    rows = []
    for i, (row, out) in enumerate(zip(v.comparison.rows, v.table["results"])):
        e = row.candidate.estimate
        rows.append({"label": describe_plan(e), "trainable": count(e.params_trainable), "marks": row.marks,
                     "step": f"{out['step_s']:.2f}", "best": i == v.table["best"], "chosen": i == v.chosen_row,
                     "fits": out["fits"], "href": query({**base, **plan_values(row.candidate.plan)}),
                     "bytes": {k: out[k] for k in ("peak_allocated_bytes", "reserved_bytes", "total_bytes",
                                                   "host_bytes")}})
    return rows


def plan_section(v: View) -> dict:
    """The chosen plan: its chart, its breakdown by phase and the lines estimate prints under it."""
    from memplan.catalog.gpus import COMMON_SIZES_GIB
    from memplan.estimator.phases import PHASES, TERMS
    from memplan.report.estimate import breakdown_table, describe_plan
    from memplan.serve.chart import phase_chart

    e = v.chosen
    terms = [(t, [e.phases[p][t] for p in PHASES]) for t in TERMS if any(e.phases[p][t] for p in PHASES)]
    text = breakdown_table(e).splitlines()
    after = next(i for i, line in enumerate(text) if line.startswith("= allocated")) + 1
    target = v.verdict.target
    limits = {"max-batch": "on", "max-seq": "on"} if "max_batch" in v.plan else {}
    return {"title": describe_plan(e), "verdict": v.verdict.text, "fits": v.plan["results"][0]["fits"],
            "chart": phase_chart(e, target, () if target else COMMON_SIZES_GIB), "phases": PHASES,
            "terms": terms, "peaks": [e.phase_peaks[p] for p in PHASES], "lines": text[after:],
            "limits": {k: v.plan[k] for k in ("max_batch", "max_seq") if k in v.plan},
            "assumptions": v.verdict.assumptions, "command": v.command,
            "json_href": "/api/estimate" + query({**v.request.values, **v.plan_values}, **limits)}


def answer_section(a: Answer, values: Mapping[str, str]) -> dict:
    """recommend's answer: its lines as the command prints them, the runners-up, the files."""
    from memplan.report import recommend as report

    rec = a.rec
    out: dict[str, Any] = {"fits": a.fits, "command": a.command, "header": report.header(rec),
                           "decision": report.decision(rec), "tree": rec.tree.render(rec.steps, rec.leaf,
                                                                                     rec.request.method),
                           "warnings": rec.warnings, "suggestions": rec.suggestions,
                           "json_href": "/api/recommend" + query(values)}
    if a.fits:
        h = rec.plan.hparams
        out.update(plan=report.plan_line(rec), verdict=report.verdict(rec), time=report.time_lines(rec),
                   lr=h.lr, reasons=rec.hparams.reasons, files=a.files,
                   zip_href="/download/recommended.zip" + query(values),
                   alternatives=report.alternatives_table(rec) if rec.alternatives else "")
    else:
        out["no_fit"] = report.render_no_fit(rec).splitlines()
    return out


def page(values: Mapping[str, str], errors: Mapping[str, str], v: View | None = None, answer: Answer | None = None,
         static: str | None = None) -> str:
    """The whole page. `static`: the command line that wrote it (`memplan estimate --html`): no form, no
    script, no links back to a server."""
    from memplan import __version__
    from memplan.report.units import gib

    context = {"values": values, "errors": errors, "groups": form_groups(values, errors), "choices": _choices(),
               "static": static, "version": __version__, "gib": gib, "view": v, "answer": None,
               "header": [], "rows": [], "plan": None, "sizes": []}
    if v is not None:
        from memplan.report.estimate import _comparison_header

        context.update(header=_comparison_header(v.spec, v.comparison), rows=table_rows(v), plan=plan_section(v),
                       sizes=[f"{g}G" for g in v.comparison.sizes_gib] if v.comparison.target is None else ["fits"])
    if answer is not None:
        context["answer"] = answer_section(answer, values)
    return _environment().get_template("page.html").render(**context)


def write_html(path: str, model: str | None, config_path: str | None, options: Mapping[str, Any],
               accelerate_path: str | None = None) -> None:
    """`memplan estimate ... --html FILE`: the page's view of the same options (click's keyword arguments of
    the command) as one self-contained HTML file, written atomically (a temporary file renamed over it)."""
    from memplan.recommend.writers import _write_file
    from memplan.serve.view import command_line, view

    fields = form.fields()
    values = {"model": model} if model else {}
    for f in fields.values():
        value = options.get(f.name)
        if f.key != "model" and value not in (None, False) and "estimate" in f.commands:
            values[f.key] = ("on" if value else "off") if isinstance(value, bool) else str(value)
    base = None
    if config_path:  # a plan file or a trainer's config, read as `estimate --config` reads it
        from memplan.trainers import read_config

        base = read_config(config_path, accelerate_path).plan
    html = page(values, {}, view(values, base, config_path or "plan"),
                static=command_line("estimate", values, config_path,
                                    ["--accelerate-config", accelerate_path] if accelerate_path else None)
                + f" --html {path}")
    out = Path(path)
    try:
        _write_file(out, html)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # a page to share: the mode of a new file, not the temporary file's 0600
    except OSError as err:
        from memplan.errors import UserError

        raise UserError(f"--html {out}: cannot write there: {err.strerror} ({err.filename})") from None
