"""What the page shows, computed by the code the commands run: `memplan estimate`'s comparison table and one
plan's verdict (memplan.fit, memplan.report.estimate), and `memplan recommend`'s answer (memplan.recommend).

Every figure comes from the objects `--json` prints: `estimate_json` is `memplan estimate --json` for the same
options, `View.table` the comparison's, `View.plan` the chosen plan's with its --max-batch / --max-seq (those
of `View.command`), `Answer.json` `memplan recommend --json`'s. Nothing here imports torch.
"""

from __future__ import annotations

import io
import shlex
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memplan.errors import UserError
from memplan.serve import form

if TYPE_CHECKING:
    from memplan.catalog.spec import ModelSpec
    from memplan.estimator import Estimate
    from memplan.fit import Comparison, Verdict
    from memplan.plan import Overrides, Plan
    from memplan.recommend.core import Recommendation

#: The directory name the recommended files are written under in the downloaded zip (and in their README).
FILES_DIR = "memplan-plan"
#: What a page without a query shows: the README's first example, `memplan estimate --model llama-7b --gpus 4`.
LANDING = {"model": "llama-7b", "gpus": "4"}


@contextmanager
def blamed(values: Mapping[str, str], default: str | None = None) -> Iterator[None]:
    """A command's UserError as InputErrors, each line next to its field (form.blame)."""
    try:
        yield
    except form.InputErrors:
        raise
    except UserError as err:
        lines = str(err).splitlines() or [str(err)]
        raise form.InputErrors([(form.blame(line, values, default), line) for line in lines]) from None


@dataclass
class Request:
    """estimate's options from the page: the model, the plan fields given (flags kept for the messages), the
    hardware; `base` is a plan file's fields (`memplan estimate --config F --html`)."""

    values: dict[str, str]
    model: str
    overrides: Overrides
    hardware: dict[str, Any]  # gpu, gpu_memory, host_memory, headroom: fit's keyword arguments
    max_batch: bool
    max_seq: bool
    base: dict[str, Any] = field(default_factory=dict)
    source: str = "plan"

    @property
    def one_plan(self) -> bool:
        """A plan file or any plan field beyond the cluster: one plan, as the command decides."""
        from memplan.fit import CLUSTER_FIELDS

        return bool(self.base) or bool(set(self.overrides) - CLUSTER_FIELDS)

    def plan(self) -> Plan:
        from memplan.plan import build_plan, merge

        with blamed(self.values):
            return build_plan(merge(dict(self.base, model=self.model), self.overrides), source=self.source)


def read_request(values: Mapping[str, str], base: dict[str, Any] | None = None, source: str = "plan") -> Request:
    """Parse the page's values as `memplan estimate` parses its command line; raises InputErrors."""
    from memplan.cli.options import passed_overrides

    kwargs = form.parse(values, "estimate")
    overrides = passed_overrides(kwargs)
    model = kwargs["model"] or (base or {}).get("model")
    if not model:
        raise form.InputErrors([("model", "no model: give --model (a preset such as llama-2-7b; `memplan models` "
                                          "lists them), a config.json path, or a plan file with `model:`")])
    hardware = {k: kwargs[k] for k in ("gpu", "gpu_memory", "host_memory", "headroom")}
    return Request(dict(values), model, overrides, hardware, kwargs["max_batch"], kwargs["max_seq"], base or {},
                   source)


def resolve(request: Request) -> ModelSpec:
    from memplan.catalog.resolve import resolve_model

    with blamed(request.values, "model"):
        return resolve_model(request.model)


def verdict(request: Request, spec: ModelSpec, plan: Plan, limits: bool | None = None) -> tuple[Verdict, dict]:
    """One plan's verdict and its --json (with --max-batch / --max-seq: as asked, or `limits` when a GPU is
    known), as `memplan estimate` with plan flags computes them."""
    from memplan import fit
    from memplan.plan import check_lora_targets
    from memplan.report import estimate as report

    with blamed(request.values):
        check_lora_targets(spec, plan)
        v = fit.plan_verdict(spec, plan, **request.hardware)
        known = limits and v.target is not None
        found = fit.limits(spec, plan, v.target, request.max_batch or known, request.max_seq or known)
        return v, report.one_plan_json(spec, v, found)


def estimate_json(values: Mapping[str, str]) -> tuple[dict, int]:
    """`memplan estimate --json` for the same options, and its exit code (0 fits, 1 does not fit)."""
    from memplan.report import estimate as report

    request = read_request(values)
    spec = resolve(request)
    if request.one_plan:
        v, out = verdict(request, spec, request.plan())
        return out, v.exit_code
    if request.max_batch or request.max_seq:
        raise form.InputErrors([(None, "--max-batch / --max-seq need one plan: add plan flags (e.g. --method "
                                       "lora) or --config")])
    comparison = compare(request, spec)
    return report.comparison_json(spec, comparison), comparison.exit_code


def compare(request: Request, spec: ModelSpec, plan: Plan | None = None) -> Comparison:
    """The comparison table for the model and cluster (a plan file's: its cluster and recorded hardware)."""
    from memplan import fit

    cluster = {k: v for k, v in request.overrides.items() if k in fit.CLUSTER_FIELDS}
    hardware = dict(request.hardware)
    if plan is not None and request.base:
        cluster = {"gpus": plan.gpus, "nodes": plan.nodes}
        t = plan.target
        if t is not None:
            if not (hardware["gpu"] or hardware["gpu_memory"]):
                hardware.update(gpu=t.gpu, gpu_memory=t.gpu_memory)
            hardware["host_memory"] = hardware["host_memory"] or t.host_memory
            hardware["headroom"] = t.headroom if hardware["headroom"] is None else hardware["headroom"]
    with blamed(request.values):
        return fit.compare(spec, request.model, cluster, **hardware)


@dataclass
class View:
    """The page's figures: the comparison (`table`: its --json), the chosen plan (`plan`: its --json, with the
    largest micro-batch and sequence when a GPU is known) and the command line that prints it."""

    request: Request
    spec: ModelSpec
    comparison: Comparison
    table: dict
    chosen: Estimate
    verdict: Verdict
    plan: dict
    plan_values: dict[str, str]  # the chosen plan's fields, as page values
    chosen_row: int | None  # its row in the table, when it is one

    @property
    def command(self) -> str:
        return command_line("estimate", {**self.request.values, **self.plan_values},
                            self.request.source if self.request.base else None,
                            ["--max-batch", "--max-seq"] if ("max_batch" in self.plan) else [])


def view(values: Mapping[str, str], base: dict[str, Any] | None = None, source: str = "plan") -> View:
    """The page for `values`: the table, and the plan the values give, else the table's best row (else, when
    none fits, its smallest)."""
    from memplan.report import estimate as report

    request = read_request(values, base, source)
    spec = resolve(request)
    plan = request.plan() if request.one_plan else None
    comparison = compare(request, spec, plan)
    rows = comparison.rows
    if plan is None:
        row = comparison.best or min(rows, key=lambda r: r.candidate.total)
        plan = row.candidate.plan
    chosen_row = next((i for i, r in enumerate(rows) if r.candidate.plan == plan), None)
    v, out = verdict(request, spec, plan, limits=True)
    return View(request, spec, comparison, report.comparison_json(spec, comparison), v.estimate, v, out,
                plan_values(plan), chosen_row)


def plan_values(plan: Plan) -> dict[str, str]:
    """The page values (flag keys) that give `plan`: its method, and its fields that differ from the Plan's
    defaults; the inverse of memplan.cli.options.passed_overrides (LoRA settings only for a method that trains
    adapters). The method is always there: with it, the command estimates this one plan."""
    from memplan.cli.options import PLAN_FLAGS, _field

    out = {"method": plan.method}
    for path, flag in PLAN_FLAGS.items():
        if path.startswith("lora.") and not plan.trains_adapters:
            continue
        value: Any = plan
        for part in path.split("."):
            value = getattr(value, part)
        if value == _field(path).get_default(call_default_factory=True):
            continue
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, list):
            text = ",".join(value)
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        out[flag.removeprefix("--")] = text
    return out


def command_line(command: str, values: Mapping[str, str], config: str | None = None,
                 extra: list[str] | None = None) -> str:
    """`memplan estimate --model ... --gpus 4 ...`: the values the command takes, as a shell line."""
    fields = form.fields()
    args = ["memplan", command, *(["--config", config] if config else [])]
    for key, text in values.items():
        f = fields[key]
        if command not in f.commands:
            continue
        if f.kind in ("switch", "flag"):
            on = text.lower() in form.ON
            args += [f.flag] if on else ([f"--no-{key}"] if f.kind == "switch" else [])
        else:
            args += [f.flag, text]
    return shlex.join(args + (extra or []))


# ------------------------------------------------------------------------------- recommend


def recommend_keys() -> list[str]:
    """The fields only `memplan recommend` takes: giving one asks for its answer."""
    return [k for k, f in form.fields().items() if f.commands == ("recommend",)]


@dataclass
class Answer:
    """`memplan recommend`'s answer: `json` is its --json (no files written: `files` holds them, by name, as
    `recommend -o memplan-plan` writes them), `fits` False when no plan fits (then `json` has the suggestions)."""

    rec: Recommendation
    json: dict
    fits: bool
    files: dict[str, str]
    command: str


def recommend(values: Mapping[str, str], always: bool = False, files: bool = True) -> Answer | None:
    """recommend's answer for the page's values, or None when no recommend field is given (`always`: ask all
    the same, and get recommend's message for what it lacks). With `files`, as `memplan recommend ... -o
    memplan-plan` answers (the plan's output_dir set, its files rendered, none written); without, as
    `memplan recommend --json` does."""
    import dataclasses

    from memplan.cli.options import passed_overrides
    from memplan.recommend.core import NoPlanFits, RecommendRequest
    from memplan.recommend.core import recommend as answer
    from memplan.report import recommend as report

    if not always and not any(key in values for key in recommend_keys()):
        return None
    kwargs = form.parse(values, "recommend")
    hparams = {path.removeprefix("hparams."): v for path, v in passed_overrides(kwargs).items()}
    names = {f.name for f in dataclasses.fields(RecommendRequest)}
    options = {k: v for k, v in kwargs.items() if k in names and k != "out_dir"}
    fits = True
    with blamed(values):
        try:
            rec = answer(RecommendRequest(**options, **hparams, out_dir=FILES_DIR if files else None,
                                          show_progress=False))
        except NoPlanFits as err:
            rec, fits = err.rec, False
    out = rec.to_json() if fits else report.no_fit_json(rec)
    line = command_line("recommend", values) + (f" -o {FILES_DIR}" if files else "")
    return Answer(rec, out, fits, recommended_files(rec) if fits and files else {}, line)


def recommended_files(rec: Recommendation) -> dict[str, str]:
    """The files `memplan recommend -o memplan-plan` writes, by name (memplan.recommend.writers)."""
    from memplan.recommend import writers
    from memplan.report.recommend import readme_summary

    return writers.render_files(FILES_DIR, rec.plan, rec.spec, readme_summary(rec),
                                writers.main_ip() if rec.plan.nodes > 1 else "127.0.0.1")


def zip_files(files: Mapping[str, str]) -> bytes:
    """The files in one zip, under FILES_DIR/, built in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(f"{FILES_DIR}/{name}", text)
    return buffer.getvalue()
