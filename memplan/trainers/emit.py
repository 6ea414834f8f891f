"""Writing a plan as the configs of the trainers people use (`memplan recommend -o DIR --emit trl,...`): one
config per trainer that runs the plan, or, where the trainer cannot express part of it, the nearest plan it can
run, with what differs and memplan's own estimate of that plan.

Each trainer module (memplan.trainers.trl, axolotl, llamafactory, torchtune) reads its format (`read`) and
writes it (`nearest`: the plan as that trainer can run it, with the differences; `emit`: the files and the
launch command), side by side. Every written file is read back by `memplan.trainers.read_config` in the
tests to the plan fields it was written from.

Paths inside the written configs are relative to the output directory, where the launch commands run
(`cd DIR && ...`): the data file, ds_config.json, accelerate_config.yaml and the trainer's output directory.

Pure Python: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from memplan.catalog.spec import ModelSpec
from memplan.errors import UserError
from memplan.plan import ALL_LINEAR, Plan, build_plan

#: --emit names -> how the README names the trainer.
TRAINERS = {"trl": "TRL", "axolotl": "axolotl", "llamafactory": "LLaMA-Factory", "torchtune": "torchtune"}


def parse_emit(value: str | None) -> list[str]:
    """--emit's comma list, in the order given, each name once; a bad name is one line naming the allowed."""
    if value is None:
        return []
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    if not names:
        raise UserError(f"--emit {value!r}: give one or more of {', '.join(TRAINERS)} (comma-separated)")
    for name in names:
        if name not in TRAINERS:
            from memplan.errors import did_you_mean

            raise UserError(f"--emit {name}: not a trainer memplan writes{did_you_mean(name, list(TRAINERS))}; "
                            f"allowed: {', '.join(TRAINERS)} (comma-separated)")
    return list(dict.fromkeys(names))


@dataclass
class Context:
    """What a trainer module needs besides the plan it writes: the recommended plan (`plan`; the written one
    may be the nearest the trainer runs), the model, the data's JSONL shape (alpaca / chat / text, None when
    unknown: a plan from a dataset size), and the optimizer steps of the whole run (warmup as a step count,
    for trainers that take no ratio)."""

    plan: Plan
    spec: ModelSpec
    data_format: str | None
    total_steps: int | None


def hub_id(plan: Plan) -> str:
    """The model as the trainers load it: a memplan preset's Hub id, else the plan's model as given (a Hub id
    or a local directory)."""
    from memplan.catalog.presets import name_index, preset_info

    model = str(plan.model)
    preset = name_index().get(model.lower())
    return (preset_info(preset).get("hub_id") or model) if preset else model


@dataclass
class Emitted:
    """One trainer's files: `files` (name -> text, written into DIR), `config` (the main file), `launch`
    (shell lines run in DIR), `plan` (what the file runs: the recommended plan, or the nearest the trainer
    can run), `differences` (what the trainer cannot express, and what runs instead) and `notes` (other
    things to know before launching). `total_bytes` / `fits`: memplan's estimate of `plan` per device, set
    when it differs from the recommended plan."""

    trainer: str
    files: dict[str, str]
    config: str
    launch: list[str]
    plan: Plan
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_bytes: int | None = None
    fits: bool | None = None

    @property
    def label(self) -> str:
        return TRAINERS[self.trainer]

    def to_json(self) -> dict[str, Any]:
        return {"trainer": self.trainer, "config": self.config, "files": sorted(self.files), "launch": self.launch,
                "exact": not self.differences, "differences": self.differences, "notes": self.notes,
                "plan": self.plan.model_dump(mode="json"), "total_bytes": self.total_bytes, "fits": self.fits}


# ---------------------------------------------------------------- the nearest plan


class Nearest:
    """A plan being brought within what a trainer expresses: `change` records one field's new value and why.
    `variants` (precision choices, best first) are tried in order by `emit_all`, which keeps the first that
    fits."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.updates: dict[str, Any] = {}
        self.why: list[str] = []
        self.options: list[tuple[dict[str, Any], str]] = []
        self.impossible: str | None = None  # the trainer cannot run the model at all: why

    def change(self, path: str, value: Any, why: str) -> None:
        head, _, leaf = path.partition(".")
        current = getattr(getattr(self.plan, head), leaf) if leaf else getattr(self.plan, head)
        if current == value or self.updates.get(path, object()) == value:
            return
        self.updates[path] = value
        self.why.append(why)

    def variants(self, options: list[tuple[dict[str, Any], str]]) -> None:
        """Alternative sets of updates (each with why), best first: emit_all keeps the first that fits."""
        self.options = options

    def plans(self) -> list[tuple[Plan, list[str]]]:
        out = []
        for extra, why in self.options or [({}, "")]:
            updates = {**self.updates, **extra}
            out.append((_updated(self.plan, updates), self.why + ([why] if why else [])))
        return out


def without_autocast(n: Nearest, label: str, weights_as: str, deepspeed_keeps: bool = True) -> None:
    """A trainer that trains the weights in the dtype it loads them in, with no autocast and no fp32 masters
    outside DeepSpeed (axolotl, torchtune): amp-bf16 / amp-fp16 / bf16-master run as fp32 or pure bf16. Full
    fine-tuning tries fp32 first (fp32 weights, as the plan keeps them; more activation memory), then bf16
    (less memory; pure bf16 weights lose small updates); adapters train as bf16 (the base is frozen, the
    adapters stay fp32 in peft and torchtune alike)."""
    p = n.plan
    if p.precision not in ("amp-bf16", "amp-fp16", "bf16-master") or (deepspeed_keeps and p.sharding == "deepspeed"):
        return
    why = (f"precision {p.precision} -> {{0}}: {label} trains the weights in the dtype it loads them in "
           f"({weights_as}), with no autocast over fp32 weights and no fp32 masters outside DeepSpeed")
    if p.method == "full":
        n.variants([({"precision": "fp32"}, why.format("fp32") + " (fp32 keeps the fp32 weights the plan has)"),
                    ({"precision": "bf16"}, why.format("bf16") + " (fp32 does not fit; pure bf16 weights lose "
                                                                 "small updates)")])
    else:
        n.change("precision", "bf16", why.format("bf16") + " (the base is frozen; the adapters train in fp32)")


def _updated(plan: Plan, updates: dict[str, Any]) -> Plan:
    if not updates:
        return plan
    data = plan.model_dump(mode="json")
    for path, value in updates.items():
        head, _, leaf = path.partition(".")
        if leaf:
            data[head] = {**data[head], leaf: value}
        else:
            data[head] = value
    return build_plan(data, source="nearest plan")


def lora_target_names(plan: Plan, spec: ModelSpec) -> list[str]:
    """The plan's adapter targets as module names ('all-linear': every linear layer of the decoder layers)."""
    if plan.lora.targets == ALL_LINEAR:
        return [n for n in spec.linear_names() if n != "lm_head"]
    return list(plan.lora.targets)


# ---------------------------------------------------------------- writing


def number(value: float) -> int | float:
    """A whole float as an int (lora_alpha: 32, epochs: 3), else the float."""
    return int(value) if float(value).is_integer() else value


def yaml_text(data: dict[str, Any], header: list[str]) -> str:
    """A config as YAML with `# ` comment lines on top; keys in the order given."""
    import yaml

    head = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return head + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)


def comment_keys(text: str, notes: dict[str, str]) -> str:
    """`# note` after the top-level YAML lines of `notes`' keys."""
    out = []
    for line in text.splitlines():
        key = line.split(":", 1)[0] if line and not line.startswith((" ", "#", "-")) else None
        out.append(f"{line}  # {notes[key]}" if key in notes else line)
    return "\n".join(out) + "\n"


Check = Callable[[Plan], tuple[int, bool]]


def emit_all(names: list[str], plan: Plan, ctx: Context, check: Check) -> list[Emitted]:
    """Each trainer's files for `plan`. Where a trainer cannot express the plan, its nearest plans (best first)
    are estimated with `check` (plan -> bytes per device, fits) and the first that fits is written (else the
    first), with memplan's estimate of it."""
    out = []
    for name in names:
        module = import_module(f"memplan.trainers.{name}")
        near = module.nearest(plan, ctx)
        if near.impossible:
            out.append(Emitted(name, {}, "", [], plan, differences=[near.impossible]))
            continue
        choices = near.plans()
        chosen, differences = choices[0]
        total = fits = None
        if any(diff for _, diff in choices):
            tried = [(p, d, *check(p)) for p, d in choices]
            chosen, differences, total, fits = next((t for t in tried if t[3]), tried[0])
        emitted = module.emit(chosen, ctx)
        emitted.differences, emitted.total_bytes, emitted.fits = differences, total, fits
        out.append(emitted)
    return out


def readme_lines(emitted: list[Emitted], dir_shown: str, usable: str) -> list[str]:
    """DIR/README.md's section on the trainers' configs: files, launch commands, and what differs."""
    from memplan.report.units import format_bytes

    lines = ["## Run it with another trainer", "",
             "Each config below runs this plan in that trainer (or the nearest plan it can run, said under it). "
             "Paths in them are relative to this directory: run the commands from here.", ""]
    for e in emitted:
        if not e.files:
            lines += [f"### {e.label}: not written", "", *e.differences, ""]
            continue
        files = ", ".join(f"`{name}`" for name in e.files)
        lines += [f"### {e.label}: {files}", "", "```bash", f"cd {dir_shown}", *e.launch, "```", ""]
        if e.differences:
            verdict = (f"memplan estimates {format_bytes(e.total_bytes)} per device for it: "
                       + ("fits" if e.fits else "does NOT fit") + f" ({usable} usable)")
            lines += [f"{e.label} cannot express all of this plan; the config runs the nearest plan it can "
                      f"({verdict}):", ""] + [f"- {d}" for d in e.differences] + [""]
        if e.notes:
            lines += [f"- note: {n}" for n in e.notes] + [""]
    return lines


def report_lines(emitted: list[Emitted]) -> list[str]:
    """What `memplan recommend` prints about the emitted configs: one line each, and the differences."""
    from memplan.report.units import format_bytes

    lines = []
    for e in emitted:
        if not e.files:
            lines.append(f"  {e.label}: not written: {e.differences[0]}")
            continue
        if not e.differences:
            lines.append(f"  {e.label}: {e.config} runs this plan")
            continue
        lines.append(f"  {e.label}: {e.config} runs the nearest plan it can ({format_bytes(e.total_bytes)} per "
                     f"device, {'fits' if e.fits else 'does NOT fit'}):")
        lines += [f"    - {d}" for d in e.differences]
    return lines
