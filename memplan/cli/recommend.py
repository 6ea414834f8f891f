"""`memplan recommend`: the click definition. The options become a memplan.recommend.core.RecommendRequest
(same names), memplan.recommend gathers the recommendation and memplan.report.recommend prints it (both
imported when it runs)."""

from __future__ import annotations

import click

from memplan.cli.options import (
    FLOAT,
    HPARAM_FLAGS,
    INT,
    Choice,
    accelerate_option,
    model_option,
    passed_overrides,
    plan_options,
    remote_code_option,
)
from memplan.recommend import hparams as hp


def _rate(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")  # 2e-5


#: recommend chooses the learning rate and the warmup itself (memplan.recommend.hparams); their help says how.
HPARAM_HELP = {
    "hparams.lr": "peak learning rate (default: chosen for the method, printed with the reason: "
                  f"{_rate(hp.LR['full'])} for full fine-tuning, in the recommended range "
                  f"{_rate(hp.LR_RANGE['full'][0])} to {_rate(hp.LR_RANGE['full'][1])}, or {_rate(hp.LR['lora'])} for "
                  "LoRA/QLoRA as in the QLoRA paper; halved for --domain-shift high; times "
                  f"{hp.REF_WIDTH}/d_model for the model's width).",
    "hparams.warmup_ratio": "warmup as a fraction of the total optimizer steps (default: chosen from the step "
                            f"count, printed with the reason: 2/(1-beta2) = {round(2 / (1 - hp.ADAM_BETA2)):,} steps "
                            f"for Adam's beta2 {hp.ADAM_BETA2:g}, clamped to the recommended "
                            f"{100 * hp.WARMUP_MIN:g}-{100 * hp.WARMUP_MAX:g} % of the total steps).",
}


@click.command()
@model_option()
@remote_code_option()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="start from a config: a plan YAML, or a TRL / transformers TrainingArguments, axolotl, "
                   "LLaMA-Factory or torchtune config (YAML or JSON). Its model, training file, sequence length, "
                   "effective batch, epochs, learning rate, warmup ratio, GPUs and method (where it names them) "
                   "are the inputs; flags override them.")
@accelerate_option()
@click.option("--gpus", type=INT, default=None,
              help="GPUs per node; on a CPU plan, processes [GPUs] (default: the local GPUs found, else 1).")
@click.option("--nodes", type=INT, default=1, help="machines, each with --gpus GPUs [nodes] (default: 1).")
@click.option("--gpu", "gpu", default=None,
              help="GPU preset id (see `memplan gpus`), e.g. h100-80gb (default: the local GPUs, found with NVML, "
                   "else this machine's CPU and RAM).")
@click.option("--gpu-memory", "gpu_memory", default=None,
              help="memory per GPU, for a GPU without a preset, e.g. 24GiB, 81559MiB, 80GB (decimal).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="training JSONL (alpaca, chat or text): examples are counted and token lengths measured "
                   "with the model's tokenizer when it has one on disk (else ~4 characters per token).")
@click.option("--validation", type=click.Path(dir_okay=False), default=None,
              help="validation JSONL (default: 5 % of --data, held out).")
@click.option("--replay", type=click.Path(dir_okay=False), default=None,
              help="general-text JSONL mixed in against forgetting when the domain shift is high.")
@click.option("--dataset-size", "dataset_size", type=INT, default=None,
              help="training examples, when there is no --data file to count [examples].")
@click.option("--seq-len", "seq_len", type=INT, default=None,
              help="tokens per sequence [tokens] (default: p95 of --data rounded up to 64, else 2048).")
@click.option("--domain-shift", "domain_shift", type=Choice(["low", "high"]), default=None,
              help="how far the task is from pre-training: high for medicine, law ... (default: low, printed "
                   "as an assumption).")
@click.option("--method", type=Choice(["full", "lora", "qlora"]), default=None,
              help="force the method (default: the decision tree chooses; --explain shows it).")
@click.option("--effective-batch", "effective_batch", type=INT, default=None,
              help="sequences per optimizer step = micro-batch x accumulation x GPUs [sequences] (default: "
                   f"{hp.DEFAULT_EFFECTIVE_BATCH}, or for small sets the largest power of two that still gives "
                   f"{hp.MIN_STEPS_PER_EPOCH} optimizer steps per epoch).")
@plan_options({"hparams.epochs": HPARAM_FLAGS["hparams.epochs"], "hparams.lr": HPARAM_FLAGS["hparams.lr"],
               "hparams.warmup_ratio": HPARAM_FLAGS["hparams.warmup_ratio"]}, help=HPARAM_HELP)
@click.option("--max-hours", "max_hours", type=FLOAT, default=None,
              help="time budget: full FT counts as 'enough compute' only within it [hours] (default: 72).")
@click.option("--priority", type=Choice(["quality", "speed", "memory"]), default="quality",
              help="quality: no quality trade-offs (fp32 master weights, 32-bit Adam) unless needed to fit, then "
                   "fastest; speed: fastest; memory: smallest (default: quality).")
@click.option("--headroom", type=FLOAT, default=0.10,
              help="fraction of each device's memory kept free: a plan must fit (1 - headroom) x memory "
                   "(default: 0.1).")
@click.option("--host-memory", "host_memory", default=None,
              help="RAM per node for offloaded optimizer states and parameters (a CPU plan: its whole budget), "
                   "e.g. 512GiB (default: this machine's for local GPUs and CPU plans, else 128 GiB per GPU).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write plan.yaml, accelerate_config.yaml, ds_config.json (DeepSpeed) and README.md here.")
@click.option("--emit", "emit", default=None, metavar="LIST",
              help="with -o: also write a config per trainer that runs the plan (or the nearest plan it can, "
                   "said in the output and README.md), comma-separated: trl (trl_sft.yaml), axolotl "
                   "(axolotl.yaml), llamafactory (llamafactory.yaml + dataset_info.json), torchtune "
                   "(torchtune.yaml) (default: none).")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of tables.")
@click.option("--explain", is_flag=True, help="also print the decision tree with the path taken marked.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="write a PNG of the candidates' memory per device, stacked by term, against the capacity.")
def recommend(as_json: bool, explain: bool, **options) -> None:
    """Recommend a fine-tuning method and the fastest plan that fits, and write ready-to-run configs.

    The decision tree picks full FT, LoRA or QLoRA (--explain shows it); a search over precision,
    optimizer, sharding / ZeRO / offload, checkpointing, attention, loss and micro-batch scores every plan
    with the estimator and a time model. Memory in GiB (2^30 bytes) per GPU; times in hours. The same
    inputs give the same plan: nothing is measured (a CPU's figures follow from its /proc/cpuinfo).
    plan.yaml records the hardware it was planned for (`target`), which `memplan estimate --config` checks.

    \b
    Exit codes:
      0  a plan was recommended
      1  no plan fits (what would fit instead is printed)
      2  bad input (one line on stderr: memplan: error: ...)
    """
    import json
    import sys

    from memplan.recommend.core import NoPlanFits, RecommendRequest, gather
    from memplan.report import recommend as report

    hparams = {path.removeprefix("hparams."): value for path, value in passed_overrides(options).items()}
    source = _config_inputs(options, hparams)
    request = RecommendRequest(**options, **hparams, show_progress=not as_json and sys.stderr.isatty())
    try:
        rec = gather(request)
    except NoPlanFits as err:
        click.echo(json.dumps(report.no_fit_json(err.rec), indent=2) if as_json
                   else report.render_no_fit(err.rec, explain))
        sys.exit(1)
    trainer = source if source is not None and source.format != "memplan" else None
    if as_json:
        out = rec.to_json()
        click.echo(json.dumps({**out, "config_source": trainer.to_json()} if trainer else out, indent=2))
    else:
        if trainer:
            from memplan.trainers.source import source_lines

            click.echo("\n".join(source_lines(trainer)) + "\n")
        click.echo(report.render(rec, explain))


def _config_inputs(options: dict, hparams: dict):
    """--config: the file's inputs fill the options the user did not pass (memplan.trainers.recommend_inputs).
    Returns the read config (or None); without --config or --model, the missing model is refused."""
    from memplan.errors import UserError

    path = options.pop("config_path")
    accelerate = options.pop("accelerate_path", None)
    source = None
    if accelerate and not path:
        raise UserError("--accelerate-config goes with --config (the trainer's config it launches)")
    if path:
        from memplan.trainers import read_config, recommend_inputs

        source = read_config(path, accelerate)
        for key, value in recommend_inputs(source, options.get("gpus")).items():
            target = hparams if key in ("epochs", "lr", "warmup_ratio") else options
            if target.get(key) is None or (key == "nodes" and target.get(key) == 1):
                target[key] = value
    if not options.get("model") and not path:
        raise UserError("recommend: missing option --model / -m (see `memplan recommend --help`)")
    if not options.get("model"):
        raise UserError(f"{path} names no model: give --model (a preset such as llama-2-7b; `memplan models` "
                        "lists them)")
    return source
