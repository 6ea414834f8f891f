"""`memplan train`: the click definition; the options become a memplan.train.run.TrainRequest (same names),
memplan.train.run runs it and memplan.report.train words the result (imported when it runs)."""

from __future__ import annotations

import click


@click.command("train")
@click.argument("plan_file", metavar="PLAN.yaml", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override a plan field, repeatable: dotted (lora.rank=32, hparams.lr=1e-5) or a unique "
                   "field name (lr=1e-5, rank=32, max_steps=200, train=data.jsonl); values are YAML scalars. "
                   "Paths given here are relative to the current directory.")
@click.option("--resume", is_flag=True,
              help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (model, optimizer, "
                   "scheduler, random state, data position and the steps not yet logged).")
@click.option("--dry-run", "dry", is_flag=True,
              help="print the resolved plan, its memory estimate and any warnings, check that it can run here, "
                   "then stop; exit code 2 (problems on stderr) when it cannot.")
@click.option("--json", "as_json", is_flag=True, help="print the final summary as one JSON object (no progress).")
@click.option("--quiet", "-q", is_flag=True, help="print nothing but errors (the files are still written).")
@click.option("--trust-remote-code", is_flag=True,
              help="allow a model directory's own Python code (auto_map) to run.")
def train(**options) -> None:
    """Fine-tune as PLAN.yaml says, on the CPU or CUDA GPUs, and check the plan's memory estimate.

    \b
    Model: a local Hugging Face directory (safetensors) or a preset that ships weights (demo-tiny);
    never downloaded. Data: JSONL, alpaca / chat (messages) / text, with data.validation or
    data.val_ratio. Writes to output_dir (default: the plan file's directory): checkpoints/,
    metrics.jsonl, training.png, summary.json, and model/ (full FT) or adapter/ (+ merged/).
    Memory is reported in GiB (2^30 bytes); throughput in tokens per second.
    Before anything heavy is loaded it checks the machine (CUDA, DeepSpeed, bitsandbytes),
    launch files, model, data and output directory, and reports every problem at once (exit code 2).
    One run per output_dir at a time: a second one stops at once (exit code 2).
    With gpus x nodes > 1 it starts one process per GPU (accelerate launch with
    accelerate_config.yaml next to the plan) or per CPU worker (torchrun, gloo).
    sharding deepspeed always starts through accelerate launch with that file and the
    ds_config.json it names (written by memplan recommend -o DIR), one process too;
    it needs DeepSpeed (pip install deepspeed). precision bf16-master: bf16 weights,
    fp32 master copies in the optimizer (DeepSpeed's, or memplan's: one process, DDP, CPU FSDP).

    \b
    Exit codes:
      0    training finished (--dry-run: the plan was printed)
      1    the run crashed or failed (a launched process failed, out of memory)
      2    bad input or it cannot run here (plan, data, model files; no CUDA / DeepSpeed)
      130  interrupted (Ctrl-C); continue with --resume
    """
    from memplan.extras import require
    from memplan.runtime.hf import offline_and_quiet

    require("torch", "memplan train")
    offline_and_quiet()  # first: no network for this process and those it launches, whatever they import
    import json

    from memplan.report import train as report
    from memplan.train.run import TrainRequest, execute

    request = TrainRequest(**options)
    silent = request.quiet or request.as_json  # no progress lines
    result = execute(request, echo=(lambda _m: None) if silent else click.echo,
                     note=(lambda _m: None) if request.quiet else lambda m: click.echo(f"memplan: note: {m}", err=True))
    if result.dry_run is not None:
        click.echo(report.dry_run_json(result.dry_run) if request.as_json else report.dry_run_text(result.dry_run))
    for line in result.problems:
        click.echo(f"memplan: error: {line}", err=True)
    if result.interrupted:
        click.echo(report.interrupted(request.plan_file), err=True)
    if result.summary is not None:
        if request.as_json:
            click.echo(json.dumps(result.summary, indent=2))
        elif not request.quiet:
            click.echo(report.summary_table(result.summary))
    if result.code:
        raise SystemExit(result.code)
