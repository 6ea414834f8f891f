"""What reading a trainer's config gives: the Plan fields it sets and, for each, where it came from.

A `Reading` is filled by one trainer module (memplan.trainers.trl, axolotl, llamafactory, torchtune) and
ends as a `ConfigSource`: the plan dict `memplan.plan.merge` takes, plus the provenance `memplan estimate
--config` prints before its estimate and `--json` gives as `config_source`:

- taken: plan field <- the file's key(s) it was read from;
- assumed: plan field <- the trainer's documented default (cited in the trainer module), or what memplan
  assumes where the file cannot say (how many GPUs the launcher starts);
- ignored: keys that do not change memory (logging, saving, data names...);
- counted: keys that change memory and whose value is what memplan's estimate already counts (DeepSpeed's
  "auto" buckets, FSDP's per-decoder-layer wrapping), each with why;
- not_modelled: keys that DO change memory but that memplan's estimate does not count, each with why;
- unknown: keys the reader does not know, listed so that nothing is dropped silently.

Pure Python: no torch, no transformers (the estimate path stays light).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The formats memplan reads, as users name them (detection: memplan.trainers.detect).
FORMAT_NAMES = {
    "memplan": "memplan plan",
    "trl": "TRL / transformers TrainingArguments",
    "axolotl": "axolotl",
    "llama-factory": "LLaMA-Factory",
    "torchtune": "torchtune",
    "accelerate": "accelerate launch",
}


def shown_value(value: Any) -> str:
    """A config value as the report shows it: short, YAML-like."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(shown_value(v) for v in value[:6]) + (", ..." if len(value) > 6 else "") + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown_value(v)}" for k, v in list(value.items())[:4]) + \
            (", ..." if len(value) > 4 else "") + "}"
    return str(value)


@dataclass
class ConfigSource:
    """A config file read as a plan: `plan` for memplan.plan.merge, and where every field came from."""

    format: str
    path: str
    plan: dict[str, Any]
    taken: dict[str, str] = field(default_factory=dict)
    assumed: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    not_modelled: list[dict[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    counted: dict[str, str] = field(default_factory=dict)
    launcher: str | None = None  # the accelerate config read beside it (memplan.trainers.accelerate)

    @property
    def label(self) -> str:
        return FORMAT_NAMES[self.format]

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "path": self.path, "accelerate_config": self.launcher, "files": self.files,
                "taken": self.taken,
                "assumed": self.assumed, "counted": self.counted, "ignored": self.ignored,
                "not_modelled": self.not_modelled, "unknown": self.unknown}


class Reading:
    """A trainer config being mapped onto plan fields. Every key of the file ends in exactly one place:
    taken (it set a plan field), ignored, not modelled, or unknown (`finish` sorts the keys not looked at)."""

    def __init__(self, fmt: str, path: str, data: dict[str, Any]) -> None:
        self.format, self.path, self.data = fmt, path, data
        self.plan: dict[str, Any] = {}
        self.taken: dict[str, str] = {}
        self.assumed: dict[str, str] = {}
        self.not_modelled: list[dict[str, str]] = []
        self.ignored: list[str] = []
        self.counted: dict[str, str] = {}
        self.files: list[str] = []
        self.seen: set[str] = set()
        self.unknown: list[str] = []  # keys inside nested sections (a DeepSpeed file's) the reader does not know
        self.launcher: str | None = None  # an accelerate config launching it (memplan.trainers.accelerate)

    # ---- the file's keys
    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        """The key's value (None, an empty YAML value, counts as absent); the key is then accounted for."""
        self.seen.add(key)
        value = self.data.get(key)
        return default if value is None else value

    # ---- plan fields
    def set(self, path: str, value: Any) -> None:
        """Plan field `path` = value; a later setting of the same field replaces an earlier one's provenance."""
        self.taken.pop(path, None)
        self.assumed.pop(path, None)
        head, _, leaf = path.partition(".")
        if leaf:
            self.plan.setdefault(head, {})[leaf] = value
        else:
            self.plan[head] = value

    def take(self, path: str, value: Any, keys: str) -> None:
        """Plan field `path` = value, read from the file's `keys` (as the report names them)."""
        self.set(path, value)
        self.taken[path] = keys

    def assume(self, path: str, value: Any, why: str) -> None:
        """Plan field `path` = value, not in the file: `why` names the trainer's default and its source."""
        self.set(path, value)
        self.assumed[path] = f"{shown_value(value)}: {why}"

    def unmodelled(self, key: str, value: Any, why: str) -> None:
        self.seen.add(key.split(".")[0])
        self.not_modelled.append({"key": key, "value": shown_value(value), "why": why})

    def count(self, key: str, value: Any, why: str) -> None:
        """A memory-changing key whose value is what memplan's estimate counts already."""
        self.seen.add(key.split(".")[0])
        self.counted[key] = f"{shown_value(value)}: {why}"

    def ignore(self, *keys: str) -> None:
        for key in keys:
            if key in self.data:
                self.seen.add(key)
                self.ignored.append(key)

    def finish(self, ignored: frozenset[str] | set[str] = frozenset()) -> ConfigSource:
        """The result: keys not looked at are ignored when the trainer module lists them as not changing
        memory (`ignored`), else unknown."""
        unknown = list(self.unknown)
        for key in self.data:
            if key in self.seen:
                continue
            (self.ignored if key in ignored else unknown).append(key)
        return ConfigSource(self.format, self.path, self.plan, dict(self.taken), dict(self.assumed),
                            sorted(set(self.ignored)), self.not_modelled, unknown, self.files,
                            dict(self.counted), self.launcher)


def _wrapped(label: str, items: list[str], width: int = 110) -> list[str]:
    import textwrap

    if not items:
        return []
    glued = "; ".join(item.replace(" <- ", "\u00a0<-\u00a0") for item in items)  # keep "a <- b" on one line
    return [line.replace("\u00a0", " ") for line in textwrap.wrap(
        glued, width, initial_indent=f"  {label:<9} ", subsequent_indent=" " * 12, break_on_hyphens=False)]


def source_lines(source: ConfigSource) -> list[str]:
    """The provenance `memplan estimate --config` prints before the estimate: what was taken from the file,
    what was assumed and why, what changes memory but is not modelled, and how many keys were ignored."""
    plan = _flat(source.plan)
    launched = f", launched with the accelerate config {source.launcher}" if source.launcher else ""
    lines = [f"Read {source.path} as a {source.label} config{launched}:"]
    lines += _wrapped("from file", [f"{p}={shown_value(plan.get(p))} <- {k}" for p, k in source.taken.items()])
    lines += _wrapped("assumed", [f"{p}={why}" for p, why in source.assumed.items()])
    if source.not_modelled:
        lines.append("  not modelled (changes memory, not in this estimate):")
        lines += [f"    {n['key']}: {n['value']}: {n['why']}" for n in source.not_modelled]
    lines += _wrapped("unknown", [f"{k} (not read: check whether it changes memory)" for k in source.unknown])
    if source.ignored or source.counted:
        lines.append(f"  ignored: {len(source.ignored)} keys that do not change memory; counted as memplan "
                     f"does: {len(source.counted)} (--json lists both)")
    return lines


def _flat(plan: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in plan.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out
