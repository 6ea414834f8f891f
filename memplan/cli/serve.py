"""`memplan serve`: the click definition; the app is memplan.serve.app, imported when the command runs."""

from __future__ import annotations

import click

from memplan.cli.options import Int


@click.command("serve")
@click.option("--port", type=Int(minimum=0), default=7860, show_default=False,
              help="TCP port to listen on, 0 for a free one (printed) [port] (default: 7860).")
@click.option("--host", default="127.0.0.1",
              help="address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every interface (the page has "
                   "no login, and it reads the model paths it is given) (default: 127.0.0.1).")
def serve(port: int, host: str) -> None:
    """Run the planner as a local web page: the comparison table, one plan's memory by phase with its chart,
    the largest micro-batch and sequence that fit, and recommend's answer with its files. The page's address
    holds the plan, so a link reproduces it; every figure is `memplan estimate --json`'s for the same options.

    \b
    Exit codes:
      0    stopped (Ctrl-C)
      2    bad input: a port or host it cannot listen on (one line: memplan: error: ...)
    """
    from memplan.errors import UserError
    from memplan.serve.app import serve as run

    if port > 65535:
        raise UserError(f"--port {port}: a TCP port is 0 to 65535")
    run(host, port)
