"""The `memplan train` command definition; the training code is imported when it runs."""

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
def train(plan_file: str, sets: tuple[str, ...], resume: bool, dry: bool, as_json: bool, quiet: bool,
          trust_remote_code: bool) -> None:
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
    from memplan.hf_setup import offline_and_quiet

    offline_and_quiet()  # first: no network for this process and those it launches, whatever they import
    from memplan.train.command import run

    code = run(plan_file, sets, resume, dry, as_json, quiet, trust_remote_code)
    if code:
        raise SystemExit(code)
