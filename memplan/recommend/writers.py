"""The ready-to-run files of a recommendation: plan.yaml, accelerate_config.yaml, ds_config.json, README.md.

Key names follow the tools that read them: accelerate's config file (ClusterConfig), DeepSpeed's JSON
config (deepspeed.ai/docs/config-json) and memplan's flat Plan YAML (`memplan train` / `estimate --config`).
Written atomically: a new directory appears complete (temporary directory + rename); in an existing one
each file is replaced whole (temporary file + os.replace), leaving other files (checkpoints) alone.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path

from memplan.catalog.spec import ModelSpec
from memplan.estimator import zero3_gather
from memplan.estimator.sharding import deepspeed_reduce_bucket_elems
from memplan.plan import Plan, mixed_precision, plan_to_yaml
from memplan.runtime.cuda_allocator import launch_prefix
from memplan.train.deepspeed_setup import DS_CONFIG_NAME, optimizer_section

#: torch.distributed's default rendezvous port (MASTER_PORT in torchrun and accelerate).
MAIN_PROCESS_PORT = 29500

def distributed_type(plan: Plan) -> str:
    if plan.sharding == "deepspeed":
        return "DEEPSPEED"
    if plan.sharding == "fsdp" and (plan.world_size > 1 or plan.fully_shards):
        return "FSDP"
    if plan.world_size > 1:
        return "MULTI_CPU" if plan.device == "cpu" else "MULTI_GPU"
    return "NO"


def accelerate_config(plan: Plan, spec: ModelSpec, main_ip: str) -> dict:
    """accelerate's config file (what `accelerate config` writes), for `accelerate launch --config_file`.
    It names ds_config.json without a directory, so that the plan directory can move: `memplan train`
    resolves it next to this file and passes it as --deepspeed_config_file; accelerate alone opens the
    name from the current directory (accelerate.utils.deepspeed.HfDeepSpeedConfig), hence the README's
    by-hand command passes the flag too."""
    cfg: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type(plan),
        "num_machines": plan.nodes,
        "num_processes": plan.world_size,  # all processes over all machines
        "machine_rank": 0,
        "use_cpu": plan.device == "cpu",
        "debug": False,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
    }
    if plan.sharding == "deepspeed":
        # The DeepSpeed JSON holds precision, accumulation, clipping and ZeRO settings; accelerate refuses
        # them twice (DeepSpeedPlugin._deepspeed_config_checks), so no mixed_precision here.
        cfg["deepspeed_config"] = {"deepspeed_config_file": DS_CONFIG_NAME, "zero3_init_flag": plan.zero == 3}
    else:
        cfg["mixed_precision"] = mixed_precision(plan)
    if cfg["distributed_type"] == "FSDP":
        fsdp = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # FSDP2: reshard after forward = FULL_SHARD (ZeRO-3); keep gathered = SHARD_GRAD_OP (ZeRO-2)
            "fsdp_reshard_after_forward": plan.zero == 3,
            "fsdp_offload_params": plan.offload == "optimizer+params",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": True,
            # memplan train checkpoints through transformers (plan.grad_ckpt), not through FSDP's wrapper
            "fsdp_activation_checkpointing": False,
        }
        fsdp["fsdp_transformer_layer_cls_to_wrap"] = spec.traits.decoder_layer
        cfg["fsdp_config"] = fsdp
    if plan.nodes > 1:
        cfg["main_process_ip"] = main_ip
        cfg["main_process_port"] = MAIN_PROCESS_PORT
    return cfg


def ds_config(plan: Plan, spec: ModelSpec) -> dict:
    """DeepSpeed's JSON config for the plan, in the form HF Trainer-based tools (transformers' Trainer,
    axolotl, LLaMA-Factory) and `memplan train` both read: "auto" at the keys transformers'
    HfTrainerDeepSpeedConfig fills from the training arguments (AUTO_KEYS: batch sizes, accumulation,
    clipping, the optimizer's lr / betas / eps / weight_decay; memplan train fills them from plan.yaml),
    the plan's values where the estimate depends on them and a training tool has no argument for them
    (ZeRO stage, offload, bucket sizes) or must agree (bf16: HF Trainer checks it against --bf16).

    Bucket sizes are the plan's (Plan.deepspeed), else HF's "auto" rules, the ones the estimator assumes then
    (reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2, stage3_param_persistence_threshold
    = 10 hidden; transformers integrations/deepspeed.py); ZeRO-3's live-parameter cap, reuse distance and
    sub-group size are written where the plan sets them (DeepSpeed's defaults otherwise). The optimizer section
    is the plan's AdamW (deepspeed_setup.optimizer_section). No scheduler section: without one HF Trainer runs its own
    schedule (lr_scheduler_type, warmup_steps: transformers' get_scheduler, which memplan train's matches),
    while DeepSpeed's WarmupCosineLR starts its cosine one step early and warms up over at least 2 steps,
    logarithmically by default (deepspeed/runtime/lr_schedules.py)."""
    zero: dict = {"stage": plan.zero, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": deepspeed_reduce_bucket_elems(spec, plan)}
    if plan.zero == 3:
        zero.update({"stage3_prefetch_bucket_size": zero3_gather.prefetch_bucket(spec, plan),
                     "stage3_param_persistence_threshold": zero3_gather.persistence_threshold(spec, plan),
                     "stage3_gather_16bit_weights_on_model_save": True})
        ds = plan.deepspeed
        zero.update({key: value for key, value in (("stage3_max_live_parameters", ds.stage3_max_live_parameters),
                                                   ("stage3_max_reuse_distance", ds.stage3_max_reuse_distance),
                                                   ("sub_group_size", ds.sub_group_size)) if value is not None})
    if plan.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": plan.regime.deepspeed_bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
    }
    optimizer = optimizer_section(plan)
    if optimizer:
        cfg["optimizer"] = optimizer
    cfg.update({"steps_per_print": plan.hparams.log_every, "wall_clock_breakdown": False})
    return cfg


def trainer_arguments(plan: Plan) -> dict[str, object]:
    """transformers.TrainingArguments that give HF Trainer this plan: what it fills the JSON's "auto"
    values from, and the rest of the plan's step. AdamW's betas and eps are TrainingArguments' defaults."""
    h = plan.hparams
    args: dict[str, object] = {
        "per_device_train_batch_size": plan.micro_batch, "gradient_accumulation_steps": plan.grad_accum,
        "learning_rate": h.effective_lr(plan.method), "weight_decay": h.weight_decay, "max_grad_norm": h.max_grad_norm,
        # transformers' "constant" has no warmup; "constant_with_warmup" is the plan's constant
        "lr_scheduler_type": {"constant": "constant_with_warmup"}.get(h.lr_scheduler, h.lr_scheduler),
        # TrainingArguments.warmup_steps: a count, or below 1 a fraction of the steps (rounded up, as memplan)
        "warmup_steps": h.warmup_steps if h.warmup_steps is not None else h.warmup_ratio,
    }
    if h.max_steps:
        args["max_steps"] = h.max_steps
    else:
        args["num_train_epochs"] = h.epochs
    args.update(bf16=plan.regime.deepspeed_bf16, gradient_checkpointing=plan.grad_ckpt, seed=h.seed)
    if plan.grad_ckpt and plan.ckpt_reentrant:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    return args


def readme(out_dir: str, plan: Plan, summary: list[str], has_ds: bool, data_missing: bool = False) -> str:
    d = shlex.quote(out_dir.rstrip("/") or ".")
    lines = [f"# Fine-tuning plan: {plan.model} ({plan.method})", "", *summary, "",
             "## Files", "",
             "- `plan.yaml`: the plan (model, method, memory settings, data, hyperparameters, output). "
             "Relative paths in it are relative to this directory.",
             "- `accelerate_config.yaml`: accelerate's launch configuration "
             f"(`distributed_type: {distributed_type(plan)}`, {plan.world_size} process(es) "
             f"on {plan.nodes} machine(s))."]
    if has_ds:
        lines.append(f"- `{DS_CONFIG_NAME}`: DeepSpeed's configuration (ZeRO stage, offload, precision, optimizer), "
                     "named by `accelerate_config.yaml` relative to this directory: the directory can be moved "
                     "or copied elsewhere.")
    if data_missing:
        lines += ["", "## Before training: set the data", "",
                  "This plan was made from a dataset size (`--dataset-size`), so `data.train` in `plan.yaml` is "
                  "empty and `memplan train` needs it. Give the training JSONL when you train (a path relative to "
                  "the current directory):", "", "```bash", f"memplan train {d}/plan.yaml --set train=FILE.jsonl",
                  "```", "", "or write it into `plan.yaml` as `data.train` (relative to this directory)."]
    lines += ["", "## Check the memory estimate", "", "```bash", f"memplan estimate --config {d}/plan.yaml", "```",
              "", "## Run", ""]
    if plan.nodes == 1:
        launched = plan.world_size > 1 or has_ds or plan.fully_shards
        how = ("`memplan train` starts the processes itself through "
               f"`accelerate launch --config_file {d}/accelerate_config.yaml`.") if launched else \
            "One process: `memplan train` runs it directly."
        lines += [how, "", "```bash", f"memplan train {d}/plan.yaml", "```"]
    else:
        lines += [f"{plan.nodes} machines x {plan.gpus} GPUs. Copy this directory to every machine (any path; the "
                  "data files it names at the same place relative to it). `main_process_ip` in "
                  "`accelerate_config.yaml` must be the address of machine 0 (edit it if it is not). Then on "
                  "machine 0:", "", "```bash", f"memplan train {d}/plan.yaml", "```", "",
                  "and on machine K (1 to " + str(plan.nodes - 1) + "), set its rank first:", "", "```bash",
                  f"sed -i 's/^machine_rank: .*/machine_rank: K/' {d}/accelerate_config.yaml",
                  f"memplan train {d}/plan.yaml", "```", "",
                  "`memplan train` launches through "
                  f"`accelerate launch --config_file {d}/accelerate_config.yaml` on each machine."]
    if plan.allocator != "default":
        lines += ["", f"The plan runs PyTorch's CUDA allocator with expandable segments: `memplan train` sets "
                  f"`{launch_prefix(plan.allocator).strip()}` for its processes (the memory estimate assumes it); "
                  "set it yourself when you launch another way."]
    lines += ["", "Dry run (the resolved plan and its estimate, nothing trained):", "", "```bash",
              f"memplan train {d}/plan.yaml --dry-run", "```", ""]
    if has_ds:
        lines += _readme_deepspeed(d, plan)
    return "\n".join(lines)


def _readme_deepspeed(d: str, plan: Plan) -> list[str]:
    args = trainer_arguments(plan)
    cli = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items())
    offload = ("" if plan.offload == "none" else
               " Under ZeRO-Offload DeepSpeed steps its CPU Adam (`DeepSpeedCPUAdam`), whose C++ op it compiles "
               "on first use (a few minutes; ninja and a C++ compiler), or install DeepSpeed with "
               "`DS_BUILD_CPU_ADAM=1 pip install deepspeed` to build it ahead.")
    return [
        "## DeepSpeed by hand, or with another trainer", "",
        f"`accelerate_config.yaml` names `{DS_CONFIG_NAME}` without a directory, and accelerate opens that name "
        "from the current directory, so a launch by hand passes the file (which overrides the name):", "",
        "```bash",
        f"{launch_prefix(plan.allocator)}accelerate launch --config_file {d}/accelerate_config.yaml "
        f"--deepspeed_config_file {d}/{DS_CONFIG_NAME} -m memplan train {d}/plan.yaml",
        "```", "",
        f"`{DS_CONFIG_NAME}` follows HF Trainer's convention: the batch sizes, gradient accumulation, clipping "
        "and the optimizer's learning rate, betas, eps and weight decay are `\"auto\"`, filled by `memplan train` "
        "from `plan.yaml` and by HF Trainer-based tools (transformers' Trainer, axolotl, LLaMA-Factory) from their "
        "training arguments. The arguments that give this plan (the memory estimate assumes them, with sequences "
        f"of at most {plan.seq_len} tokens):", "",
        "```", cli + f" --deepspeed {d}/{DS_CONFIG_NAME}", "```", "",
        "It has no scheduler section, so HF Trainer runs its own warmup and decay (the arguments above), the "
        "schedule `memplan train` runs; it has an optimizer section, the plan's AdamW, which DeepSpeed builds."
        + offload, ""]


def _yaml(data: dict, header: str) -> str:
    import yaml

    return header + yaml.safe_dump(data, sort_keys=False)


#: Comments on plan.yaml's lines, by section and key: what a user editing the file needs to know there.
WARMUP_NOTE = "one of warmup_steps / warmup_ratio (a fraction of the steps), not both"
LORA_NOTE = "adapter settings: used by method lora and qlora"
DATA_NOTE = "must be set before memplan train: --set train=FILE.jsonl, or a path here (relative to this file)"


def annotate(text: str, notes: dict[tuple[str, str], str]) -> str:
    """Append `# note` to the lines of a YAML mapping at (section, key); key "" marks the section line."""
    out, section = [], ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":", 1)[0]
            key = ""
        else:
            key = line.strip().split(":", 1)[0]
        note = notes.get((section, key))
        out.append(f"{line}  # {note}" if note else line)
    return "\n".join(out) + "\n"


def plan_yaml(plan: Plan, shown_dir: str) -> str:
    d = shown_dir.rstrip("/") or "."
    notes = {("hparams", "warmup_steps"): WARMUP_NOTE, ("hparams", "warmup_ratio"): WARMUP_NOTE,
             ("lora", ""): LORA_NOTE}
    if plan.data.train is None:
        notes[("data", "train")] = DATA_NOTE
    return annotate(plan_to_yaml(plan, header=f"# memplan train {d}/plan.yaml\n"
                                              f"# memplan estimate --config {d}/plan.yaml\n"), notes)


def render_files(shown_dir: str, plan: Plan, spec: ModelSpec, summary: list[str], main_ip: str) -> dict[str, str]:
    """File name -> contents for the output directory."""
    d = shown_dir.rstrip("/") or "."
    files = {"plan.yaml": plan_yaml(plan, shown_dir)}
    has_ds = plan.sharding == "deepspeed"
    if has_ds:
        files[DS_CONFIG_NAME] = json.dumps(ds_config(plan, spec), indent=2) + "\n"
    launch = f"{launch_prefix(plan.allocator)}accelerate launch --config_file {d}/accelerate_config.yaml" + (
        f" --deepspeed_config_file {d}/{DS_CONFIG_NAME}" if has_ds else "")
    files["accelerate_config.yaml"] = _yaml(accelerate_config(plan, spec, main_ip),
                                            f"# {launch}  (memplan train {d}/plan.yaml does this)\n")
    files["README.md"] = readme(shown_dir, plan, summary, has_ds, data_missing=plan.data.train is None)
    return files


def main_ip() -> str:
    """This machine's address, the default main_process_ip of a multi-node plan (users planning from
    another machine edit it; the README says so)."""
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _write_file(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_atomically(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Write `files` into out_dir; returns the written paths."""
    from memplan.errors import UserError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} exists and is not a directory")
    try:
        _write_all(out_dir, files)
    except OSError as err:
        raise UserError(f"-o {out_dir}: cannot write there: {err.strerror} ({err.filename})") from None
    return [str(out_dir / name) for name in files]


def _write_all(out_dir: Path, files: dict[str, str]) -> None:
    if out_dir.is_dir():
        for name, text in files.items():
            _write_file(out_dir / name, text)
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        try:
            for name, text in files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            os.replace(tmp, out_dir)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
