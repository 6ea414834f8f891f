"""`memplan estimate`: the click definition; the arithmetic is imported when the command runs."""

from __future__ import annotations

import sys

import click

from memplan.cli import gc_paused, skip_final_collection
from memplan.cli.options import FLOAT, PLAN_FLAGS, plan_options


@click.command("estimate")
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
