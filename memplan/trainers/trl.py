"""TRL's `trl sft --config` file (YAML or JSON): transformers' TrainingArguments, TRL's SFTConfig and its
ModelConfig (model, dtype, LoRA, 4/8-bit) in one mapping; alignment-handbook recipes are such files.

Sources (huggingface/trl f2cd577, 2026-07): trl/trainer/sft_config.py (max_length 1024, packing false,
loss_type "chunked_nll" unless use_liger_kernel, learning_rate 2e-5), trl/trainer/base_config.py
(gradient_checkpointing true, bf16 true unless fp16), trl/trainer/model_config.py (dtype "float32", lora_r 16,
lora_alpha 32, lora_dropout 0.05, lora_target_modules None), trl/scripts/sft.py (the model is loaded in
`dtype`; load_in_4bit builds a bitsandbytes NF4 config with compute dtype `dtype`).

Precision: TRL loads the weights in `dtype` (default float32) and the Trainer's bf16=True autocasts the forward
without casting the weights, so the defaults are amp-bf16; `dtype: bfloat16` (or the older `torch_dtype`)
with bf16=True trains bf16 weights with no fp32 copy = bf16. Under DeepSpeed its bf16 engine decides
(bf16-master).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan.errors import UserError
from memplan.train.deepspeed_setup import DS_CONFIG_NAME
from memplan.trainers import hf, liger, lora
from memplan.trainers.emit import Context, Emitted, Nearest
from memplan.trainers.source import ConfigSource, Reading

if TYPE_CHECKING:
    from memplan.plan import Plan

SFT_CONFIG = "TRL's SFTConfig default (trl/trainer/sft_config.py)"
MODEL_CONFIG = "TRL's ModelConfig default (trl/trainer/model_config.py)"

UNMODELLED = {
    "use_dora": "DoRA's magnitude vectors and the extra activations of its weight norm",
    "lora_target_parameters": "LoRA on parameters (MoE experts) rather than modules",
}
QUIET = {"model_revision", "trust_remote_code", "dataset_config", "dataset_train_split", "dataset_test_split",
         "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "dataset_mixture", "dataset_streaming",
         "chat_template", "chat_template_path", "eos_token", "pad_token", "completion_only_loss",
         "assistant_only_loss", "truncation_mode", "shuffle_dataset", "eval_packing",
         "lora_task_type", "use_rslora", "bnb_4bit_quant_type", "use_bnb_nested_quant", "router_aux_loss_coef",
         "pad_to_multiple_of", "gradient_checkpointing_use_reentrant", "ignore_bias_buffers",
         "dataset_name", "model_name_or_path", "torch_dtype", "dtype", "lora_r", "lora_alpha", "lora_dropout",
         "datasets", "streaming", "test_split_size", "env"}


def _weights_dtype(r: Reading) -> tuple[str, str]:
    for key in ("dtype", "torch_dtype"):
        if r.has(key):
            return str(r.get(key)), key
    init = r.get("model_init_kwargs")
    if isinstance(init, dict) and (init.get("dtype") or init.get("torch_dtype")):
        return str(init.get("dtype") or init.get("torch_dtype")), "model_init_kwargs.dtype"
    return "float32", f"dtype not set ({MODEL_CONFIG}: float32)"


def _method(r: Reading) -> None:
    four, eight = bool(r.get("load_in_4bit", False)), bool(r.get("load_in_8bit", False))
    if not r.get("use_peft", False):
        if four or eight:
            raise UserError(f"{r.path}: load_in_{4 if four else 8}bit without use_peft: TRL trains a quantized "
                            "base only through adapters. Hint: add use_peft: true")
        r.assume("method", "full", f"use_peft not set; {MODEL_CONFIG}, false")
        return
    # TRL's get_quantization_config: BitsAndBytesConfig(load_in_4bit=True, nf4...) or (load_in_8bit=True)
    method, keys = ("qlora", "use_peft + load_in_4bit") if four else ("lora-8bit", "use_peft + load_in_8bit") if eight \
        else ("lora", "use_peft")
    r.take("method", method, keys)
    for key, path, default in (("lora_r", "lora.rank", 16), ("lora_alpha", "lora.alpha", 32.0),
                               ("lora_dropout", "lora.dropout", 0.05)):
        if r.has(key):
            r.take(path, type(default)(r.get(key)), key)
        else:
            r.assume(path, default, f"{key} not set; {MODEL_CONFIG}")
    lora.targets(r, r.get("lora_target_modules"), "lora_target_modules")
    lora.modules_to_save(r, "lora_modules_to_save")


def _sequence(r: Reading) -> None:
    """max_length (older TRL: max_seq_length); loss_type; packing."""
    key = "max_length" if r.has("max_length") else "max_seq_length"
    if r.has(key):
        r.take("seq_len", int(r.get(key)), key)
    else:
        r.assume("seq_len", 1024, f"max_length not set; {SFT_CONFIG}")
    _packing(r)
    loss = r.get("loss_type")
    if loss is not None:
        r.take("loss", "chunked" if loss == "chunked_nll" else "standard", "loss_type")
    elif r.get("use_liger_kernel"):
        r.assume("loss", "standard", "loss_type not set; with use_liger_kernel TRL's default is nll, which Liger's "
                                     "fused linear cross-entropy computes (trl/trainer/sft_config.py)")
    else:
        r.assume("loss", "chunked", f"loss_type not set; {SFT_CONFIG}, chunked_nll (no full logits)")


def _packing(r: Reading) -> None:
    """packing: best-fit decreasing (packing_strategy "bfd", the default; "bfd_split") packs sequences into rows of
    max_length with their position ids and runs them padding-free; "wrapped" cuts the concatenated text into rows
    (no position ids: plain causal rows); TRL before 0.21 named best-fit "ffd". padding_free: the micro-batch's
    sequences in one row
    (sft_trainer.py: self.padding_free = args.padding_free or (args.packing and strategy in {bfd, bfd_split});
    DataCollatorForLanguageModeling concatenates input_ids, labels and position_ids)."""
    packing = bool(r.get("packing", False))
    strategy = str(r.get("packing_strategy", "bfd"))
    if r.has("packing"):
        r.take("data.packing", packing and strategy != "wrapped", "packing" + (" + packing_strategy" if
                                                                               r.has("packing_strategy") else ""))
    if packing and strategy == "wrapped":
        r.count("packing_strategy", strategy, "wrapped rows of max_length, causal across examples: every row at "
                                              "seq_len, as memplan counts")
    padding_free = bool(r.get("padding_free", False)) or (packing and strategy in ("bfd", "bfd_split", "ffd"))
    if padding_free:
        r.take("data.padding_free", True, "padding_free" if r.get("padding_free") else
               f"packing (packing_strategy {strategy}: padding-free)")
    elif r.has("padding_free"):
        r.ignore("padding_free")


def read(data: dict[str, Any], path: str, launcher: str | None = None) -> ConfigSource:
    """`launcher`: the accelerate config that launches it (--accelerate-config), else the file's own
    `accelerate_config`: TRL's parser hands keys it does not take to `accelerate launch` (trl/scripts/utils.py
    TrlParser.set_defaults_with_config, trl/cli/commands/training.py), where `--accelerate_config` names a file or
    one of TRL's configs (trl/cli/accelerate_config.py)."""
    from memplan.trainers.accelerate import locate

    r = Reading("trl", path, data)
    if r.has("accelerate_config"):
        named = str(r.get("accelerate_config"))
        if launcher is not None and Path(launcher).resolve() != locate(named, path, "accelerate_config").resolve():
            raise UserError(f"{path} names the accelerate config {named} and --accelerate-config gives {launcher}; "
                            "a run is launched with one. Hint: drop one of them")
        launcher = launcher or str(locate(named, path, "accelerate_config"))
    r.launcher = launcher
    if r.has("model_name_or_path"):
        r.take("model", str(r.get("model_name_or_path")), "model_name_or_path")
    _method(r)
    _sequence(r)
    defaults = {"learning_rate": (2e-5, SFT_CONFIG), "gradient_checkpointing": (True, "TRL's default (trl/trainer/"
                                                                                       "base_config.py)"),
                "bf16": (not data.get("fp16"), "TRL's default: true unless fp16 (trl/trainer/base_config.py)")}
    args = hf.training_arguments(r, defaults)
    if r.has("attn_implementation"):
        hf.attention(r, r.get("attn_implementation"), "attn_implementation")
    else:
        r.assume("attn", "sdpa", "attn_implementation not set; transformers picks sdpa where torch has it")
    weights, weights_key = _weights_dtype(r)
    if weights == "auto":
        weights = "bfloat16"
        r.unmodelled("dtype", "auto", "the checkpoint's own dtype: counted as bfloat16, what most Hub "
                                      "checkpoints store")
    hf.parallel(r, args, weights, weights_key)
    mixture = r.data.get("datasets")  # trl's DatasetMixtureConfig: a list of load_dataset arguments
    if isinstance(mixture, list) and mixture and isinstance(mixture[0], dict):
        lora.local_data(r, mixture[0].get("data_files"), "datasets")
    else:
        lora.local_data(r, r.get("dataset_name"), "dataset_name")
    _allocator(r)
    _quant_storage(r)
    hf.unmodelled(r, UNMODELLED)
    return r.finish(hf.QUIET | QUIET)


def _quant_storage(r: Reading) -> None:
    """bnb_4bit_quant_storage under FSDP: accelerate shards 4-bit weights stored in a floating dtype and leaves
    uint8 ones (bitsandbytes' default) whole on every GPU (fsdp_utils.fsdp2_prepare_model); the estimate counts them
    sharded. Elsewhere the storage dtype changes no byte."""
    key = "bnb_4bit_quant_storage"
    storage = str(r.get(key, "uint8")).removeprefix("torch.")
    if r.plan.get("method") != "qlora" or r.plan.get("sharding") != "fsdp":
        r.ignore(key)
    elif storage in ("bfloat16", "float16", "float32"):
        r.count(key, storage, "a floating storage: FSDP shards the 4-bit weights")
    else:
        r.unmodelled(key, storage, "accelerate leaves uint8 4-bit weights out of FSDP's sharding: every GPU holds "
                                   "the whole quantized base (the estimate shards it); set bfloat16")


def _allocator(r: Reading) -> None:
    """`env:` (environment variables TrlParser sets before anything loads): PYTORCH_CUDA_ALLOC_CONF's
    expandable_segments is the plan's allocator."""
    env = r.data.get("env")
    conf = str(env.get("PYTORCH_CUDA_ALLOC_CONF", "")) if isinstance(env, dict) else ""
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        r.take("allocator", "expandable", "env.PYTORCH_CUDA_ALLOC_CONF")


# ---------------------------------------------------------------- writing (memplan.trainers.emit)

CONFIG = "trl_sft.yaml"
#: The Plan's loss -> SFTConfig.loss_type (trl/trainer/sft_config.py).
LOSS_TYPES = {"standard": "nll", "chunked": "chunked_nll"}


def nearest(plan: Plan, ctx: Context) -> Nearest:
    """TRL runs every method, attention, loss, FSDP and DeepSpeed plan; not bf16 masters outside DeepSpeed,
    nor torch's for-loop AdamW."""
    n = Nearest(plan)
    hf.nearest_optimizer(n)
    hf.nearest_precision(n)
    if plan.data.packing and not plan.data.padding_free:
        n.change("data.padding_free", True, "packed rows -> padding-free: TRL packs best-fit decreasing with position "
                                            "ids and runs each micro-batch's rows as one row (packing_strategy bfd)")
    return n


def _dtype(plan: Plan) -> str:
    """ModelConfig.dtype: the weights' dtype (amp-*: float32 weights, autocast by bf16 / fp16: true)."""
    return plan.regime.weights


def emit(plan: Plan, ctx: Context) -> Emitted:
    """trl_sft.yaml: ScriptArguments, SFTConfig, ModelConfig and DatasetMixtureConfig in one file, as
    `trl sft --config` reads it (trl/scripts/sft.py make_parser)."""
    from memplan.trainers.emit import hub_id, number, yaml_text

    data: dict[str, Any] = {"model_name_or_path": hub_id(plan), "dtype": _dtype(plan),
                            "attn_implementation": hf.ATTENTION_NAMES[plan.attn]}
    if plan.trains_adapters:
        lo = plan.lora
        data.update(use_peft=True, lora_r=lo.rank, lora_alpha=number(lo.alpha), lora_dropout=lo.dropout,
                    lora_target_modules=lo.targets)
        if plan.method == "qlora":
            data.update(load_in_4bit=True, bnb_4bit_quant_type="nf4")
            if plan.fully_shards:  # floating storage: FSDP2 shards it (hf.py)
                data["bnb_4bit_quant_storage"] = plan.regime.compute
        elif plan.method == "lora-8bit":
            data["load_in_8bit"] = True  # ModelConfig.load_in_8bit: BitsAndBytesConfig(load_in_8bit=True)
    notes = []
    data.update(liger.transformers_arguments(plan))
    if plan.offload_activations:
        data["activation_offloading"] = True  # SFTConfig: trl/models/activation_offloading.py
    if plan.data.train:
        data["datasets"] = [{"path": "json", "data_files": plan.data.train, "split": "train"}]
        if plan.data.val_ratio > 0:
            data.update(test_split_size=plan.data.val_ratio, eval_strategy="steps",
                        eval_steps=plan.hparams.eval_every)
        if plan.data.validation:
            notes.append(f"TRL's dataset mixture concatenates its files: the validation file {plan.data.validation} "
                         f"is not used; {plan.data.val_ratio:g} of the training file is held out instead")
    else:
        notes.append(f"no training file in the plan: add `datasets: [{{path: json, data_files: FILE.jsonl, split: "
                     f"train}}]` to {CONFIG}")
    if ctx.data_format == "alpaca":
        notes.append("TRL's SFTTrainer reads messages, prompt/completion or text records, not alpaca's "
                     "instruction/input/output: convert each record to {\"messages\": [user: instruction + input, "
                     "assistant: output]} (as memplan renders it) before training")
    elif ctx.data_format == "chat":
        notes.append("TRL computes the loss on every token of a messages record unless assistant_only_loss: true "
                     "(which needs a chat template with generation markers); memplan trains on the assistant turns")
    data.update(max_length=plan.seq_len, packing=plan.data.packing, loss_type=LOSS_TYPES[plan.loss])
    if plan.data.padding_free and not plan.data.packing:
        data["padding_free"] = True
    data.update(hf.training_arguments_for(plan))
    data.update(hf.fsdp_arguments(plan, ctx.spec))
    if plan.sharding == "deepspeed":
        data["deepspeed"] = DS_CONFIG_NAME
    data.update(output_dir="output/trl", logging_steps=plan.hparams.log_every,
                save_steps=plan.hparams.save_every or plan.hparams.eval_every,
                save_total_limit=plan.hparams.save_total_limit)
    if plan.allocator == "expandable":
        data["env"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    header = [f"TRL: {hf.alloc_env(plan)}trl sft --config {CONFIG} --accelerate_config accelerate_config.yaml",
              "(run from this directory; written by memplan recommend --emit trl)",
              f"precision {plan.precision}: {PRECISION_NOTES[plan.precision]}",
              "keys: trl/trainer/sft_config.py (SFTConfig), model_config.py (ModelConfig), trl/scripts/utils.py "
              "(DatasetMixtureConfig), transformers training_args.py (TrainingArguments)"]
    launch = [f"{hf.alloc_env(plan)}trl sft --config {CONFIG} --accelerate_config accelerate_config.yaml"]
    if plan.nodes > 1:
        notes.append("on machine K > 0, set machine_rank: K in accelerate_config.yaml first (as for memplan train)")
    return Emitted("trl", {CONFIG: yaml_text(data, header)}, CONFIG, launch, plan, notes=notes)


#: How each precision regime is written in TRL's keys.
PRECISION_NOTES = {
    "fp32": "dtype float32, bf16: false (no autocast)",
    "amp-bf16": "dtype float32 weights + bf16: true (the Trainer autocasts the forward to bf16; weights, "
                "gradients and AdamW states stay fp32)",
    "amp-fp16": "dtype float32 weights + fp16: true (autocast to fp16 with loss scaling)",
    "bf16": "dtype bfloat16 + bf16: true (weights, gradients and states in bf16, no fp32 copy)",
    "bf16-master": "DeepSpeed's bf16 engine (ds_config.json bf16.enabled, bf16: true): bf16 weights with fp32 "
                   "masters and states",
}
