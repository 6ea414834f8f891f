"""`memplan estimate`: the click definition; one plan's verdict (memplan.fit.plan_verdict) or the comparison
table (memplan.fit.compare), shown by memplan.report.estimate. Imported when the command runs."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from memplan.cli import gc_paused, skip_final_collection
from memplan.cli.options import FLOAT, PLAN_FLAGS, accelerate_option, model_option, plan_options, remote_code_option


@click.command("estimate")
@model_option()
@remote_code_option()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="a plan YAML (the Plan's fields; `recommend -o` writes one), or a TRL / transformers "
                   "TrainingArguments, axolotl, LLaMA-Factory or torchtune config, or an accelerate launch config "
                   "(YAML or JSON): what was read from it and what was assumed is printed first. Flags override it.")
@accelerate_option()
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
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="also write the view of `memplan serve` (table, chart, limits) as one self-contained HTML file.")
def estimate(html_path: str | None, **kwargs) -> None:
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
        code = _body(**kwargs)
        if html_path:
            from memplan.serve.render import write_html

            write_html(html_path, kwargs["model"], kwargs["config_path"], kwargs, kwargs["accelerate_path"])
    if code:
        sys.exit(code)


def _body(model: str | None, config_path: str | None, accelerate_path: str | None, gpu: str | None,
          gpu_memory: str | None,
          host_memory: str | None, headroom: float | None, max_batch: bool, max_seq: bool, as_json: bool,
          **opts: Any) -> int:
    """The command's body; returns its exit code (0 fits, 1 does not fit: see the README's "Exit codes")."""
    from memplan import fit
    from memplan.catalog.resolve import resolve_model
    from memplan.cli.options import passed_overrides
    from memplan.errors import UserError
    from memplan.plan import build_plan, check_lora_targets, merge
    from memplan.report import estimate as report
    from memplan.trainers import read_config

    overrides = passed_overrides(opts)
    if accelerate_path and not config_path:
        raise UserError("--accelerate-config goes with --config (the trainer's config it launches); an accelerate "
                        "config alone is read with --config FILE")
    source = read_config(config_path, accelerate_path) if config_path else None
    trainer = source if source is not None and source.format != "memplan" else None
    base = source.plan if source is not None else {}
    model_ref = model or base.get("model")
    if not model_ref:
        raise UserError("no model: give --model (a preset such as llama-2-7b; `memplan models` lists them), "
                        "a config.json path, or a plan file with `model:`")
    if config_path or set(overrides) - fit.CLUSTER_FIELDS:
        plan = build_plan(merge(dict(base, model=model_ref), overrides), source=config_path or "plan")
        spec = resolve_model(plan.model)
        check_lora_targets(spec, plan)
        verdict = fit.plan_verdict(spec, plan, gpu, gpu_memory, host_memory, headroom)
        limits = fit.limits(spec, plan, verdict.target, max_batch, max_seq)
        if as_json:
            out = report.one_plan_json(spec, verdict, limits)
            click.echo(json.dumps({**out, "config_source": trainer.to_json()} if trainer else out, indent=2))
        else:
            recorded = plan.target is not None and not (gpu or gpu_memory or host_memory)
            if trainer:
                from memplan.trainers.source import source_lines

                click.echo("\n".join(source_lines(trainer)) + "\n")
            click.echo(report.one_plan_text(spec, plan, verdict, limits, recorded))
        return verdict.exit_code
    if max_batch or max_seq:
        raise UserError("--max-batch / --max-seq need one plan: add plan flags (e.g. --method lora) or --config")
    spec = resolve_model(model_ref)  # from --model: a plan file takes the branch above
    cluster = {k: v for k, v in overrides.items() if k in fit.CLUSTER_FIELDS}
    comparison = fit.compare(spec, model_ref, cluster, gpu, gpu_memory, host_memory, headroom)
    if as_json:
        click.echo(json.dumps(report.comparison_json(spec, comparison), indent=2))
    else:
        click.echo(report.comparison_text(spec, comparison))
    return comparison.exit_code
