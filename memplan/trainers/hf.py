"""What the trainers built on transformers' Trainer share (TRL, LLaMA-Factory, axolotl): optimizer, scheduler
and attention names, the precision regime of a weight dtype under bf16/fp16, and the DeepSpeed and FSDP
settings that transformers' TrainingArguments take (`deepspeed`, `fsdp`, `fsdp_config`).

Sources (transformers 5.25): training_args.py (OptimizerNames, the fsdp options), integrations/deepspeed.py
(HfTrainerDeepSpeedConfig.trainer_config_process: how "auto" values are filled from the arguments).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan.errors import UserError
from memplan.files import read_yaml
from memplan.trainers import liger
from memplan.trainers.source import Reading, shown_value

if TYPE_CHECKING:
    from memplan.plan import Plan

#: transformers' OptimizerNames (and the names axolotl adds) -> the Plan's optimizer.
OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_hf": "adamw", "adamw": "adamw", "adamw_torch_fused": "adamw-fused",
    "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit", "paged_adamw_8bit": "paged-adamw-8bit",
    "adafactor": "adafactor", "sgd": "sgd",
}
#: Optimizers counted as the nearest Plan optimizer, with what differs.
NEAR_OPTIMIZERS = {
    "adamw_torch_8bit": ("adamw-8bit", "torchao's 8-bit AdamW, counted as bitsandbytes' (one byte per state); "
                                       "torchao's block scales are not counted"),
    "paged_adamw_32bit": ("adamw", "paged 32-bit AdamW: two fp32 states per parameter counted, the paging "
                                   "to host memory under pressure is not"),
}

#: transformers' SchedulerType -> the Plan's lr_scheduler (decay shape only: no memory effect).
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant",
              "cosine_with_min_lr": "cosine", "cosine_with_restarts": "cosine", "warmup_stable_decay": "linear"}

#: attn_implementation -> the Plan's attn. flash-attention 2/3 and the Hub's flash kernels run the same
#: memory-efficient kernel; memplan counts flash-attention 2's.
ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flash_attention_2": "flash", "flash_attention_3": "flash",
             "kernels-community/flash-attn2": "flash", "kernels-community/flash-attn3": "flash",
             "kernels-community/vllm-flash-attn3": "flash"}

HALF = {"bfloat16", "bf16", "float16", "fp16", "half"}


def optimizer(r: Reading, name: str, key: str, default: str | None = None) -> None:
    """The Plan's optimizer from a transformers/axolotl optimizer name; `default`: the citation when the file
    does not name one."""
    name = str(name)
    if name in OPTIMIZERS and default:
        r.assume("optimizer", OPTIMIZERS[name], f"{key} not set; {default}, {name}")
    elif name in OPTIMIZERS:
        r.take("optimizer", OPTIMIZERS[name], key)
    elif name in NEAR_OPTIMIZERS:
        plan_name, why = NEAR_OPTIMIZERS[name]
        r.take("optimizer", plan_name, key)
        r.unmodelled(key, name, why)
    else:
        r.take("optimizer", "adamw", key)
        r.unmodelled(key, name, "an optimizer memplan does not model: its states are counted as AdamW's "
                               "(two fp32 states per trainable parameter)")


def scheduler(r: Reading, name: str, key: str) -> None:
    r.take("hparams.lr_scheduler", SCHEDULERS.get(str(name), "cosine"), key)


def attention(r: Reading, name: Any, key: str) -> None:
    if str(name) in ATTENTION:
        r.take("attn", ATTENTION[str(name)], key)
    else:
        r.take("attn", "sdpa", key)
        r.unmodelled(key, name, "an attention kernel memplan does not model; counted as sdpa's")


def precision(r: Reading, weights: str, autocast: str | None, keys: str) -> None:
    """The Plan's precision without DeepSpeed, from the dtype the weights are loaded in and the Trainer's
    autocast (bf16=True / fp16=True: TrainingArguments run the forward under torch.autocast, they do not
    cast the weights). fp32 weights + bf16 autocast = amp-bf16; 16-bit weights are trained as they are, with
    no fp32 master copy, whether autocast is on or not = bf16 (fp16 weights have the same two bytes)."""
    record = r.assume if "not set" in keys else r.take
    if weights in HALF:
        record("precision", "bf16", keys)
        if weights in ("float16", "fp16", "half"):
            r.unmodelled(keys.split(" + ")[0], weights, "float16 weights: counted as bf16 (the same two bytes); "
                                                        "fp16 loss scaling is not counted")
    elif autocast == "bf16":
        record("precision", "amp-bf16", keys)
    elif autocast == "fp16":
        record("precision", "amp-fp16", keys)
    else:
        record("precision", "fp32", keys)


def find_file(value: str, config_path: str, what: str) -> Path:
    """A file a config names by a relative path: trainers open it from the directory they run in, which is
    often the root of the repository the config sits in (LLaMA-Factory's examples name
    examples/deepspeed/ds_z3_config.json). memplan looks in the current directory, then in the config's
    directory and each directory above it."""
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        here = Path(config_path).resolve().parent
        candidates = [Path.cwd() / path, *(d / path for d in [here, *here.parents])]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"{config_path}: {what}: cannot find {value} (looked in the current directory and in the "
                    "config's directory and those above it); give its path from here, or an absolute one")


def section(r: Reading, key: str, what: str) -> tuple[dict[str, Any], str]:
    """A section given inline or as the path of a JSON/YAML file (`deepspeed`, `fsdp_config`): its dict
    and how the report names it."""
    value = r.get(key)
    if isinstance(value, dict):
        return value, key
    path = find_file(str(value), r.path, key)
    data = read_yaml(path, what)  # JSON is YAML
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} is a mapping of settings, got {type(data).__name__}")
    r.files.append(str(path))
    return data, f"{key} ({path.name})"


#: transformers' TrainingArguments defaults that reach the plan (transformers 5.25 training_args.py); TRL and
#: LLaMA-Factory override some (their modules pass their own table over this one).
TRAINING_ARGUMENTS = "transformers' TrainingArguments default"
DEFAULTS: dict[str, tuple[Any, str]] = {
    "per_device_train_batch_size": (8, TRAINING_ARGUMENTS),
    "gradient_accumulation_steps": (1, TRAINING_ARGUMENTS),
    "learning_rate": (5e-5, TRAINING_ARGUMENTS),
    "num_train_epochs": (3.0, TRAINING_ARGUMENTS),
    "lr_scheduler_type": ("linear", TRAINING_ARGUMENTS),
    "weight_decay": (0.0, TRAINING_ARGUMENTS),
    "max_grad_norm": (1.0, TRAINING_ARGUMENTS),
    "seed": (42, TRAINING_ARGUMENTS),
    "optim": ("adamw_torch_fused", TRAINING_ARGUMENTS + " (torch 2.8 or later)"),
    "gradient_checkpointing": (False, TRAINING_ARGUMENTS),
    "bf16": (False, TRAINING_ARGUMENTS),
    "fp16": (False, TRAINING_ARGUMENTS),
}

#: TrainingArguments keys that change memory and that memplan's estimate does not count.
UNMODELLED = {
    "torch_compile": "torch.compile fuses kernels and changes which activations are kept",
    "auto_find_batch_size": "the batch size is halved after each out-of-memory error",
    "torch_empty_cache_steps": "the CUDA cache is emptied every N steps (less reserved memory)",
    "gradient_checkpointing_kwargs": "checkpointing options beyond use_reentrant (every_n_layers, offload); "
                                     "memplan counts checkpointing of every decoder layer",
    "activation_checkpointing_kwargs": "checkpointing options beyond use_reentrant (every_n_layers, offload); "
                                       "memplan counts checkpointing of every decoder layer",
    "per_device_eval_batch_size": "the evaluation batch (memplan estimates the training step)",
}

#: TrainingArguments keys with no effect on a training step's memory.
QUIET = set("""
    output_dir overwrite_output_dir do_train do_eval do_predict eval_strategy evaluation_strategy eval_steps
    logging_dir logging_strategy logging_steps logging_first_step save_strategy save_steps save_total_limit
    save_only_model save_safetensors report_to run_name push_to_hub hub_model_id hub_strategy hub_private_repo
    hub_token resume_from_checkpoint log_level log_level_replica disable_tqdm remove_unused_columns label_names
    load_best_model_at_end metric_for_best_model greater_is_better ddp_timeout ddp_find_unused_parameters
    dataloader_num_workers dataloader_pin_memory dataloader_persistent_workers dataloader_prefetch_factor
    dataloader_drop_last tf32 bf16_full_eval fp16_full_eval data_seed full_determinism group_by_length
    length_column_name adam_beta1 adam_beta2 adam_epsilon lr_scheduler_kwargs optim_args label_smoothing_factor
    neftune_noise_alpha average_tokens_across_devices include_num_input_tokens_seen include_tokens_per_second
    eval_accumulation_steps eval_delay prediction_loss_only use_cpu local_rank save_on_each_node ignore_data_skip
    warmup_ratio warmup_steps max_steps plot_loss env use_cache
""".split())


def _value(r: Reading, key: str, path: str, defaults: dict[str, tuple[Any, str]], convert: Any = None) -> Any:
    """A TrainingArguments value onto plan field `path`: taken from the file, else the default, cited."""
    if r.has(key):
        value = r.get(key)
        try:
            r.take(path, convert(value) if convert else value, key)
        except (TypeError, ValueError):
            kind = "a whole number" if convert is int else "a number"  # bool() takes any value
            raise UserError(f"{r.path}: {key} is {shown_value(value)}, not {kind}") from None
        return value
    value, source = defaults[key]
    r.assume(path, convert(value) if convert else value, f"{key} not set; {source}")
    return value


def _warmup(r: Reading) -> None:
    """warmup_ratio (older transformers), or warmup_steps: a count, or a float below 1 (a ratio of the total
    steps, transformers 5)."""
    steps = r.get("warmup_steps")
    ratio = r.get("warmup_ratio")
    if ratio is not None and not steps:
        r.take("hparams.warmup_ratio", float(ratio), "warmup_ratio")
    elif steps is not None and 0 < float(steps) < 1:
        r.take("hparams.warmup_ratio", float(steps), "warmup_steps (below 1: a ratio)")
    elif steps is not None:
        r.take("hparams.warmup_steps", int(steps), "warmup_steps")
    else:
        r.assume("hparams.warmup_steps", 0, f"warmup_steps not set; {TRAINING_ARGUMENTS}")


def training_arguments(r: Reading, defaults: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """The TrainingArguments part of a config onto the plan: batch, schedule, optimizer, checkpointing and
    the unmodelled settings. Returns what DeepSpeed's "auto" and the precision need: the micro-batch,
    accumulation and bf16 / fp16, with the keys they came from."""
    d = {**DEFAULTS, **defaults}
    micro = _value(r, "per_device_train_batch_size", "micro_batch", d, int)
    accum = _value(r, "gradient_accumulation_steps", "grad_accum", d, int)
    _value(r, "learning_rate", "hparams.lr", d, float)
    _value(r, "num_train_epochs", "hparams.epochs", d, float)
    if r.has("max_steps") and int(r.get("max_steps")) > 0:
        r.take("hparams.max_steps", int(r.get("max_steps")), "max_steps")
    scheduler(r, r.get("lr_scheduler_type", d["lr_scheduler_type"][0]), "lr_scheduler_type")
    _warmup(r)
    _value(r, "weight_decay", "hparams.weight_decay", d, float)
    _value(r, "max_grad_norm", "hparams.max_grad_norm", d, float)
    _value(r, "seed", "hparams.seed", d, int)
    optimizer(r, r.get("optim", d["optim"][0]), "optim", None if r.has("optim") else d["optim"][1])
    ckpt_key = "activation_checkpointing" if r.has("activation_checkpointing") else "gradient_checkpointing"
    _value(r, ckpt_key, "grad_ckpt", {ckpt_key: d["gradient_checkpointing"]}, bool)
    bf16 = bool(r.get("bf16", d["bf16"][0]))
    fp16 = bool(r.get("fp16", d["fp16"][0]))
    half_key = "bf16" if r.has("bf16") else f"bf16 not set ({d['bf16'][1]}: {shown_value(bf16)})"
    checkpoint_options(r)
    liger.read_hf(r, "use_liger_kernel", "liger_kernel_config")
    if r.get("activation_offloading"):  # TRL's SFTConfig: trl/models/activation_offloading.py, torchtune's design
        r.take("offload_activations", True, "activation_offloading")
    else:
        r.ignore("activation_offloading")
    unmodelled(r, UNMODELLED)
    return {"micro_batch": micro, "micro_batch_key": "per_device_train_batch_size", "grad_accum": accum,
            "grad_accum_key": "gradient_accumulation_steps", "bf16": bf16, "fp16": fp16 and not bf16,
            "half_key": half_key, "autocast": "bf16" if bf16 else "fp16" if fp16 else None}


def checkpoint_options(r: Reading, keys: tuple[str, ...] = ("gradient_checkpointing_kwargs",
                                                              "activation_checkpointing_kwargs")) -> None:
    """{use_reentrant: true | false} alone is the plan's ckpt_reentrant (transformers hands the kwargs to
    torch.utils.checkpoint.checkpoint; without them transformers 5 checkpoints non-reentrant): false is what
    memplan counts by default, true is taken; any other option (every_n_layers, offload...) is not modelled."""
    for key in keys:
        value = r.data.get(key)
        if not (isinstance(value, dict) and list(value) == ["use_reentrant"]):
            continue
        reentrant = value["use_reentrant"] in (True, "true", "True")
        if reentrant and r.plan.get("grad_ckpt"):
            r.take("ckpt_reentrant", True, f"{key}.use_reentrant")
            r.count(key, r.get(key), "reentrant checkpointing: ckpt_reentrant")
        elif value["use_reentrant"] in (False, "false", "False"):
            r.count(key, r.get(key), "non-reentrant checkpointing, as memplan counts")
        else:
            r.ignore(key)  # reentrant, without checkpointing: nothing is recomputed


def unmodelled(r: Reading, table: dict[str, str]) -> None:
    """The file's keys of `table` whose value turns the feature on (not false / null / 0)."""
    for key, why in table.items():
        if key in r.data and key not in r.counted:
            value = r.get(key)
            if value not in (None, False, 0, "false", "False", {}, []):
                r.unmodelled(key, value, why)
            else:
                r.ignore(key)


def parallel(r: Reading, args: dict[str, Any], weights: str, weights_key: str) -> None:
    """Sharding and precision: DeepSpeed (its engine sets the precision), FSDP or DDP (the weights' dtype and
    the Trainer's autocast). Without DeepSpeed or FSDP the plan is DDP; how many GPUs the launcher starts
    is not in the file, unless an accelerate config launches it (`r.launcher`: memplan.trainers.accelerate,
    which says how the two combine)."""
    from memplan.trainers import accelerate, deepspeed, fsdp

    launch = accelerate.Launch(r.launcher) if r.launcher else None
    fsdp_on = (r.has("fsdp") and r.data.get("fsdp") not in (False, "", [])) or (
        r.has("fsdp_version") and r.has("fsdp_config"))  # axolotl's FSDP2 form: fsdp_version with fsdp_config
    kind = "deepspeed" if r.has("deepspeed") else "fsdp" if fsdp_on else None
    if launch is not None:
        launch.check(kind, r.path)
    fsdp_config: dict[str, Any] = {}
    if kind == "deepspeed":
        ds, where = section(r, "deepspeed", "DeepSpeed config")
        deepspeed.read(r, ds, where, args)
    else:
        if kind == "fsdp":
            fsdp_config = fsdp.read(r)
        else:
            r.ignore("fsdp", "fsdp_config")
            if launch is None:
                r.assume("sharding", "ddp", "no deepspeed or fsdp in the file: data parallel")
        autocast, keys = args["autocast"], f"{weights_key} + {args['half_key']}"
        if autocast is None and launch is not None and launch.autocast is not None:
            # TrainingArguments.mixed_precision: the trainer's bf16 / fp16, else accelerate's mixed_precision
            autocast, keys = launch.autocast, f"{weights_key} + {launch.name}: mixed_precision"
        precision(r, weights, autocast, keys)
    if launch is None:
        r.assume("gpus", 1, "the launcher (torchrun, accelerate launch) sets the processes, not this file: pass "
                            "--gpus, or --accelerate-config FILE")
    else:
        launch.apply({"kind": kind, "args": args, "path": r.path, "r": r, "fsdp_config": fsdp_config})
        launch.merge_into(r)
    if r.plan.get("sharding") == "fsdp":
        _gradient_reduction(r)


def _gradient_reduction(r: Reading) -> None:
    """FSDP with accumulation: the Trainer defers the reduce-scatter to the last micro-batch (accelerate's no_sync,
    `_defer_fsdp_gradient_reduction`) unless accelerate's sync_each_batch is set: the plan's sync_each_batch.
    `accelerator_config` is a mapping or the path of a JSON file (TrainingArguments reads it with
    AcceleratorConfig.from_json_file)."""
    config, where = section(r, "accelerator_config", "accelerator config") if r.has("accelerator_config") \
        else ({}, "accelerator_config")
    kwargs = config.get("gradient_accumulation_kwargs")
    sync = kwargs.get("sync_each_batch") if isinstance(kwargs, dict) else None
    key = f"{where}.gradient_accumulation_kwargs.sync_each_batch"
    if isinstance(sync, bool):
        r.take("sync_each_batch", sync, key)
    else:
        r.assume("sync_each_batch", False, f"{key} not set: with accumulation transformers' Trainer reduce-scatters "
                                           "FSDP's gradients on the last micro-batch only (no_sync), each GPU "
                                           "holding every layer's whole gradients until then")


# ---------------------------------------------------------------- writing (memplan.trainers.emit)

#: The Plan's optimizer -> transformers' OptimizerNames (training_args.py), which axolotl takes too.
#: adamw-forloop has no name there (adamw_torch is torch's AdamW with its default foreach).
OPTIMIZER_NAMES = {"adamw": "adamw_torch", "adamw-fused": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit",
                   "paged-adamw-8bit": "paged_adamw_8bit", "adafactor": "adafactor", "sgd": "sgd"}
#: The Plan's attn -> attn_implementation.
ATTENTION_NAMES = {"eager": "eager", "sdpa": "sdpa", "flash": "flash_attention_2"}


def nearest_optimizer(n) -> None:
    """adamw-forloop -> adamw: transformers names no for-loop AdamW (`n`: a memplan.trainers.emit.Nearest)."""
    if n.plan.optimizer == "adamw-forloop":
        n.change("optimizer", "adamw", "optimizer adamw-forloop -> adamw: transformers' optim names torch's AdamW "
                                       "(adamw_torch, foreach) and its fused one, not the for-loop one")


def nearest_precision(n, amp_masters: str = "amp-bf16") -> None:
    """bf16-master without DeepSpeed: the Trainer keeps fp32 masters of bf16 weights only through DeepSpeed's
    bf16 engine; amp-bf16 (fp32 weights, bf16 autocast) keeps the fp32 weights instead."""
    if n.plan.precision == "bf16-master" and n.plan.sharding != "deepspeed":
        n.change("precision", amp_masters, f"precision bf16-master -> {amp_masters}: bf16 weights with fp32 masters "
                                           "run only under DeepSpeed's bf16 engine in transformers' Trainer; "
                                           f"{amp_masters} keeps fp32 weights and autocasts to bf16")


def training_arguments_for(plan: Plan) -> dict[str, Any]:
    """transformers' TrainingArguments of the plan's step and schedule (recommend's writers.trainer_arguments),
    with bf16 / fp16 as the regime turns autocast or DeepSpeed's engine on, and the plan's checkpointing
    (reentrant or not: gradient_checkpointing_kwargs use_reentrant)."""
    from memplan.recommend.writers import trainer_arguments

    args = trainer_arguments(plan)
    regime = plan.regime
    args["bf16"] = regime.deepspeed_bf16 if plan.sharding == "deepspeed" else regime.compute == "bfloat16"
    if plan.precision == "amp-fp16":
        args["fp16"] = True
    if plan.grad_ckpt:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": plan.ckpt_reentrant}
    args["optim"] = OPTIMIZER_NAMES[plan.optimizer]
    if plan.device == "cpu":
        args["use_cpu"] = True
    args.update(ddp_arguments(plan))
    return args


def ddp_arguments(plan: Plan) -> dict[str, Any]:
    """DDP on several GPUs: find_unused_parameters off, as accelerate and `memplan train` run it and as the estimate
    counts DDP's buckets (memplan.estimator.reducer). Every parameter of a plan takes part in every step, and the
    Trainer would otherwise turn it on for a peft model (`_build_accelerator_args`): a search of the autograd
    graph every step, and other buckets."""
    if plan.sharding == "ddp" and plan.world_size > 1:
        return {"ddp_find_unused_parameters": False}
    return {}


def fsdp_arguments(plan: Plan, spec) -> dict[str, Any]:
    """TrainingArguments' fsdp / fsdp_config for an FSDP plan: FSDP2 (transformers' fsdp_config version 2),
    one unit per decoder layer, resharding after the forward = ZeRO-3 (FULL_SHARD), kept = ZeRO-2
    (SHARD_GRAD_OP), cpu_offload = parameters, gradients and the optimizer step on the host. Checkpointing
    stays transformers' gradient_checkpointing, as memplan counts it. With accumulation, accelerate's
    sync_each_batch is the plan's: on (memplan's default), every micro-batch reduce-scatters its gradients; off, the
    Trainer defers it to the last micro-batch (`_defer_fsdp_gradient_reduction`, accelerate's no_sync), and each
    process holds every unit's whole gradients until then."""
    if plan.sharding != "fsdp":
        return {}
    options = ["full_shard" if plan.zero == 3 else "shard_grad_op" if plan.zero == 2 else "no_shard"]
    if plan.offload == "optimizer+params":
        options.append("offload")
    args: dict[str, Any] = {
        "fsdp": " ".join([*options, "auto_wrap"]),
        "fsdp_config": {"version": 2, "reshard_after_forward": plan.zero == 3,
                        "cpu_offload": plan.offload == "optimizer+params",
                        "transformer_layer_cls_to_wrap": [spec.traits.decoder_layer],
                        "state_dict_type": "SHARDED_STATE_DICT"}}
    args.update(accelerator_config(plan))
    return args


def accelerator_config(plan: Plan) -> dict[str, Any]:
    """TrainingArguments' accelerator_config for an FSDP plan with accumulation: accelerate's sync_each_batch, the
    plan's (TRL and LLaMA-Factory hand it to TrainingArguments, axolotl to AcceleratorConfig)."""
    if not plan.fully_shards or plan.grad_accum == 1:
        return {}
    return {"accelerator_config": {"gradient_accumulation_kwargs": {"sync_each_batch": plan.sync_each_batch}}}


def alloc_env(plan: Plan) -> str:
    """The shell prefix of the plan's CUDA allocator (memplan.runtime.cuda_allocator), "" for the default."""
    from memplan.runtime.cuda_allocator import launch_prefix

    return launch_prefix(plan.allocator)
