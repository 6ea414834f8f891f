"""The plan a training run uses: the plan file, `--set` overrides, paths made absolute. No torch here."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memplan.errors import UserError, shown
from memplan.plan import (
    DataSettings,
    Hyperparameters,
    LoraSettings,
    Overrides,
    Plan,
    TargetSettings,
    build_plan,
    merge,
    read_plan_yaml,
)

_SECTIONS = {"lora": LoraSettings, "hparams": Hyperparameters, "data": DataSettings, "target": TargetSettings}
# Plan fields that hold file paths; relative ones are resolved against where they were written.
PATH_FIELDS = ("data.train", "data.validation", "data.replay", "data.retention", "output_dir")


def field_paths() -> list[str]:
    """Every settable Plan field as a dotted path (lora.rank, hparams.lr, data.train, seq_len, ...)."""
    out = []
    for name in Plan.model_fields:
        if name in _SECTIONS:
            out += [f"{name}.{sub}" for sub in _SECTIONS[name].model_fields]
        else:
            out.append(name)
    return out


def resolve_key(key: str) -> str:
    """A `--set` key -> its dotted Plan path. Full paths work; a leaf name works where it is unique
    (lr -> hparams.lr, rank -> lora.rank); dashes count as underscores (micro-batch)."""
    key = key.strip().replace("-", "_")
    paths = field_paths()
    if key in paths or key in _SECTIONS:
        return key
    leaf = [p for p in paths if p.rpartition(".")[2] == key]
    if len(leaf) == 1:
        return leaf[0]
    if len(leaf) > 1:
        raise UserError(f"--set {key}: ambiguous; use one of {', '.join(leaf)}")
    import difflib

    close = difflib.get_close_matches(key, paths + [p.rpartition(".")[2] for p in paths], n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"--set {key}: not a plan field.{hint} Fields: {', '.join(paths)}")


def parse_sets(items: typing.Iterable[str]) -> Overrides:
    """`key=value` strings -> {dotted path: value}; values are YAML scalars (1e-5, true, null, q_proj,v_proj).
    A bad value is reported as typed: `--set KEY=VALUE: problem`."""
    from memplan.files import parse_yaml

    out = Overrides()
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-5 or --set lora.rank=32")
        try:
            value = parse_yaml(raw, "--set") if raw.strip() else None
        except UserError:  # not YAML: the text itself
            value = raw
        # YAML reads 1e-5 as a string (no dot before the exponent); the Plan wants a number.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") and not value.isalpha() else value
            except ValueError:
                pass
        path = resolve_key(key)
        out[path] = value
        out.flags[path] = f"--set {key.strip()}={shown(raw.strip()).strip(chr(39))}"  # as typed
    return out


@dataclass
class Resolved:
    plan: Plan
    plan_path: Path
    plan_dir: Path
    overrides: dict[str, Any]

    @property
    def output_dir(self) -> Path:
        return Path(self.plan.output_dir) if self.plan.output_dir else self.plan_dir


def _absolute(value: str | None, base: Path) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _get(data: dict, path: str) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return data.get(head)
    sub = data.get(head)
    return sub.get(rest) if isinstance(sub, dict) else None


def resolve_plan(plan_file: str, sets: typing.Iterable[str] = ()) -> Resolved:
    """Read the plan file, apply `--set`, validate once. Paths in the file are relative to the file's
    directory; paths given with `--set` are relative to the current directory (where they were typed)."""
    plan_path = Path(plan_file).expanduser().resolve()
    base = read_plan_yaml(plan_path)
    overrides = parse_sets(sets)
    build_plan(merge(base, overrides), source=str(plan_file))  # every value's type first: paths below are text
    plan_dir = plan_path.parent
    base = merge(base, {p: _absolute(_get(base, p), plan_dir) for p in PATH_FIELDS if _get(base, p) is not None})
    cwd = Path.cwd()
    fixed = Overrides({k: (_absolute(v, cwd) if k in PATH_FIELDS and isinstance(v, str) else v)
                       for k, v in overrides.items()}, overrides.flags)
    model = base.get("model")
    if isinstance(model, str) and "model" not in fixed and (plan_dir / model).expanduser().exists():
        base["model"] = str((plan_dir / model).expanduser().resolve())
    plan = build_plan(merge(base, fixed), source=str(plan_file))
    if not plan.model:
        raise UserError(f"{plan_file}: no model: set `model:` to a local model directory or a preset with "
                        "shipped weights (e.g. demo-tiny), or pass --set model=PATH")
    return Resolved(plan=plan, plan_path=plan_path, plan_dir=plan_dir, overrides=overrides)
