"""The `memplan` command: a thin click group. Each command is a module of this package, imported when it is
named (or listed), and imports its heavy code only when it runs."""

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
    atexit.unregister(_freeze)
    atexit.register(_freeze)


def _freeze() -> None:
    """gc.freeze(), unless Triton is loaded (torch imports it where it is installed, e.g. to read a model_type from
    transformers): nanobind, its bindings' library, prints every one of its objects still alive at exit as a leak."""
    if "triton" not in sys.modules:
        gc.freeze()


def _import_plan_flags() -> None:
    """memplan.cli.options, whose import builds the Plan models, with pydantic's plugins off meanwhile.

    The Plan uses no pydantic plugins, yet pydantic looks for them in the entry points of every installed
    package when it builds its first model (about 7 ms of each run with torch and transformers installed).
    The switch is pydantic's documented environment variable, set only while the models are built, so
    the processes memplan starts (and a user's own setting) are left as they were.
    """
    key = "PYDANTIC_DISABLE_PLUGINS"
    before = os.environ.get(key)
    os.environ.setdefault(key, "__all__")
    try:
        import memplan.cli.options  # noqa: F401  (every command's flags come from it)
    finally:
        if before is None:
            os.environ.pop(key, None)


with gc_paused():
    import click

    from memplan import __version__
    from memplan.errors import UserError, did_you_mean

    _import_plan_flags()


# The commands, each in its own module: "name" -> "module:attribute". A module holds the click definition
# and imports its heavy code inside the command, so listing them stays cheap.
COMMANDS: dict[str, str] = {
    "estimate": "memplan.cli.estimate:estimate",
    "gpus": "memplan.cli.listing:gpus",
    "models": "memplan.cli.listing:models",
    "profile": "memplan.cli.profile:profile",
    "recommend": "memplan.cli.recommend:recommend",
    "serve": "memplan.cli.serve:serve",
    "train": "memplan.cli.train:train",
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
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return None
        import importlib

        module, _, attr = COMMANDS[name].partition(":")
        with gc_paused():
            return getattr(importlib.import_module(module), attr)

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

