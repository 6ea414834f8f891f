"""The `memplan` command: a thin click group; each command imports its heavy code only when it runs."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from contextlib import contextmanager


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused for a short burst of work, then restored as it was.

    The collector runs after every ~700 new container objects. Importing pydantic, click and tabulate
    creates hundreds of thousands that live until the process ends, so a cold `memplan estimate` spent
    about a tenth of its time in collections that freed nothing (measured: benchmarks/estimate_speed.py).
    Reference counting still frees everything else meanwhile; long-running work (train, profile) runs
    with the collector as it was.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def skip_final_collection() -> None:
    """At exit, spare the collector its last full pass over what memplan imported; for short commands.

    When Python shuts down it clears every module and runs a full collection to free the classes and
    functions of pydantic, click, tabulate and memplan (all held in reference cycles): a twentieth of a cold
    `memplan estimate`, to free memory the operating system takes back at exit anyway.
    `gc.freeze()` run at exit moves those objects out of the collector's sight. Registered once however
    often a command runs in one process (tests); long-running commands do not register it.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def _import_plan_flags():
    """memplan.cli_options, whose import builds the Plan models, with pydantic's plugins off meanwhile.

    The Plan uses no pydantic plugins, yet pydantic looks for them in the entry points of every installed
    package when it builds its first model (about 7 ms of each run with torch and transformers installed).
    The switch is pydantic's documented environment variable, set only while the models are built, so
    the processes memplan starts (and a user's own setting) are left as they were.
    """
    key = "PYDANTIC_DISABLE_PLUGINS"
    before = os.environ.get(key)
    os.environ.setdefault(key, "__all__")
    try:
        import memplan.cli_options as cli_options
    finally:
        if before is None:
            os.environ.pop(key, None)
    return cli_options


with gc_paused():
    import click

    from memplan import __version__
    from memplan.errors import UserError, did_you_mean

    _cli_options = _import_plan_flags()
PLAN_FLAGS, plan_options, FLOAT = _cli_options.PLAN_FLAGS, _cli_options.plan_options, _cli_options.FLOAT


# Commands that live in their own modules: "name" -> "module:attribute". Each module holds only the
# click definition and imports its heavy code inside the command, so listing them stays cheap.
LAZY_COMMANDS: dict[str, str] = {
    "profile": "memplan.commands.profile_cli:profile",
    "train": "memplan.commands.train_cli:train",
    "recommend": "memplan.commands.recommend_cli:recommend",
}


def _param_name(param: click.Parameter) -> str:
    return " / ".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name


class _Complete(click.UsageError):
    """A usage error whose message already says what is allowed."""


def usage_error_line(err: click.UsageError) -> str:
    """One of click's usage errors (bad value, missing argument, unknown option or command) as memplan's one
    line: what was wrong and what is allowed, instead of click's usage block."""
    ctx = err.ctx
    names = []  # the command, if any: ["train"]
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    ctx = err.ctx
    path = " ".join(["memplan", *names])  # not the program's path: `python -m memplan` is memplan too
    where = f"{' '.join(names)}: " if names else ""
    see = f"see `{path} --help`"
    if isinstance(err, click.MissingParameter) and err.param is not None:
        if isinstance(err.param, click.Argument):
            pieces = ctx.command.collect_usage_pieces(ctx) if ctx is not None else []
            return f"{where}missing argument {_param_name(err.param)} (usage: {' '.join([path, *pieces])})"
        return f"{where}missing option {_param_name(err.param)} ({see})"
    if isinstance(err, click.BadParameter) and err.param is not None:
        return f"{_param_name(err.param)}: {err.message.rstrip('.')}"
    if isinstance(err, click.NoSuchOption):
        mean = f"; did you mean {' or '.join(err.possibilities)}?" if err.possibilities else ""
        return f"{where}no such option {err.option_name}{mean} ({see} for the options)"
    message = err.message.rstrip(".")
    message = where + message[:1].lower() + message[1:]
    if isinstance(err, _Complete):
        return message
    option = getattr(err, "option_name", None)  # BadOptionUsage: "Option '--method' requires an argument."
    params = [p for p in (ctx.command.params if ctx is not None else []) if option in getattr(p, "opts", ())]
    if params and isinstance(params[0].type, click.Choice):
        return f"{message}: one of {', '.join(map(str, params[0].type.choices))}"
    return f"{message} ({see})"


def _usage_error(err: click.UsageError):
    click.echo(f"memplan: error: {usage_error_line(err)}", err=True)
    sys.exit(err.exit_code)


# `memplan` alone prints the help (click >= 8.2 raises this usage error to do so).
_SHOWS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str):
        if name in LAZY_COMMANDS:
            import importlib

            module, _, attr = LAZY_COMMANDS[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            commands = self.list_commands(ctx)
            raise _Complete(f"no such command '{name}'{did_you_mean(name, commands)} (commands: "
                            f"{', '.join(commands)})", ctx)
        return super().resolve_command(ctx, args)

    def make_context(self, info_name, args, parent=None, **extra):
        """The group's own options (memplan --bad): their usage errors are one line too."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            if isinstance(err, _SHOWS_HELP):
                raise
            _usage_error(err)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # a command's arguments (parsed here), or the command name
            if err.ctx is None and ctx.invoked_subcommand:  # raised by click's parser, which knows no context
                command = self.get_command(ctx, ctx.invoked_subcommand)
                err.ctx = click.Context(command, parent=ctx, info_name=ctx.invoked_subcommand)
            _usage_error(err)
        except UserError as err:
            for line in str(err).splitlines():  # one line per problem
                click.echo(f"memplan: error: {line}", err=True)
            sys.exit(UserError.exit_code)


@click.group("memplan", cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="memplan")
def main() -> None:
    """memplan: will it fit, and with what settings? Exact GPU memory plans for fine-tuning LLMs.

    Sizes are in GiB (2^30 bytes); memory figures are per GPU unless stated.

    \b
    Exit codes (every command):
      0    yes / done: the plan fits, a plan was recommended, training finished
      1    no: the plan (or every plan asked about) does not fit, no plan fits,
           out of memory; a training run that crashed
      2    bad input, or the plan cannot run here (one line: memplan: error: ...)
      130  interrupted (Ctrl-C)
    """


@main.command()
@click.option("--model", "-m", "model", default=None,
              help="preset id or alias (see `memplan models`), a config.json path, or a local HF model directory.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="a plan YAML (the Plan's fields; `recommend -o` writes one). Flags override it.")
@plan_options(PLAN_FLAGS)
@click.option("--gpu", "gpu", default=None,
              help="GPU preset id (see `memplan gpus`), e.g. h100-80gb (default: the plan's recorded target, else "
                   "the local GPUs, else common sizes).")
@click.option("--gpu-memory", "gpu_memory", default=None,
              help="memory per GPU of a GPU without a preset, e.g. 24GiB, 81559MiB, 80GB (decimal).")
@click.option("--host-memory", "host_memory", default=None,
              help="RAM per node for offloaded optimizer states and parameters (a CPU plan: its whole budget), "
                   "e.g. 512GiB (default: the plan's recorded target, else this machine's for local GPUs and CPU "
                   "plans, else 128 GiB per GPU).")
@click.option("--headroom", type=FLOAT, default=None,
              help="fraction of each memory kept free: a plan fits within (1 - headroom) x memory "
                   "(default: the plan's recorded target, else 0.1).")
@click.option("--max-batch", is_flag=True, help="also report the largest micro-batch that fits.")
@click.option("--max-seq", is_flag=True, help="also report the longest sequence (tokens) that fits.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of tables.")
def estimate(**kwargs) -> None:
    """Estimate per-GPU memory of a fine-tuning step, analytically (no GPU, no torch, no network).

    With no plan flags: a table of full FT / LoRA / QLoRA across DDP, ZeRO-1/2/3 and offload at the
    stated defaults (micro-batch 1, 2048 tokens, checkpointing on), then the best plan's breakdown.
    With --config or any plan flag: that one plan, by phase (forward, backward, optimizer step).

    A plan fits when its total per GPU is within (1 - headroom) x the GPU's memory and its offloaded states
    within (1 - headroom) x the host RAM per node: the rule `memplan recommend` uses. The best plan is
    recommend's too: the first of full FT, LoRA, QLoRA that fits without parameter offload (else with it),
    its fastest row by recommend's time model.

    \b
    Exit codes:
      0  the plan fits (the table: at least one row fits; no GPU known: it fits 80 GiB)
      1  it does not fit (the table: no row fits)
      2  bad input (one line on stderr: memplan: error: ...)
    """
    skip_final_collection()
    with gc_paused():  # bounded arithmetic and printing: see gc_paused
        from memplan.commands.estimate import run

        code = run(**kwargs)
    if code:
        sys.exit(code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table.")
def models(as_json: bool) -> None:
    """List the model presets (ids, aliases, exact parameter counts, sources)."""
    skip_final_collection()
    with gc_paused():
        from memplan.commands.listing import list_models

        list_models(as_json)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table.")
def gpus(as_json: bool) -> None:
    """List the GPU presets (usable memory as the device reports it, peak TFLOP/s, bandwidths)."""
    skip_final_collection()
    with gc_paused():
        from memplan.commands.listing import list_gpus

        list_gpus(as_json)


if __name__ == "__main__":  # pragma: no cover
    main()
