"""CLI flags generated from the Plan schema: one flag per field, help text from the field's description.

Flags default to None so that only what the user actually typed overrides a --config YAML.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from typing import Any

import click
from pydantic.fields import FieldInfo

from memplan.errors import did_you_mean, shown
from memplan.plan import MAX_NUMBER, DataSettings, Hyperparameters, LoraSettings, Overrides, Plan

# Plan field path -> flag name. Order is the order in --help.
PLAN_FLAGS: dict[str, str] = {
    "method": "--method",
    "precision": "--precision",
    "optimizer": "--optimizer",
    "device": "--device",
    "sharding": "--sharding",
    "zero": "--zero",
    "offload": "--offload",
    "gpus": "--gpus",
    "nodes": "--nodes",
    "micro_batch": "--batch-size",
    "grad_accum": "--grad-accum",
    "seq_len": "--seq-len",
    "grad_ckpt": "--grad-ckpt",
    "ckpt_reentrant": "--ckpt-reentrant",
    "offload_activations": "--offload-activations",
    "sync_each_batch": "--sync-each-batch",
    "attn": "--attn",
    "loss": "--loss",
    "liger": "--liger",
    "data.packing": "--packing",
    "data.padding_free": "--padding-free",
    "allocator": "--allocator",
    "lora.rank": "--lora-rank",
    "lora.alpha": "--lora-alpha",
    "lora.dropout": "--lora-dropout",
    "lora.targets": "--lora-targets",
}

HPARAM_FLAGS: dict[str, str] = {
    "hparams.lr": "--lr",
    "hparams.warmup_ratio": "--warmup-ratio",
    "hparams.epochs": "--epochs",
}

_FLAGS = {**PLAN_FLAGS, **HPARAM_FLAGS}

#: The unit of each counted quantity, shown as [unit]; the others are dimensionless (stage, rank, fractions).
_UNITS = {"micro_batch": "sequences", "seq_len": "tokens", "gpus": "GPUs", "nodes": "nodes",
          "grad_accum": "micro-batches", "hparams.epochs": "epochs"}


def default_note(value: Any) -> str:
    """How an option states its default, once: " (default: 16)", " (default: on)", " (default: 0.05)"."""
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list):
        text = ",".join(map(str, value)) or "none"
    else:
        text = str(value)
    return f" (default: {text})"


class Choice(click.Choice):
    """click.Choice whose error lists every allowed value and the closest one to what was typed."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            allowed = [str(c) for c in self.choices]
            self.fail(f"'{value}' is not one of {', '.join(allowed)}{did_you_mean(str(value), allowed)}", param, ctx)


class _Bounded:
    """A numeric option: finite and at most MAX_NUMBER in size, the bound every plan number has
    (memplan.plan), and at least `minimum` when given. click's own INT and FLOAT take `inf`, `nan` and
    400-digit numbers, which would overflow memplan's arithmetic."""

    kind: type
    name: str

    def __init__(self, minimum: float | None = None) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            number = self.kind(value if isinstance(value, self.kind) else str(value).strip())
        except ValueError:
            self.fail(f"{shown(value)} is not a valid {self.name}", param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{shown(value).strip(chr(39))} is not a finite number", param, ctx)
        if abs(number) > MAX_NUMBER:
            self.fail(f"{shown(number)} is more than {MAX_NUMBER:,}, the largest number memplan takes", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{value} is less than {self.minimum:g}, the smallest allowed", param, ctx)
        return number


class Int(_Bounded, click.types.IntParamType):
    kind = int


class Float(_Bounded, click.types.FloatParamType):
    kind = float


INT, FLOAT = Int(), Float()


def _field(path: str) -> FieldInfo:
    head, _, rest = path.partition(".")
    if not rest:
        return Plan.model_fields[head]
    sub = {"lora": LoraSettings, "hparams": Hyperparameters, "data": DataSettings}[head]
    return sub.model_fields[rest]


def _click_type(info: FieldInfo) -> Any:
    ann = info.annotation
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return Choice(list(typing.get_args(ann)))
    numbers = {int: INT, float: FLOAT}
    if ann in numbers:
        return numbers[ann]
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if args and args[0] in numbers:
            return numbers[args[0]]
    return str


def _option(path: str, flag: str, help_text: str | None = None) -> Callable:
    """The flag of a plan field: its description, [unit] and default, or `help_text` where a command
    chooses the default itself (recommend's learning rate and warmup)."""
    info = _field(path)
    dest = "opt_" + path.replace(".", "__")
    if help_text is None:
        default = info.get_default(call_default_factory=True)
        help_text = (info.description or "").rstrip(".")
        if path in _UNITS:
            help_text += f" [{_UNITS[path]}]"
        if default is not None:
            help_text += default_note(default)
        help_text += "."
    if info.annotation is bool:
        name = flag.removeprefix("--")
        return click.option(f"{flag}/--no-{name}", dest, default=None, help=help_text)
    return click.option(flag, dest, type=_click_type(info), default=None, show_default=False, help=help_text)


def plan_options(flags: dict[str, str], help: dict[str, str] | None = None) -> Callable:
    """One flag per plan field in `flags` (path -> flag); `help` replaces the generated help of some."""
    def decorate(func: Callable) -> Callable:
        for path, flag in reversed(list(flags.items())):
            func = _option(path, flag, (help or {}).get(path))(func)
        return func

    return decorate


def passed_overrides(kwargs: dict[str, Any]) -> Overrides:
    """Plan overrides (dotted paths) from the generated options the user actually passed, with their flags."""
    out = Overrides()
    for key in list(kwargs):
        if key.startswith("opt_"):
            value = kwargs.pop(key)
            if value is not None:
                path = key.removeprefix("opt_").replace("__", ".")
                out[path] = value
                out.flags[path] = _FLAGS[path]
    return out


def model_option(required: bool = False, fetches: bool = True) -> Callable:
    """--model / -m, as every command takes it. `fetches`: the command may download a Hub id's config.json;
    profile and train run offline and read Hub ids from the HF cache only."""
    hub = ("read from the HF cache, else its config.json is fetched from the Hub" if fetches else
           "read from the HF cache only: `memplan estimate --model ID` caches it")
    kwargs = {"required": True} if required else {"default": None}
    return click.option("--model", "-m", "model", **kwargs,
                        help="preset id or alias (see `memplan models`), a config.json path, a local HF model "
                             f"directory, or a Hugging Face Hub id org/name[@revision] ({hub}).")


def _trust_remote_code(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    from memplan.catalog import traced

    traced.trust_remote_code(value)
    return value


def remote_code_option() -> Callable:
    """--trust-remote-code: a model_type memplan has no family module for, whose config.json names its own
    code (auto_map), is built from its directory's Python files (memplan.catalog.traced)."""
    return click.option("--trust-remote-code", is_flag=True, expose_value=False, callback=_trust_remote_code,
                        help="let a model whose config.json names its own Python code (auto_map) run that code "
                             "to read the model (a model_type without a family module; default: off).")


def accelerate_option() -> Callable:
    """--accelerate-config: the accelerate config a trainer's --config runs under (memplan.trainers.accelerate)."""
    return click.option("--accelerate-config", "accelerate_path", type=click.Path(dir_okay=False), default=None,
                        help="the accelerate config (`accelerate launch --config_file FILE`) that launches the TRL, "
                             "axolotl or LLaMA-Factory --config: its processes (num_processes / num_machines), FSDP "
                             "or DeepSpeed settings and mixed_precision join the plan, the provenance names both "
                             "files (default: the --config's own accelerate_config, else none).")
