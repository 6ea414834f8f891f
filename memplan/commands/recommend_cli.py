"""`memplan recommend`: the click definition only; the work is in memplan.recommend (imported when run)."""

from __future__ import annotations

import click

from memplan.cli_options import HPARAM_FLAGS, plan_options


@click.command()
@click.option("--model", "-m", "model", required=True,
              help="preset id or alias (see `memplan models`), a config.json path, or a local HF model directory.")
@click.option("--gpus", type=int, default=None,
              help="GPUs per node (default: the local GPUs found, else 1). On a CPU plan: processes.")
@click.option("--nodes", type=int, default=None, help="machines (default 1).")
@click.option("--gpu", "gpu", default=None, help="GPU preset id (see `memplan gpus`), e.g. h100-80gb.")
@click.option("--gpu-memory", "gpu_memory", default=None,
              help="memory per GPU for a GPU without a preset, e.g. 24GiB, 81559MiB, 80GB (decimal). "
                   "Without --gpu / --gpu-memory: the local GPUs (NVML), else this machine's CPU and RAM.")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="training JSONL (alpaca, chat or text): examples are counted and token lengths measured "
                   "with the model's tokenizer when it has one on disk (else ~4 characters per token).")
@click.option("--validation", type=click.Path(dir_okay=False), default=None,
              help="validation JSONL (default: 5 % of --data is held out).")
@click.option("--replay", type=click.Path(dir_okay=False), default=None,
              help="general-text JSONL mixed in against forgetting when the domain shift is high.")
@click.option("--dataset-size", "dataset_size", type=int, default=None,
              help="training examples, when there is no --data file to count [examples].")
@click.option("--seq-len", "seq_len", type=int, default=None,
              help="tokens per sequence (default: p95 of --data rounded up to 64, else 2048) [tokens].")
@click.option("--domain-shift", "domain_shift", type=click.Choice(["low", "high"]), default=None,
              help="how far the task is from pre-training: high for medicine, law ... (default: low, printed "
                   "as an assumption).")
@click.option("--method", type=click.Choice(["full", "lora", "qlora"]), default=None,
              help="force the method and skip the decision tree.")
@click.option("--effective-batch", "effective_batch", type=int, default=None,
              help="sequences per optimizer step = micro-batch x accumulation x GPUs (default: 32, less for "
                   "small sets) [sequences].")
@plan_options({"hparams.epochs": HPARAM_FLAGS["hparams.epochs"], "hparams.lr": HPARAM_FLAGS["hparams.lr"],
               "hparams.warmup_ratio": HPARAM_FLAGS["hparams.warmup_ratio"]})
@click.option("--max-hours", "max_hours", type=float, default=None,
              help="time budget: full FT counts as 'enough compute' only within it (default 72) [hours].")
@click.option("--priority", type=click.Choice(["quality", "speed", "memory"]), default="quality", show_default=True,
              help="quality: no quality trade-offs (fp32 master weights, 32-bit Adam) unless needed to fit, then "
                   "fastest; speed: fastest; memory: smallest.")
@click.option("--headroom", type=float, default=0.10, show_default=True,
              help="fraction of each device's memory kept free: a plan must fit (1 - headroom) x memory.")
@click.option("--host-memory", "host_memory", default=None,
              help="RAM per node for offloaded optimizer states and parameters (a CPU plan: its whole budget), "
                   "e.g. 512GiB (default: this machine's for local GPUs and CPU plans, else 128 GiB per GPU).")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write plan.yaml, accelerate_config.yaml, ds_config.json (DeepSpeed) and README.md here.")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of tables.")
@click.option("--explain", is_flag=True, help="also print the decision tree with the path taken marked.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="write a PNG of the candidates' memory per device, stacked by term, against the capacity.")
def recommend(**kwargs) -> None:
    """Recommend a fine-tuning method and the fastest plan that fits, and write ready-to-run configs.

    The seed's decision tree picks full FT, LoRA or QLoRA (--explain shows it); a search over precision,
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
    from memplan.recommend.command import run

    run(**kwargs)
