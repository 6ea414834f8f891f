"""What a training run depends on, recorded in every checkpoint (inputs.json) and compared on --resume.
No torch here: memplan.train.preflight uses it before anything heavy is imported.

Recorded: the resolved plan; each data file's sha256 and size (the data order and the position of a
resumed run are functions of the examples, so a shuffled or shortened file would silently train on other
examples); the model directory's files (sizes, and the sha256 of every file up to SMALL_FILE bytes:
config.json and the tokenizer files; weights by size).

On --resume the plan must be the one the run started with. A difference is refused, one line each, with
the `--set` that restores the run's value; a field of CHANGEABLE given with `--set` on the resume command
line is an explicit change and is applied from the resumed step on (and said so). Paths are compared by
what they hold: a data file or model directory that moved, unchanged, is the same input.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: Fields a resumed run can take new values for with `--set`: the schedule's length and peak (the LR
#: schedule is rebuilt for the new values at the resumed step), evaluation, logging and checkpoint
#: cadence, clipping, and settings that change memory and speed, not the data or the optimizer's state.
CHANGEABLE = ("hparams.lr", "hparams.max_steps", "hparams.epochs", "hparams.max_grad_norm", "hparams.eval_every",
              "hparams.eval_samples", "hparams.early_stopping_patience", "hparams.save_every",
              "hparams.save_total_limit", "hparams.log_every", "hparams.merge_adapter",
              "grad_ckpt", "ckpt_reentrant", "attn", "loss")
#: Compared by content rather than by path (model, data), or with no effect on training.
_NOT_COMPARED = ("model", "output_dir", "data.train", "data.validation", "data.replay", "data.retention",
                 "data.domain_shift")
DATA_ROLES = ("train", "validation", "replay", "retention")
SMALL_FILE = 16 * 2**20
FILE = "inputs.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _model_files(model_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            out[p.name] = {"bytes": size, **({"sha256": sha256(p)} if size <= SMALL_FILE else {})}
    return out


def _flat(plan_json: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in plan_json.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _plan_fields(plan) -> dict[str, Any]:
    fields = _flat(plan.model_dump(mode="json"))
    fields["hparams.lr"] = plan.hparams.effective_lr(plan.method)  # the default is the method's
    return fields


def record(plan, model_dir: Path) -> dict[str, Any]:
    """What a run of `plan` depends on, as JSON."""
    data = {}
    for role in DATA_ROLES:
        value = getattr(plan.data, role)
        if value:
            p = Path(value)
            data[role] = {"path": str(p), "bytes": p.stat().st_size, "sha256": sha256(p)}
    return {"plan": _plan_fields(plan), "data": data,
            "model": {"path": str(model_dir), "files": _model_files(model_dir)}}


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


_NEW_RUN = "start a new run with --set output_dir=NEW_DIR"


def differences(then: dict, now: dict, overrides: dict[str, Any]) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """The changes to apply ({field: (then, now)}) and one line per difference that is refused."""
    changes: dict[str, tuple[Any, Any]] = {}
    lines: list[str] = []
    old, new = then.get("plan", {}), now["plan"]
    for key in sorted(set(old) | set(new)):
        if key in _NOT_COMPARED or old.get(key) == new.get(key):
            continue
        a, b = old.get(key), new.get(key)
        if key in overrides:
            if key in CHANGEABLE:
                changes[key] = (a, b)
            else:
                lines.append(f"--resume --set {key}={_fmt(b)}: {key} cannot change in a resumed run (the checkpoint "
                             f"was trained with {_fmt(a)}; the changeable fields are {', '.join(CHANGEABLE)}). "
                             f"Hint: {_NEW_RUN}")
            continue
        alt = f", or --set {key}={_fmt(b)} to change it from the resumed step on" if key in CHANGEABLE else ""
        lines.append(f"--resume: {key} is {_fmt(b)} now but was {_fmt(a)} when the run started (plan file edited, "
                     f"or the run was started with --set). Hint: --set {key}={_fmt(a)} to continue as it started"
                     f"{alt}")
    for role in DATA_ROLES:
        a, b = then.get("data", {}).get(role), now["data"].get(role)
        if a is None and b is None:
            continue
        if a is None or b is None:
            lines.append(f"--resume: data.{role} was {a['path'] if a else 'not set'} when the run started, now "
                         f"{b['path'] if b else 'not set'}. Hint: set it back, or {_NEW_RUN}")
        elif a["sha256"] != b["sha256"]:
            lines.append(f"--resume: data.{role} {b['path']} changed since the run started ({a['bytes']:,} bytes, "
                         f"sha256 {a['sha256'][:12]}... then; {b['bytes']:,} bytes, {b['sha256'][:12]}... now): "
                         "the resumed run would train on other examples than the ones its position counts. "
                         f"Hint: restore the file the run started with, or {_NEW_RUN}")
    a, b = then.get("model", {}).get("files"), now["model"]["files"]
    if a is not None and a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        lines.append(f"--resume: the model directory {now['model']['path']} is not the one the run started from "
                     f"({', '.join(diff[:3])}{' ...' if len(diff) > 3 else ''} differ). "
                     f"Hint: restore it, or {_NEW_RUN}")
    return changes, lines


def read(checkpoint: Path) -> dict | None:
    try:
        return json.loads((checkpoint / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def change_line(changes: dict[str, tuple[Any, Any]], step: int) -> str:
    return (f"resuming with the changes given with --set, from step {step} on: "
            + "; ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items()))
