"""The page's inputs: the options of `memplan estimate` and `memplan recommend`, read from a query string or
a JSON object and checked by the commands' own click parsing, so that a bad value gets the command line's
message, word for word.

A field is a command option: its key is the flag without its dashes (`--batch-size` -> `batch-size`), so a
page's address reads like its command line (`/?model=llama-7b&gpus=4&batch-size=4`). The plan fields come
from the click options that memplan.cli.options generates from the Plan schema; nothing is listed here by
hand except which options a web page cannot take (a file on the server, output switches).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import click

from memplan.errors import UserError, did_you_mean, shown

#: estimate's options the page does not take: a plan file on the server (the web form is the plan), the output
#: switches, and running a model's own Python code on behalf of whoever reaches the page.
ESTIMATE_SKIPPED = ("config_path", "accelerate_path", "trust_remote_code", "as_json", "html_path")
#: recommend's: files on the server, where it writes (--emit writes there too), output switches; and --method,
#: since on the page the decision tree chooses the method while the plan fields (estimate's --method among them)
#: are explored apart.
RECOMMEND_SKIPPED = ("config_path", "accelerate_path", "trust_remote_code", "data", "validation", "replay",
                     "out_dir", "emit", "as_json", "explain", "plot", "method")
#: Switches whose value is on or off: --grad-ckpt/--no-grad-ckpt, --max-batch.
ON, OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")
#: The longest value a field takes (a model name or path, a list of LoRA targets): file systems refuse longer
#: names, and a page's address holds a few kilobytes.
MAX_VALUE_CHARS = 1000

#: The form's fieldsets, in order; "output" (--max-batch, --max-seq) is for /api/estimate, not shown.
GROUPS = ("model", "hardware", "plan", "lora", "recommend", "output")


@dataclass(frozen=True)
class Field:
    key: str  # the query key: the flag without its dashes
    flag: str  # --batch-size
    name: str  # the click parameter's name (opt_micro_batch)
    commands: tuple[str, ...]  # "estimate", "recommend": the commands that take it
    kind: str  # "choice", "number", "switch" (on/off: --x/--no-x), "flag" (--max-batch) or "text"
    choices: tuple[str, ...]
    help: str
    group: str

    @property
    def default(self) -> str:
        """The default as the option's help states it when that is short ("amp-bf16"), else ""."""
        found = re.search(r"\(default: ([^)]*)\)", self.help)
        return found.group(1) if found and len(found.group(1)) <= 24 else ""


def _kind(param: click.Parameter) -> tuple[str, tuple[str, ...]]:
    if isinstance(param, click.Option) and param.is_flag:
        return ("switch", ("on", "off")) if param.secondary_opts else ("flag", ("on", "off"))
    if isinstance(param.type, click.Choice):
        return "choice", tuple(map(str, param.type.choices))
    if isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType)):
        return "number", ()
    return "text", ()


def _group(name: str, command: str) -> str:
    from memplan.cli.options import PLAN_FLAGS
    from memplan.fit import CLUSTER_FIELDS

    path = name.removeprefix("opt_").replace("__", ".")
    if name == "model":
        return "model"
    if name in ("max_batch", "max_seq"):  # the page always shows both where a GPU is known: the API's switches
        return "output"
    if command == "recommend":
        return "recommend"
    if path in PLAN_FLAGS and path not in CLUSTER_FIELDS:
        return "lora" if path.startswith("lora.") else "plan"
    return "hardware"


def _command(command: str) -> click.Command:
    if command == "estimate":
        from memplan.cli.estimate import estimate

        return estimate
    from memplan.cli.recommend import recommend

    return recommend


@functools.cache
def fields() -> dict[str, Field]:
    """Every field, by key: estimate's options, then recommend's own (those estimate has too are shared)."""
    out: dict[str, Field] = {}
    for command, skipped in (("estimate", ESTIMATE_SKIPPED), ("recommend", RECOMMEND_SKIPPED)):
        for param in _command(command).params:
            if not isinstance(param, click.Option):
                continue
            key = param.opts[0].removeprefix("--")
            if key in out:
                if param.name not in skipped:
                    f = out[key]
                    out[key] = Field(f.key, f.flag, f.name, (*f.commands, command), f.kind, f.choices, f.help, f.group)
                continue
            if param.name in skipped:
                continue
            kind, choices = _kind(param)
            out[key] = Field(key, param.opts[0], param.name, (command,), kind, choices, param.help or "",
                             _group(param.name, command))
    return out


class InputErrors(UserError):
    """Bad input, each problem with the field it belongs to (None: the whole form), as the command says it."""

    def __init__(self, problems: Iterable[tuple[str | None, str]]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(message for _, message in self.problems))

    def by_field(self) -> dict[str, str]:
        """The first problem of each field ("" for the form as a whole)."""
        out: dict[str, str] = {}
        for key, message in self.problems:
            out.setdefault(key or "", message)
        return out


def blame(message: str, values: Mapping[str, str], default: str | None = None) -> str | None:
    """The field an error line is about: the flag it starts with (`--batch-size 0: ...`), the plan field it
    names (`plan: gpus: ...`); none for a combination of settings (`plan: DDP replicates ...`); else the first
    given field whose flag it names, or whose value it quotes ('12XB'), else `default`."""
    from memplan.cli.options import PLAN_FLAGS

    known = fields()
    flags = [_key(flag) for flag in re.findall(r"--[a-z][a-z0-9-]*", message)]
    if message.startswith("--") and flags[0] in known:
        return flags[0]
    named = re.match(r"[^:]*: ([a-z_.]+): ", message)
    if named and named.group(1) in PLAN_FLAGS:
        return PLAN_FLAGS[named.group(1)].removeprefix("--")
    if message.startswith("plan: "):
        return None
    given = [key for key in flags if key in known and key in values]
    if given:
        return given[0]
    quoted = [k for k, v in values.items() if f"'{v}'" in message]
    return quoted[0] if len(quoted) == 1 else default


def _key(flag: str) -> str:
    """--no-grad-ckpt -> grad-ckpt; --batch-size -> batch-size."""
    key = flag.removeprefix("--")
    return key.removeprefix("no-") if key.startswith("no-") and key.removeprefix("no-") in fields() else key


def read_values(pairs: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """Field key -> value as text, from a query string's pairs or a JSON object's items. Empty values and
    nulls are fields not given (the command's default). Raises InputErrors: an unknown key, a key given
    twice, a value that is not one value (a list, an object), a value longer than MAX_VALUE_CHARS."""
    known = fields()
    out: dict[str, str] = {}
    problems: list[tuple[str | None, str]] = []
    for key, value in pairs:
        if key not in known:
            allowed = ", ".join(known)
            problems.append((None, f"unknown field '{shown(key)[1:-1] if isinstance(key, str) else key}'"
                                   f"{did_you_mean(str(key), known)}; allowed: {allowed}"))
            continue
        if key in out:
            problems.append((key, f"{known[key].flag}: given twice"))
            continue
        text = _text(value)
        if text is None:
            problems.append((key, f"{known[key].flag}: {shown(value)} is not one value; give a number or a text"))
        elif len(text) > MAX_VALUE_CHARS:
            problems.append((key, f"{known[key].flag}: {len(text):,} characters; at most {MAX_VALUE_CHARS:,} are "
                                  "taken"))
        elif text.strip():
            out[key] = text.strip()
    if problems:
        raise InputErrors(problems)
    return out


def _text(value: Any) -> str | None:
    """A JSON or query value as the text a command line would hold; None for a list or an object."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"  # a switch takes it; a number field says it is no number
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def argv(values: Mapping[str, str], command: str) -> list[str]:
    """The command line of `command` (estimate or recommend) for the values it takes: `--batch-size=4`,
    `--no-grad-ckpt`. A switch that is neither on nor off is left to click, which names the allowed values."""
    known = fields()
    args: list[str] = []
    for key, text in values.items():
        f = known[key]
        if command not in f.commands:
            continue
        if "\x00" in text:  # no command line can hold one; click's file checks would fail on it, not refuse it
            raise InputErrors([(key, f"{f.flag}: {shown(text)} holds a NUL character")])
        if f.kind in ("switch", "flag"):
            word = text.lower()
            if word not in ON + OFF:
                raise InputErrors([(key, f"{f.flag}: {shown(text)} is not one of on, off")])
            if word in ON:
                args.append(f.flag)
            elif f.kind == "switch":
                args.append("--no-" + f.flag.removeprefix("--"))
        else:
            args.append(f"{f.flag}={text}")
    return args


def parse(values: Mapping[str, str], command: str) -> dict[str, Any]:
    """The command's keyword arguments for `values`, parsed and checked by its click options (the command
    line's messages); raises InputErrors naming the field."""
    from memplan.cli import main, usage_error_line

    args = argv(values, command)
    try:
        ctx = _command(command).make_context(command, args, parent=click.Context(main, info_name="memplan"))
    except click.UsageError as err:
        param = getattr(err, "param", None)
        key = param.opts[0].removeprefix("--") if isinstance(param, click.Option) else None
        raise InputErrors([(key, usage_error_line(err))]) from None
    return dict(ctx.params)
