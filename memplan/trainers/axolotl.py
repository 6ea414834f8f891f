"""axolotl's YAML config.

Sources (axolotl-ai-cloud/axolotl 067b021, 2026-07): src/axolotl/utils/schemas/training.py (micro_batch_size
1 = "the number of samples sent to each GPU", gradient_accumulation_steps 1, batch_size deprecated: per GPU
micro_batch_size x gradient_accumulation_steps, optimizer adamw_torch_fused, lr_scheduler cosine,
weight_decay 0.0), schemas/config.py (sequence_len 512, num_epochs 1.0, gradient_checkpointing false,
activation_offloading, sample_packing), schemas/peft.py (lora_dropout 0.0), utils/config/__init__.py
(normalize_config: gradient_accumulation_steps = batch_size // micro_batch_size when only batch_size is
given; resolve_dtype: `bf16: auto` is true on GPUs with bf16, and the weights are loaded in bfloat16 when
bf16 is on, float16 for fp16 or load_in_8bit, else float32).

Precision: axolotl loads the weights in the dtype it resolves and the Trainer autocasts to the same one, so
bf16 (or auto on a bf16 GPU) trains bf16 weights with no fp32 copy = bf16; neither bf16 nor fp16 = fp32.
Under DeepSpeed its bf16 engine decides (bf16-master).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memplan.errors import UserError
from memplan.train.deepspeed_setup import DS_CONFIG_NAME
from memplan.trainers import hf, liger, lora
from memplan.trainers.emit import Context, Emitted, Nearest
from memplan.trainers.source import ConfigSource, Reading

if TYPE_CHECKING:
    from memplan.plan import Plan

SCHEMA = "axolotl's default (src/axolotl/utils/schemas)"

UNMODELLED = {
    "activation_offloading": "activations offloaded to host memory",
    "layer_offloading": "layer parameters offloaded to host memory between uses",
    "context_parallel_size": "sequences split across GPUs (context parallelism)",
    "sequence_parallel_degree": "sequences split across GPUs (sequence parallelism)",
    "tensor_parallel_size": "tensor parallelism (weights split across GPUs)",
    "tiled_mlp": "the MLP computed in tiles along the sequence",
    "flash_attn_fuse_mlp": "a fused MLP kernel", "flash_attn_cross_entropy": "flash-attention's cross-entropy",
    "unfrozen_parameters": "only some parameters trained", "eval_batch_size": "the evaluation batch",
    "bnb_config_kwargs": "bitsandbytes options (double quantization saves ~0.4 bit per weight)",
    "torch_compile": "torch.compile fuses kernels and changes which activations are kept",
    "selective_checkpointing": "some activations kept inside checkpointed layers",
    "auto_find_batch_size": "the batch size is halved after each out-of-memory error",
}
QUIET = {"base_model_config", "model_type", "tokenizer_type", "tokenizer_config", "trust_remote_code", "strict",
         "hub_model_id", "hub_strategy", "val_set_size", "output_dir", "dataset_prepared_path", "lora_model_dir",
         "wandb_project", "wandb_entity", "wandb_watch", "wandb_name", "wandb_log_model", "wandb_run_id",
         "special_tokens", "tokens", "chat_template", "eot_tokens", "logging_steps", "evals_per_epoch",
         "saves_per_epoch", "eval_steps", "save_steps", "save_total_limit", "resume_from_checkpoint",
         "eval_sample_packing", "loss_watchdog_threshold", "loss_watchdog_patience", "train_on_inputs",
         "group_by_length", "min_sample_len", "early_stopping_patience", "save_first_step", "tf32", "seed",
         "dataset_processes", "shuffle_merged_datasets", "test_datasets", "local_rank", "save_safetensors",
         "ddp_timeout", "ddp_find_unused_parameters", "pad_to_sequence_len", "embeddings_skip_upcast",
         "gemma4_hybrid_attn_impl", "datasets", "max_grad_norm", "liger_rope", "liger_rms_norm", "liger_glu_activation",
         "liger_layer_norm", "liger_rms_norm_gated", "liger_fused_linear_cross_entropy", "liger_cross_entropy",
         "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_kwargs", "optim_args", "fsdp_version"}


def _method(r: Reading) -> None:
    adapter = r.get("adapter")
    four, eight = bool(r.get("load_in_4bit", False)), bool(r.get("load_in_8bit", False))
    if adapter in (None, ""):
        r.assume("method", "full", "adapter not set: full fine-tuning")
        return
    if adapter not in ("lora", "qlora"):
        raise UserError(f"{r.path}: adapter: {adapter!r} is not an adapter memplan models; it models lora and "
                        "qlora (or no adapter: full fine-tuning)")
    if adapter == "qlora" or four:
        r.take("method", "qlora", "adapter" + (" + load_in_4bit" * four))
    else:  # axolotl's load_in_8bit: BitsAndBytesConfig(load_in_8bit=True) under a LoRA adapter
        r.take("method", "lora-8bit" if eight else "lora", "adapter" + (" + load_in_8bit" * eight))
    if r.has("lora_r"):
        r.take("lora.rank", int(r.get("lora_r")), "lora_r")
    if r.has("lora_alpha"):
        r.take("lora.alpha", float(r.get("lora_alpha")), "lora_alpha")
    if r.has("lora_dropout"):
        r.take("lora.dropout", float(r.get("lora_dropout")), "lora_dropout")
    else:
        r.assume("lora.dropout", 0.0, f"lora_dropout not set; {SCHEMA}")
    if r.get("lora_target_linear"):
        r.take("lora.targets", "all-linear", "lora_target_linear")
        r.seen.add("lora_target_modules")
    else:
        lora.targets(r, r.get("lora_target_modules"), "lora_target_modules")
    lora.modules_to_save(r, "lora_modules_to_save")


def _batch(r: Reading) -> dict[str, Any]:
    """micro_batch_size is per GPU; gradient_accumulation_steps, else batch_size // micro_batch_size."""
    micro = int(r.get("micro_batch_size", 1))
    given = r.has("micro_batch_size")
    (r.take if given else r.assume)("micro_batch", micro, "micro_batch_size" if given else
                                    f"micro_batch_size not set; {SCHEMA}")
    if r.has("gradient_accumulation_steps"):
        accum, key = int(r.get("gradient_accumulation_steps")), "gradient_accumulation_steps"
        r.take("grad_accum", accum, key)
        r.ignore("batch_size")
    elif r.has("batch_size"):
        accum, key = int(r.get("batch_size")) // micro, "batch_size // micro_batch_size"
        r.take("grad_accum", max(accum, 1), key)
    else:
        accum, key = 1, "gradient_accumulation_steps"
        r.assume("grad_accum", 1, f"gradient_accumulation_steps not set; {SCHEMA}")
    return {"micro_batch": micro, "micro_batch_key": "micro_batch_size", "grad_accum": accum, "grad_accum_key": key}


def _schedule(r: Reading) -> None:
    for key, path, default, kind in (("num_epochs", "hparams.epochs", 1.0, float),
                                     ("weight_decay", "hparams.weight_decay", 0.0, float)):
        if r.has(key):
            r.take(path, kind(r.get(key)), key)
        else:
            r.assume(path, default, f"{key} not set; {SCHEMA}")
    if r.has("learning_rate"):
        r.take("hparams.lr", float(r.get("learning_rate")), "learning_rate")
    if r.has("max_steps"):
        r.take("hparams.max_steps", int(r.get("max_steps")), "max_steps")
    hf.scheduler(r, r.get("lr_scheduler", "cosine"), "lr_scheduler")
    if r.has("warmup_steps"):
        r.take("hparams.warmup_steps", int(r.get("warmup_steps")), "warmup_steps")
    elif r.has("warmup_ratio"):
        r.take("hparams.warmup_ratio", float(r.get("warmup_ratio")), "warmup_ratio")
    name = r.get("optimizer", "adamw_torch_fused")
    hf.optimizer(r, name, "optimizer", None if r.has("optimizer") else SCHEMA)


def _attention(r: Reading) -> None:
    """attn_implementation, or the older booleans flash_attention / sdp_attention / eager_attention."""
    if r.has("attn_implementation"):
        hf.attention(r, r.get("attn_implementation"), "attn_implementation")
        return
    for key, name in (("flash_attention", "flash"), ("sdp_attention", "sdpa"), ("eager_attention", "eager")):
        if r.get(key):
            r.take("attn", name, key)
            return
    if r.get("flex_attention"):
        r.take("attn", "sdpa", "flex_attention")
        r.unmodelled("flex_attention", True, "flex attention: counted as sdpa's")
        return
    r.assume("attn", "sdpa", "attn_implementation not set; transformers picks sdpa where torch has it")


#: axolotl's Liger flags -> apply_liger_kernel_to_<type>'s arguments (src/axolotl/integrations/liger/plugin.py)
LIGER_FLAGS = {"liger_rope": "rope", "liger_rms_norm": "rms_norm", "liger_glu_activation": "swiglu",
               "liger_cross_entropy": "cross_entropy", "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy"}
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"


def _liger(r: Reading) -> None:
    """The LigerPlugin in `plugins` applies the Liger kernels its flags name (without it they do nothing); the other
    plugins stay not modelled."""
    plugins = r.get("plugins", [])
    plugins = [plugins] if isinstance(plugins, str) else list(plugins)
    flags = [k for k in LIGER_FLAGS if r.has(k)]
    if LIGER_PLUGIN in plugins:
        liger.take(r, {LIGER_FLAGS[k]: r.get(k) for k in flags}, " + ".join(["plugins", *flags]))
    others = [p for p in plugins if p != LIGER_PLUGIN]
    if others:
        r.unmodelled("plugins", others, "plugins that replace kernels (Cut Cross Entropy: no full logits)")
    for key in ("liger_layer_norm", "liger_rms_norm_gated"):
        if r.get(key):
            r.unmodelled(key, r.get(key), "a Liger kernel of other model types (LayerNorm, gated RMSNorm)")


def _checkpointing(r: Reading) -> None:
    value = r.get("gradient_checkpointing", False)
    if r.has("gradient_checkpointing"):
        r.take("grad_ckpt", bool(value), "gradient_checkpointing")
    else:
        r.assume("grad_ckpt", False, f"gradient_checkpointing not set; {SCHEMA}")
    if value in ("offload", "offload_disk"):
        r.unmodelled("gradient_checkpointing", value, "checkpointed layer inputs offloaded to host memory or disk")
    hf.checkpoint_options(r, ("gradient_checkpointing_kwargs",))
    hf.unmodelled(r, {"gradient_checkpointing_kwargs": hf.UNMODELLED["gradient_checkpointing_kwargs"]})


def _half(r: Reading) -> tuple[str, str, bool, bool]:
    """The weights' dtype, as resolve_dtype decides it, with the keys; bf16 and fp16 for DeepSpeed's auto."""
    bf16, fp16 = r.get("bf16", False), r.get("fp16", False)
    if bf16 == "auto":
        bf16, fp16 = not fp16, bool(fp16)
        key = "bf16: auto (true on GPUs with bf16)"
    else:
        bf16, fp16 = bool(bf16 or r.get("bfloat16")), bool(fp16 or r.get("float16"))
        key = "bf16" if r.has("bf16") else "bf16 not set"
        r.ignore("bfloat16", "float16", "float32")
    if bf16:
        return "bfloat16", key, True, False
    if fp16 or r.get("load_in_8bit"):
        return "float16", key + " / fp16" + (" / load_in_8bit" if not fp16 else ""), False, bool(fp16)
    return "float32", key, False, False


def read(data: dict[str, Any], path: str, launcher: str | None = None) -> ConfigSource:
    """`launcher`: the accelerate config that launches it, if any (memplan.trainers.accelerate)."""
    r = Reading("axolotl", path, data)
    r.launcher = launcher
    r.take("model", str(r.get("base_model")), "base_model")
    _method(r)
    if r.has("sequence_len"):
        r.take("seq_len", int(r.get("sequence_len")), "sequence_len")
    else:
        r.assume("seq_len", 512, f"sequence_len not set; {SCHEMA}")
    args = _batch(r)
    _schedule(r)
    _attention(r)
    if r.get("sample_packing"):
        r.take("data.packing", True, "sample_packing")
        if r.plan.get("attn") == "flash":
            r.count("sample_packing", True, "multipack rows of sequence_len with per-sequence position ids: "
                                            "flash-attention runs varlen over them, keeping what unpacked full rows "
                                            "keep")
        else:
            r.unmodelled("sample_packing", True, "multipack rows with axolotl's own block-diagonal attention mask "
                                                 "for this attention (memplan counts transformers' packed-row mask)")
    _checkpointing(r)
    weights, key, bf16, fp16 = _half(r)
    args.update(bf16=bf16, fp16=fp16, half_key=key, autocast="bf16" if bf16 else "fp16" if fp16 else None)
    hf.parallel(r, args, weights, "the weights' dtype (resolve_dtype)")
    datasets = r.data.get("datasets")
    if isinstance(datasets, list) and datasets and isinstance(datasets[0], dict):
        lora.local_data(r, datasets[0].get("path"), "datasets")
    _liger(r)
    hf.unmodelled(r, UNMODELLED)
    return r.finish(QUIET)


# ---------------------------------------------------------------- writing (memplan.trainers.emit)

CONFIG = "axolotl.yaml"
#: memplan's JSONL shapes -> axolotl's dataset types (docs/dataset-formats: alpaca; chat_template with
#: field_messages and the tokenizer's own template; completion with field).
DATASET_TYPES = {"alpaca": {"type": "alpaca"}, "chat": {"type": "chat_template", "field_messages": "messages"},
                 "text": {"type": "completion", "field": "text"}}


def nearest(plan: Plan, ctx: Context) -> Nearest:
    """axolotl loads the weights in the dtype it trains (resolve_dtype: bf16 / fp16 / fp32): no autocast over
    fp32 weights; no chunked loss without a plugin; FSDP2 has no NO_SHARD."""
    from memplan.trainers.emit import without_autocast

    n = Nearest(plan)
    hf.nearest_optimizer(n)
    without_autocast(n, "axolotl", "bf16: true loads bfloat16, fp16: true float16, neither float32; "
                                   "src/axolotl/utils/config resolve_dtype")
    if plan.loss == "chunked":
        n.change("loss", "standard", "loss chunked -> standard: axolotl computes the full logits unless a plugin "
                                     "replaces the loss (Liger's fused linear cross-entropy: --liger)")
    if plan.sharding == "fsdp" and plan.zero == 0:
        n.change("zero", 2, "FSDP NO_SHARD -> SHARD_GRAD_OP (ZeRO-2): axolotl's FSDP2 shards or reshards, it has "
                            "no NO_SHARD")
    if plan.offload_activations:
        n.change("offload_activations", False, "activation offloading -> off: axolotl's activation_offloading modes "
                                               "(legacy, disk, hidden_states) move activations their own ways, which "
                                               "memplan does not model")
    return n


def emit(plan: Plan, ctx: Context) -> Emitted:
    """axolotl.yaml for `axolotl train` (keys: src/axolotl/utils/schemas/config.py, training.py, peft.py,
    fsdp.py)."""
    from memplan.trainers.emit import hub_id, number, yaml_text

    h, notes = plan.hparams, []
    data: dict[str, Any] = {"base_model": hub_id(plan)}
    if plan.trains_adapters:
        lo = plan.lora
        data["adapter"] = "qlora" if plan.method == "qlora" else "lora"
        if plan.method == "qlora":
            data["load_in_4bit"] = True
        elif plan.method == "lora-8bit":
            data["load_in_8bit"] = True  # axolotl's LoRA on a bitsandbytes LLM.int8 base
        data.update(lora_r=lo.rank, lora_alpha=number(lo.alpha), lora_dropout=lo.dropout)
        if lo.targets == "all-linear":
            data["lora_target_linear"] = True
        else:
            data["lora_target_modules"] = list(lo.targets)
    if plan.data.train:
        kind = DATASET_TYPES.get(ctx.data_format or "", DATASET_TYPES["alpaca"])
        data["datasets"] = [{"path": plan.data.train, "ds_type": "json", **kind}]
        if not ctx.data_format:
            notes.append("the data's shape is not known: `type: alpaca` is written; use chat_template "
                         "(field_messages: messages) or completion (field: text) for other shapes")
    else:
        notes.append(f"no training file in the plan: add `datasets: [{{path: FILE.jsonl, ds_type: json, type: "
                     f"...}}]` to {CONFIG}")
    data.update(val_set_size=plan.data.val_ratio, dataset_prepared_path="output/axolotl/prepared",
                output_dir="output/axolotl", sequence_len=plan.seq_len, sample_packing=plan.data.packing,
                micro_batch_size=plan.micro_batch, gradient_accumulation_steps=plan.grad_accum)
    data.update(_emit_schedule(plan, notes))
    fp16 = ctx.plan.precision == "amp-fp16" and plan.precision == "bf16"
    if plan.sharding == "deepspeed":
        bf16 = plan.regime.deepspeed_bf16
    else:
        bf16 = plan.precision == "bf16" and not fp16
    data.update(bf16=bf16, fp16=fp16, gradient_checkpointing=plan.grad_ckpt)
    if plan.grad_ckpt:
        data["gradient_checkpointing_kwargs"] = {"use_reentrant": plan.ckpt_reentrant}
    data["attn_implementation"] = hf.ATTENTION_NAMES[plan.attn]
    data.update(_emit_kernels_and_sharding(plan, ctx))
    data.update(hf.ddp_arguments(plan))
    data.update(logging_steps=h.log_every, eval_steps=h.eval_every, save_steps=h.save_every or h.eval_every,
                save_total_limit=h.save_total_limit)
    if plan.device == "cpu":
        notes.append("axolotl trains on GPUs; this CPU plan's file is written as the same settings")
    launch = _emit_launch(plan, notes)
    precision = ("fp16: true (float16 weights, no fp32 copy)" if fp16 else PRECISION_NOTES[plan.precision])
    header = [f"axolotl: {launch}", "(run from this directory; written by memplan recommend --emit axolotl)",
              f"precision {plan.precision}: {precision}",
              "keys: src/axolotl/utils/schemas (config.py, training.py, peft.py, fsdp.py)"]
    return Emitted("axolotl", {CONFIG: yaml_text(data, header)}, CONFIG, [launch], plan, notes=notes)


def _emit_kernels_and_sharding(plan: Plan, ctx: Context) -> dict[str, Any]:
    """The LigerPlugin and its flags; the DeepSpeed file, or FSDP2's settings."""
    data: dict[str, Any] = {}
    if plan.liger:
        data["plugins"] = [LIGER_PLUGIN]
        data.update({flag: kernel in plan.liger for flag, kernel in LIGER_FLAGS.items() if kernel != "cross_entropy"})
    if plan.sharding == "deepspeed":
        data["deepspeed"] = DS_CONFIG_NAME
    elif plan.sharding == "fsdp":
        data["fsdp_version"] = 2
        data["fsdp_config"] = {"offload_params": plan.offload == "optimizer+params",
                               "reshard_after_forward": plan.zero == 3, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                               "transformer_layer_cls_to_wrap": ctx.spec.traits.decoder_layer,
                               "state_dict_type": "SHARDED_STATE_DICT"}
        data.update(hf.accelerator_config(plan))  # schemas/config.py accelerator_config -> AcceleratorConfig
    return data


def _emit_schedule(plan: Plan, notes: list[str]) -> dict[str, Any]:
    """Epochs or max_steps, the optimizer, the learning-rate schedule and its warmup (schemas/training.py)."""
    from memplan.trainers.emit import number

    h, data = plan.hparams, {}
    if h.max_steps:
        data["max_steps"] = h.max_steps
    else:
        data["num_epochs"] = number(h.epochs)
    optimizer = hf.OPTIMIZER_NAMES[plan.optimizer]
    if plan.sharding == "fsdp" and plan.optimizer == "adamw-8bit":
        optimizer = "adamw_torch_8bit"
        notes.append("axolotl refuses bitsandbytes' 8-bit AdamW under FSDP2 (its check_fsdp2_w_8bit_optimizer): "
                     "torchao's 8-bit AdamW (adamw_torch_8bit) is written, which memplan counts as bitsandbytes' "
                     "(one byte per state; torchao's block scales are not counted)")
    data.update(optimizer=optimizer,
                lr_scheduler={"constant": "constant_with_warmup"}.get(h.lr_scheduler, h.lr_scheduler),
                learning_rate=h.effective_lr(plan.method))
    if h.warmup_steps is not None:
        data["warmup_steps"] = h.warmup_steps
    else:
        data["warmup_ratio"] = h.warmup_ratio
    data.update(weight_decay=h.weight_decay, max_grad_norm=h.max_grad_norm, seed=h.seed)
    return data


def _emit_launch(plan: Plan, notes: list[str]) -> str:
    """`axolotl train`, through accelerate launch on several GPUs (src/axolotl/cli/main.py --launcher)."""
    launch = f"{hf.alloc_env(plan)}axolotl train {CONFIG}"
    if plan.world_size > 1:
        launch += f" --launcher accelerate -- --num_processes {plan.world_size} --num_machines {plan.nodes}"
        if plan.nodes > 1:
            launch += " --machine_rank 0 --main_process_ip MACHINE0_ADDRESS --main_process_port 29500"
            notes.append("multi-node: replace MACHINE0_ADDRESS with machine 0's address, and run with "
                         "--machine_rank K on machine K")
    return launch


#: How each precision regime axolotl runs is written in its keys (resolve_dtype).
PRECISION_NOTES = {
    "fp32": "bf16: false, fp16: false (float32 weights, no autocast)",
    "bf16": "bf16: true (axolotl loads the weights in bfloat16 and trains them so: no fp32 copy)",
    "bf16-master": "DeepSpeed's bf16 engine (ds_config.json bf16.enabled, bf16: true): bf16 weights with fp32 "
                   "masters and states",
}
