"""Reading the configs of the trainers people use as memplan plans: TRL / transformers TrainingArguments,
axolotl, LLaMA-Factory and torchtune (and memplan's own plan.yaml), each with where every plan field came from
(memplan.trainers.source). `memplan estimate --config` and `memplan recommend --config` call `read_config`.

Pure Python: nothing here imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

from memplan.errors import UserError
from memplan.files import read_yaml
from memplan.trainers.source import FORMAT_NAMES, ConfigSource


def read_config(path: str | Path, accelerate: str | Path | None = None) -> ConfigSource:
    """A config file as a plan dict and its provenance. An unrecognised file is a UserError naming the
    formats memplan reads. `accelerate`: the accelerate config (`accelerate launch --config_file`) that launches
    a TRL, axolotl or LLaMA-Factory config; its processes and sharding join the reading
    (memplan.trainers.accelerate)."""
    from memplan.trainers.detect import detect

    path = str(path)
    data = read_yaml(path, "plan file")  # JSON is YAML too; errors name it as they did before trainer configs
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file is a mapping of settings, got {type(data).__name__}")
    fmt = detect(data)
    if fmt is None:
        raise UserError(f"{path}: not a config memplan reads; it reads {', '.join(FORMAT_NAMES.values())} configs "
                        f"(YAML or JSON)")
    if accelerate is not None:
        from memplan.trainers.accelerate import load, locate

        accelerate = locate(str(accelerate), path, "--accelerate-config")  # a file, or one of TRL's names
        load(accelerate)  # one line if it is not an accelerate config
        if fmt not in LAUNCHED:
            what = "an accelerate config itself" if fmt == "accelerate" else f"a {FORMAT_NAMES[fmt]} config"
            raise UserError(f"{path} is {what}: an accelerate config goes with a TRL / transformers "
                            f"TrainingArguments, axolotl or LLaMA-Factory config (--config FILE "
                            f"--accelerate-config {accelerate})")
    if fmt == "memplan":
        from memplan.plan import read_plan_yaml

        return ConfigSource("memplan", path, read_plan_yaml(path))
    from importlib import import_module

    module = import_module(f"memplan.trainers.{fmt.replace('-', '')}")
    if fmt in LAUNCHED:
        return module.read(data, path, None if accelerate is None else str(accelerate))
    return module.read(data, path)


#: The formats an accelerate config launches: those built on transformers' Trainer (torchtune runs under
#: `tune run`, memplan's plan states its own processes and sharding).
LAUNCHED = ("trl", "axolotl", "llama-factory")


def recommend_inputs(source: ConfigSource, gpus: int | None) -> dict:
    """What `memplan recommend --config` starts from: the config's model, training file, sequence length,
    effective batch (micro-batch x accumulation x GPUs), epochs, learning rate and warmup ratio, its GPUs
    and nodes when the file states them, and its method when the file names one (the decision tree then
    does not choose it). Only values the file gives or the trainer's defaults fill: recommend's own defaults
    stay where the file says nothing. `gpus`: --gpus, which the effective batch counts."""
    plan = source.plan
    stated = set(source.taken) | (set(source.assumed) - {"gpus", "nodes", "method", "sharding"})
    hparams, data = plan.get("hparams") or {}, plan.get("data") or {}
    out = {"model": plan.get("model"), "data": data.get("train"), "seq_len": plan.get("seq_len"),
           "epochs": hparams.get("epochs"), "lr": hparams.get("lr"), "warmup_ratio": hparams.get("warmup_ratio")}
    if source.format == "memplan" or "method" in source.taken:
        out["method"] = plan.get("method")
    for key in ("gpus", "nodes"):
        if key in source.taken or (source.format == "memplan" and key in plan):
            out[key] = plan[key]
    if "micro_batch" in stated or source.format == "memplan":
        world = (gpus or out.get("gpus") or 1) * (out.get("nodes") or 1)
        if plan.get("micro_batch"):
            out["effective_batch"] = plan["micro_batch"] * plan.get("grad_accum", 1) * world
    return {k: v for k, v in out.items() if v is not None}
