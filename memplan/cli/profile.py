"""`memplan profile`: the click definition; the work (memplan.profile.command) and its output
(memplan.report.profile) are imported when the command runs."""

from __future__ import annotations

import click

from memplan.cli.options import (
    PLAN_FLAGS,
    Choice,
    Int,
    accelerate_option,
    model_option,
    passed_overrides,
    plan_options,
)


@click.command("profile")
@model_option(fetches=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="a plan YAML (the Plan's fields; `recommend -o` writes one), or a TRL / transformers "
                   "TrainingArguments, axolotl, LLaMA-Factory or torchtune config, or an accelerate launch config "
                   "(YAML or JSON): what was read from it and what was assumed is printed first. Flags override it.")
@accelerate_option()
@plan_options(PLAN_FLAGS)
@click.option("--steps", type=Int(minimum=1), default=3,
              help="optimizer steps to run; step 1 creates the optimizer states, steps 2.. are the steady state "
                   "[optimizer steps] (default: 3).")
@click.option("--backend", type=Choice(["cuda", "cpu", "trace"]), default=None,
              help="cuda: real steps on the GPU (allocator peaks, reserved, NVML); cpu: real steps on CPU tensors "
                   "(live tensor bytes; small models); trace: fake tensors, exact tensor bytes at any size, nothing "
                   "allocated (default: cuda when torch sees a GPU, else trace; cpu for --device cpu plans).")
@click.option("--weights", "weights", type=click.Path(file_okay=False), default=None,
              help="load this local checkpoint directory instead of random weights (cpu/cuda; the trace never "
                   "reads weights). Memory does not depend on the values.")
@click.option("--find-max-batch", is_flag=True,
              help="also find the largest micro-batch that really fits, each probe in its own process. cuda: no "
                   "out-of-memory (capped at --gpu-memory if given); cpu/trace: the measured peak plus the "
                   "estimate's allocator reserve and CUDA context against --gpu / --gpu-memory.")
@click.option("--gpu", "gpu", default=None,
              help="GPU preset id (see `memplan gpus`), e.g. h100-80gb: the memory the estimate and --find-max-batch "
                   "check against (default: this machine's GPUs, found with NVML).")
@click.option("--gpu-memory", "gpu_memory", default=None,
              help="memory per GPU, for a GPU without a preset, e.g. 24GiB, 81559MiB, 80GB (decimal).")
@click.option("--json", "as_json", is_flag=True,
              help="print the estimate's JSON object with `measured` and `error_pct` in each result.")
def profile(model, config_path, accelerate_path, steps, backend, weights, find_max_batch, gpu, gpu_memory, as_json,
            **opts) -> None:
    """Measure real training steps of a plan, per phase, next to memplan's estimate.

    Builds the model from its config (random weights unless --weights), applies the plan (method,
    precision, optimizer, checkpointing, attention, LoRA via peft, QLoRA via bitsandbytes) and runs
    --steps optimizer steps on synthetic batches of exactly micro-batch x sequence tokens, with the
    plan's gradient accumulation. Plans with gpus x nodes > 1 run one process per rank under torchrun
    (DDP or FSDP; gloo on the CPU, NCCL on CUDA) and report per-rank peaks. DeepSpeed plans run through
    DeepSpeed's engine as memplan train configures it (pip install deepspeed; on the CPU, ZeRO-1 and 2, with
    optimizer offload too - what DeepSpeed pins and its CPU step count as host memory - and a CUDA plan's ZeRO-3).

    Sizes in GiB (2^30 bytes) or MiB; error % = 100 x (estimate - measured) / measured, negative =
    under-estimate.

    \b
    Exit codes:
      0  the steps ran and were measured
      1  out of memory: the plan does not fit ("does not fit: out of memory in <phase>")
      2  bad input, or the plan cannot run here (no CUDA for --backend cuda, a missing package)
    """
    from memplan.extras import require
    from memplan.runtime.hf import offline_and_quiet

    require("torch", "memplan profile")
    offline_and_quiet()  # first: no network for this process and those it starts, whatever they import
    import json
    import sys

    from memplan.profile.command import gather
    from memplan.report import profile as report

    announce = None if as_json else (lambda found: click.echo(report.measuring_line(found), err=True))
    found = gather(model, config_path, steps, backend, weights, find_max_batch, gpu, gpu_memory,
                   overrides=passed_overrides(opts), announce=announce, accelerate_path=accelerate_path)
    if as_json:
        click.echo(json.dumps(report.profile_json(found), indent=2))
    else:
        for chunk in report.profile_lines(found):
            click.echo(chunk)
    if found.exit_code:
        sys.exit(found.exit_code)
