"""torchtune's recipe YAML (`tune run RECIPE --config FILE`): sections instantiated from `_component_`.

Sources (pytorch/torchtune bd2a0fc, 2026-04): recipes/lora_finetune_single_device.py and
full_finetune_distributed.py (each rank's DataLoader takes `batch_size`, so it is per device; the distributed
recipes shard the model with FSDP2 fully_shard, resharding after the forward unless
fsdp_reshard_after_forward is false, and offload it with fsdp_cpu_offload; `dtype` is the dtype of the
weights, gradients and optimizer states: bf16 trains in bf16 with no fp32 copy), torchtune/models/*/
_model_builders.py (lora_* builders: lora_dropout 0.0; qlora_* builders: the base quantized to NF4),
torchtune/modules/loss (LinearCrossEntropyLoss and CEWithChunkedOutputLoss: no full fp32 logits).

Which recipe runs is not in the file's settings but in its header comment (`tune run --nproc_per_node 4
full_finetune_distributed --config ...`), which memplan reads for the recipe and the number of processes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan.files import read_text
from memplan.trainers import lora
from memplan.trainers.emit import Context, Emitted, Nearest
from memplan.trainers.source import ConfigSource, Reading

if TYPE_CHECKING:
    from memplan.plan import Plan

RECIPES = "torchtune's recipes (recipes/*.py)"
#: torchtune module names -> the Hugging Face names memplan's models use (torchtune/models/convert_weights.py).
LORA_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP_NAMES = ["gate_proj", "down_proj", "up_proj"]  # w1, w2, w3
OPTIMIZERS = {"torch.optim.AdamW": "adamw", "torch.optim.Adam": "adamw", "torch.optim.SGD": "sgd",
              "bitsandbytes.optim.PagedAdamW8bit": "paged-adamw-8bit", "bitsandbytes.optim.AdamW8bit": "adamw-8bit",
              "bitsandbytes.optim.PagedAdamW": "adamw", "torchao.optim.AdamW8bit": "adamw-8bit",
              "torch.optim.Adafactor": "adafactor"}
CHUNKED_LOSSES = ("LinearCrossEntropyLoss", "CEWithChunkedOutputLoss", "ChunkedCrossEntropyLoss")

UNMODELLED = {
    "optimizer_in_bwd": "the optimizer steps in the backward, freeing each gradient as it goes",
    "compile": "torch.compile fuses kernels and changes which activations are kept",
    "custom_sharded_layers": "embeddings and output sharded as their own FSDP units",
    "low_cpu_ram": "host RAM while loading and saving (a single device recipe's low-RAM mode)",
}
QUIET = {"output_dir", "tokenizer", "checkpointer", "resume_from_checkpoint", "save_adapter_weights_only", "seed",
         "shuffle", "metric_logger", "log_every_n_steps", "log_peak_memory_stats", "log_level", "profiler",
         "run_val_every_n_steps", "dataset_val", "batch_size_val", "clip_grad_norm", "max_steps_per_epoch",
         "dataset", "model", "optimizer", "lr_scheduler", "loss", "dtype", "device", "epochs", "batch_size",
         "gradient_accumulation_steps", "enable_activation_checkpointing", "fsdp_cpu_offload",
         "fsdp_reshard_after_forward", "tensor_parallel_dim", "tensor_parallel_plan", "data_parallel_shard_dim",
         "data_parallel_replicate_dim", "cudnn_deterministic_mode", "save_last_epoch_only", "keep_last_n_checkpoints"}


def _component(section: Any) -> str:
    return str(section.get("_component_", "")) if isinstance(section, dict) else ""


def _preset(builder: str) -> str | None:
    """The memplan preset of a torchtune model builder (llama3_1_8b -> llama-3.1-8b, qwen2_5_7b_base ->
    qwen2.5-7b), if there is one."""
    from memplan.catalog.presets import name_index

    name = re.sub(r"^(q?lora_)", "", builder)
    for preset, (_, known, _, _) in BUILDERS.items():  # the builders memplan writes
        if name in (known, known.replace("_base", "_instruct")):
            return preset
    name = re.sub(r"_(base|instruct)$", "", name)
    m = re.fullmatch(r"([a-z]+)(\d*)(?:_(\d+))?_(\w+)", name)
    if not m:
        return None
    fam, major, minor, size = m.groups()
    version = f"{major}.{minor}" if minor else major
    index = name_index()
    for candidate in (f"{fam}-{version}-{size}", f"{fam}{version}-{size}", f"{fam}-{size}"):
        if candidate in index:
            return index[candidate]
    return None


def _model(r: Reading) -> str:
    """The model: the checkpoint directory's config.json when it is on this machine, else the preset of the
    builder. Returns the builder's name."""
    builder = _component(r.data.get("model")).rsplit(".", 1)[-1]
    ckpt = r.data.get("checkpointer")
    directory = ckpt.get("checkpoint_dir") if isinstance(ckpt, dict) else None
    if directory and (Path(str(directory)) / "config.json").is_file():
        r.take("model", str(Path(str(directory)) / "config.json"), "checkpointer.checkpoint_dir")
    elif _preset(builder):
        r.take("model", _preset(builder), f"model._component_ ({builder})")
    else:
        r.unmodelled("model._component_", builder, "a model builder with no memplan preset, and no config.json "
                                                   "in checkpointer.checkpoint_dir here: pass --model")
    return builder


def _lora(r: Reading, builder: str) -> None:
    model = r.data.get("model") or {}
    if not builder.startswith(("lora_", "qlora_")):
        r.take("method", "full", "model._component_")
        return
    qlora = builder.startswith("qlora_") or bool(model.get("quantize_base"))
    r.take("method", "qlora" if qlora else "lora", "model._component_" + (" / quantize_base" * ("quantize_base"
                                                                                                 in model)))
    r.take("lora.rank", int(model.get("lora_rank", 8)), "model.lora_rank")
    r.take("lora.alpha", float(model.get("lora_alpha", 16)), "model.lora_alpha")
    if "lora_dropout" in model:
        r.take("lora.dropout", float(model["lora_dropout"]), "model.lora_dropout")
    else:
        r.assume("lora.dropout", 0.0, "model.lora_dropout not set; torchtune's builders default to 0.0")
    targets = [LORA_NAMES.get(str(m), str(m)) for m in model.get("lora_attn_modules") or []]
    if model.get("apply_lora_to_mlp"):
        targets += MLP_NAMES
    r.take("lora.targets", targets, "model.lora_attn_modules + apply_lora_to_mlp")
    if model.get("apply_lora_to_output"):
        r.unmodelled("model.apply_lora_to_output", True, "LoRA on the output projection (lm_head)")


def _recipe(r: Reading) -> None:
    """Single device or FSDP, from the header's `tune run` line, else from the FSDP keys."""
    text = read_text(r.path, "config file")
    run = re.search(r"tune run\s+(?:--nproc_per_node[= ](\d+)\s+)?([\w-]+)", text)
    distributed = bool(run and "distributed" in run.group(2)) or any(
        k in r.data for k in ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers"))
    where = f"the header's `tune run {run.group(2)}`" if run else "the fsdp_* keys"
    if not distributed:
        r.take("sharding", "ddp", where if run else "no fsdp_* keys: a single-device recipe")
        return
    r.take("sharding", "fsdp", f"{where}: FSDP2 fully_shard")
    reshard = r.data.get("fsdp_reshard_after_forward", True)
    r.take("zero", 3 if reshard else 2, "fsdp_reshard_after_forward" if "fsdp_reshard_after_forward" in r.data
           else f"{where}: resharding after the forward (the recipes' default)")
    offload = bool(r.data.get("fsdp_cpu_offload", False))
    r.take("offload", "optimizer+params" if offload else "none", "fsdp_cpu_offload")
    if run and run.group(1):
        r.take("gpus", int(run.group(1)), f"the header's `tune run --nproc_per_node {run.group(1)}`")


def _training(r: Reading) -> None:
    r.take("micro_batch", int(r.get("batch_size", 1)), "batch_size (per device)")
    accum = r.get("gradient_accumulation_steps")
    (r.take if accum else r.assume)("grad_accum", int(accum or 1), "gradient_accumulation_steps" if accum else
                                    "gradient_accumulation_steps not set: 1")
    r.take("hparams.epochs", float(r.get("epochs", 1)), "epochs")
    opt = r.get("optimizer") or {}
    name = _component(opt)
    kind = OPTIMIZERS.get(name, "adamw")
    switch = ""
    if kind == "adamw" and opt.get("fused"):
        kind, switch = "adamw-fused", " + fused"
    elif kind == "adamw" and opt.get("foreach") is False:
        kind, switch = "adamw-forloop", " + foreach: false"
    r.take("optimizer", kind, "optimizer._component_" + switch)
    if name not in OPTIMIZERS:
        r.unmodelled("optimizer._component_", name, "an optimizer memplan does not model: counted as AdamW")
    if "lr" in opt:
        r.take("hparams.lr", float(opt["lr"]), "optimizer.lr")
    if "weight_decay" in opt:
        r.take("hparams.weight_decay", float(opt["weight_decay"]), "optimizer.weight_decay")
    sched = r.get("lr_scheduler") or {}
    if "num_warmup_steps" in sched:
        r.take("hparams.warmup_steps", int(sched["num_warmup_steps"]), "lr_scheduler.num_warmup_steps")
    if "cosine" in _component(sched):
        r.take("hparams.lr_scheduler", "cosine", "lr_scheduler._component_")
    loss = _component(r.get("loss"))
    r.take("loss", "chunked" if loss.endswith(CHUNKED_LOSSES) else "standard", "loss._component_")


def _runtime(r: Reading) -> None:
    dtype = str(r.get("dtype", "bf16"))
    r.take("precision", "fp32" if dtype in ("fp32", "float32") else "bf16", "dtype (weights, gradients and "
                                                                            "optimizer states)")
    r.take("device", "cpu" if str(r.get("device", "cuda")) == "cpu" else "cuda", "device")
    ckpt = bool(r.get("enable_activation_checkpointing", False))
    (r.take if r.has("enable_activation_checkpointing") else r.assume)(
        "grad_ckpt", ckpt, "enable_activation_checkpointing" if r.has("enable_activation_checkpointing") else
        f"enable_activation_checkpointing not set; {RECIPES}: off")
    tok = r.data.get("tokenizer") or {}
    if tok.get("max_seq_len"):
        r.take("seq_len", int(tok["max_seq_len"]), "tokenizer.max_seq_len")
    else:
        r.assume("seq_len", 2048, "tokenizer.max_seq_len is null: torchtune does not truncate, sequences are as "
                                  "long as the data's; memplan's default: pass --seq-len")
    r.assume("attn", "sdpa", "torchtune's attention runs torch's scaled_dot_product_attention")
    data = r.data.get("dataset") or {}
    if isinstance(data, dict) and data.get("packed"):
        r.take("data.packing", True, "dataset.packed")
        r.unmodelled("dataset.packed", True, "packed rows with a block-diagonal mask (flex attention where "
                                             "available): memplan counts micro_batch x seq_len padded rows")
    if isinstance(data, dict) and isinstance(data.get("data_files"), str):
        lora.local_data(r, data["data_files"], "dataset")


def _offloading(r: Reading) -> None:
    """enable_activation_offloading: the recipes wrap the model's forward in training.get_act_offloading_ctx_manager
    (OffloadActivations, with streams unless activation_offloading_use_streams is false)."""
    if r.get("enable_activation_offloading"):
        r.take("offload_activations", True, "enable_activation_offloading")
        if not r.get("activation_offloading_use_streams", True):
            r.unmodelled("activation_offloading_use_streams", False, "offloading without a side stream keeps no "
                                                                     "forward stash: memplan counts the stream's")
    else:
        r.ignore("enable_activation_offloading", "activation_offloading_use_streams")


def read(data: dict[str, Any], path: str) -> ConfigSource:
    r = Reading("torchtune", path, data)
    builder = _model(r)
    _lora(r, builder)
    _recipe(r)
    if r.plan.get("sharding") != "fsdp":
        r.assume("gpus", 1, "a single-device recipe" if r.plan.get("sharding") == "ddp" else "")
    elif "gpus" not in r.plan:
        r.assume("gpus", 1, "the file does not say how many processes run: pass --gpus")
    _training(r)
    _runtime(r)
    _offloading(r)
    for key, why in UNMODELLED.items():
        if r.data.get(key):
            r.unmodelled(key, r.get(key), why)
    return r.finish(QUIET | set(UNMODELLED))


# ---------------------------------------------------------------- writing (memplan.trainers.emit)

CONFIG = "torchtune.yaml"
#: memplan preset -> torchtune's model package, builder (torchtune/models/<package>/_model_builders.py),
#: tokenizer package and checkpointer model_type. Only these models have builders; the reader maps a builder
#: back to its preset through the same table.
BUILDERS: dict[str, tuple[str, str, str, str]] = {
    **{f"llama-2-{s}": ("llama2", f"llama2_{s}", "llama2", "LLAMA2") for s in ("7b", "13b", "70b")},
    **{f"llama-3-{s}": ("llama3", f"llama3_{s}", "llama3", "LLAMA3") for s in ("8b", "70b")},
    **{f"llama-3.1-{s}": ("llama3_1", f"llama3_1_{s}", "llama3", "LLAMA3") for s in ("8b", "70b", "405b")},
    **{f"llama-3.2-{s}": ("llama3_2", f"llama3_2_{s}", "llama3", "LLAMA3_2") for s in ("1b", "3b")},
    "llama-3.3-70b": ("llama3_3", "llama3_3_70b", "llama3", "LLAMA3"),
    "mistral-7b": ("mistral", "mistral_7b", "mistral", "MISTRAL"),
    **{f"gemma-{s}": ("gemma", f"gemma_{s}", "gemma", "GEMMA") for s in ("2b", "7b")},
    **{f"gemma-2-{s}": ("gemma2", f"gemma2_{s}", "gemma", "GEMMA2") for s in ("2b", "9b", "27b")},
    "qwen2.5-0.5b": ("qwen2_5", "qwen2_5_0_5b", "qwen2_5", "QWEN2"),
    "qwen2.5-1.5b": ("qwen2_5", "qwen2_5_1_5b_base", "qwen2_5", "QWEN2"),
    "qwen2.5-3b": ("qwen2_5", "qwen2_5_3b", "qwen2_5", "QWEN2"),
    **{f"qwen2.5-{s}": ("qwen2_5", f"qwen2_5_{s}_base", "qwen2_5", "QWEN2") for s in ("7b", "14b", "32b", "72b")},
    **{f"qwen3-{s}": ("qwen3", f"qwen3_{s.replace('.', '_')}_base", "qwen3", "QWEN3")
       for s in ("0.6b", "1.7b", "4b", "8b", "14b")},
    "qwen3-32b": ("qwen3", "qwen3_32b", "qwen3", "QWEN3"),
    "phi-3-mini": ("phi3", "phi3_mini", "phi3", "PHI3_MINI"),
    "phi-4": ("phi4", "phi4_14b", "phi4", "PHI4"),
}
#: Packages whose LoRA builders take no quantize_base and that have no qlora_ builders (qwen2_5, qwen3).
NO_QLORA = ("qwen2_5", "qwen3")
#: tokenizer package -> (component, its files in the downloaded checkpoint directory).
TOKENIZERS = {
    "llama2": ("torchtune.models.llama2.llama2_tokenizer", {"path": "tokenizer.model"}),
    "llama3": ("torchtune.models.llama3.llama3_tokenizer", {"path": "original/tokenizer.model"}),
    "mistral": ("torchtune.models.mistral.mistral_tokenizer", {"path": "tokenizer.model"}),
    "gemma": ("torchtune.models.gemma.gemma_tokenizer", {"path": "tokenizer.model"}),
    "qwen2_5": ("torchtune.models.qwen2_5.qwen2_5_tokenizer", {"path": "vocab.json", "merges_file": "merges.txt"}),
    "qwen3": ("torchtune.models.qwen3.qwen3_tokenizer", {"path": "vocab.json", "merges_file": "merges.txt"}),
    "phi3": ("torchtune.models.phi3.phi3_mini_tokenizer", {"path": "tokenizer.model"}),
    "phi4": ("torchtune.models.phi4.phi4_tokenizer", {"path": "vocab.json", "merges_file": "merges.txt"}),
}
ATTN_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
#: The Plan's optimizer -> the component torchtune's recipes instantiate (with its switches).
OPTIMIZER_COMPONENTS = {"adamw": ("torch.optim.AdamW", {}), "adamw-fused": ("torch.optim.AdamW", {"fused": True}),
                        "adamw-forloop": ("torch.optim.AdamW", {"foreach": False}),
                        "adamw-8bit": ("bitsandbytes.optim.AdamW8bit", {}),
                        "paged-adamw-8bit": ("bitsandbytes.optim.PagedAdamW8bit", {}),
                        "adafactor": ("torch.optim.Adafactor", {}), "sgd": ("torch.optim.SGD", {"momentum": 0.9})}
MODEL_DIR = "model"  # where `tune download` puts the checkpoint, relative to the output directory


def builder_of(plan: Plan) -> tuple[str, str, str, str] | None:
    from memplan.catalog.presets import name_index

    return BUILDERS.get(name_index().get(str(plan.model).lower(), ""))


def nearest(plan: Plan, ctx: Context) -> Nearest:
    """torchtune: its single-device recipes, or FSDP2 in its distributed ones (no DDP, no DeepSpeed); dtype bf16
    or fp32 (no autocast, no fp32 masters, no fp16); its chunked losses; torch's SDPA; a cosine schedule;
    whole epochs; LoRA on attention projections and on the whole MLP or none of it."""
    from memplan.trainers.emit import lora_target_names

    n = Nearest(plan)
    found = builder_of(plan)
    if found is None:
        n.impossible = (f"torchtune builds models from its own builders, and has none for {plan.model}: it has "
                        "llama2, llama3, llama3_1, llama3_2, llama3_3, mistral, gemma, gemma2, qwen2_5, qwen3, phi3 "
                        "and phi4 builders (torchtune/models); no torchtune config was written")
        return n
    _sharding(n)
    _precision(n)
    if plan.method == "lora-8bit":
        n.change("method", "lora", "method lora-8bit -> lora: torchtune quantizes a base only to NF4 (its qlora_ "
                                   "builders); its LoRA builders keep the base in the recipe's dtype")
    if plan.ckpt_reentrant:
        n.change("ckpt_reentrant", False, "reentrant checkpointing -> non-reentrant: torchtune's "
                                          "set_activation_checkpointing wraps each layer with torch's "
                                          "apply_activation_checkpointing, non-reentrant by default")
    if plan.method == "qlora" and found[0] in NO_QLORA:
        n.change("method", "lora", f"method qlora -> lora: torchtune's {found[0]} LoRA builders cannot quantize the "
                                   "base (no qlora_ builder, no quantize_base)")
    if plan.trains_adapters:
        names = lora_target_names(plan, ctx.spec)
        mlp = [m for m in MLP_NAMES if m in names]
        if mlp and len(mlp) < len(MLP_NAMES):
            targets = [t for t in names if t not in MLP_NAMES] + MLP_NAMES
            n.change("lora.targets", targets, f"LoRA targets: {', '.join(mlp)} -> the whole MLP: torchtune adapts "
                                              "gate, up and down projections together (apply_lora_to_mlp)")
    if plan.liger:
        n.change("liger", [], "liger -> none: torchtune's recipes build their own modules (torchtune.modules), which "
                              "Liger does not patch; they chunk the loss instead")
    if plan.loss == "standard":
        n.change("loss", "chunked", "loss standard -> chunked: torchtune's recipes compute the loss chunked "
                                    "(CEWithChunkedOutputLoss: the output projection and the loss in chunks, "
                                    "no full fp32 logits)")
    if plan.attn != "sdpa":
        n.change("attn", "sdpa", f"attention {plan.attn} -> sdpa: torchtune runs torch's scaled_dot_product_attention "
                                 "(which picks its own flash kernel on CUDA)")
    if plan.hparams.lr_scheduler != "cosine":
        n.change("hparams.lr_scheduler", "cosine", f"lr_scheduler {plan.hparams.lr_scheduler} -> cosine: the schedule "
                                                   "torchtune ships (get_cosine_schedule_with_warmup)")
    if not float(plan.hparams.epochs).is_integer():
        import math

        n.change("hparams.epochs", float(math.ceil(plan.hparams.epochs)), f"epochs {plan.hparams.epochs:g} -> "
                 f"{math.ceil(plan.hparams.epochs)}: torchtune runs whole epochs")
    return n


def _sharding(n: Nearest) -> None:
    p = n.plan
    if p.sharding == "deepspeed":
        zero = 3 if (p.zero == 3 or p.offload != "none") else 2
        offload = "optimizer+params" if p.offload != "none" else "none"
        n.change("sharding", "fsdp", f"DeepSpeed ZeRO-{p.zero}" + (f" with {p.offload} offload" if p.offload != "none"
                                                                   else "") +
                 f" -> FSDP2 {'FULL_SHARD' if zero == 3 else 'SHARD_GRAD_OP'}" +
                 (" with CPU offload (parameters, gradients and the optimizer step)" if offload != "none" else "") +
                 ": torchtune has no DeepSpeed")
        n.change("zero", zero, "")
        n.change("offload", offload, "")
    elif p.sharding == "ddp" and p.world_size > 1:
        n.change("sharding", "fsdp", "DDP -> FSDP2 SHARD_GRAD_OP (ZeRO-2): torchtune's distributed recipes shard with "
                                     "FSDP2 (fsdp_reshard_after_forward: false keeps the parameters gathered)")
        n.change("zero", 2, "")
    elif p.sharding == "fsdp" and p.zero == 0:
        n.change("zero", 2, "FSDP NO_SHARD -> SHARD_GRAD_OP: FSDP2 shards or reshards, it has no NO_SHARD")
    n.why = [w for w in n.why if w]


def _precision(n: Nearest) -> None:
    """dtype is the weights', gradients' and states' (torchtune.training.get_dtype: fp32 or bf16)."""
    from memplan.trainers.emit import without_autocast

    p = n.plan
    if p.precision == "amp-fp16":
        target = "bf16" if p.method == "qlora" else "fp32"
        n.change("precision", target, f"precision amp-fp16 -> {target}: torchtune trains in dtype fp32 or bf16 only "
                                      "(no fp16, no autocast)" + (" (bf16 needs a GPU with bf16)" if target == "bf16"
                                                                  else ""))
        return
    without_autocast(n, "torchtune", "dtype: bf16 or fp32; torchtune.training.get_dtype", deepspeed_keeps=False)


def emit(plan: Plan, ctx: Context) -> Emitted:
    """torchtune.yaml for `tune run RECIPE --config torchtune.yaml` (keys: recipes/configs/*, the recipes'
    cfg reads, torchtune/models/*/_model_builders.py)."""

    from memplan.trainers.emit import hub_id, yaml_text

    package, builder, tok_package, model_type = builder_of(plan)
    h, notes = plan.hparams, []
    single = plan.world_size == 1 and plan.sharding == "ddp"
    recipe = f"{'full' if plan.method == 'full' else 'lora'}_finetune_{'single_device' if single else 'distributed'}"
    model = _model_section(plan, ctx, package, builder)
    tok_component, tok_files = TOKENIZERS[tok_package]
    tokenizer = {"_component_": tok_component, **{k: f"{MODEL_DIR}/{v}" for k, v in tok_files.items()},
                 "max_seq_len": plan.seq_len}
    data: dict[str, Any] = {"output_dir": "output/torchtune", "model": model, "tokenizer": tokenizer,
                            "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                                             "checkpoint_dir": MODEL_DIR, "checkpoint_files": ["model.safetensors"],
                                             "recipe_checkpoint": None, "output_dir": "${output_dir}",
                                             "model_type": model_type},
                            "resume_from_checkpoint": False}
    if plan.trains_adapters:
        data["save_adapter_weights_only"] = False
    data["dataset"] = _dataset(plan, ctx, notes)
    data.update(seed=h.seed, shuffle=True, batch_size=plan.micro_batch)
    data.update(_emit_training(plan, ctx, notes))
    if plan.method == "full" and single:
        data["optimizer_in_bwd"] = False
    if not single:
        data.update(fsdp_cpu_offload=plan.offload == "optimizer+params", fsdp_reshard_after_forward=plan.zero == 3)
    data.update(device=plan.device, dtype="bf16" if plan.precision == "bf16" else "fp32",
                enable_activation_checkpointing=plan.grad_ckpt,
                enable_activation_offloading=plan.offload_activations,
                metric_logger={"_component_": "torchtune.training.metric_logging.DiskLogger",
                               "log_dir": "${output_dir}/logs"},
                log_every_n_steps=h.log_every, log_peak_memory_stats=plan.device == "cuda")
    procs = "" if single else f"--nproc_per_node {plan.gpus} " + (f"--nnodes {plan.nodes} " if plan.nodes > 1
                                                                  else "")
    files_override = f'checkpointer.checkpoint_files="[$(cd {MODEL_DIR} && ls *.safetensors | paste -sd, -)]"'
    run = f"{hf_alloc(plan)}tune run {procs}{recipe} --config {CONFIG} {files_override}"
    launch = [f"tune download {hub_id(plan)} --output-dir {MODEL_DIR}", run]
    if plan.nodes > 1:
        notes.append("multi-node: add torchrun's --node_rank and --rdzv_endpoint to `tune run` on each machine")
    header = [f"torchtune: tune run {procs}{recipe} --config {CONFIG}",
              f"(run from this directory after `tune download {hub_id(plan)} --output-dir {MODEL_DIR}`; the launch "
              "command in README.md fills checkpointer.checkpoint_files with the downloaded *.safetensors)",
              f"dtype {data['dtype']}: weights, gradients and optimizer states in {data['dtype']} (plan precision "
              f"{plan.precision}; torchtune has no autocast and no fp32 master weights)",
              "written by memplan recommend --emit torchtune; keys: recipes/configs, recipes/*.py, "
              "torchtune/models/*/_model_builders.py"]
    return Emitted("torchtune", {CONFIG: yaml_text(data, header)}, CONFIG, launch, plan, notes=notes)


def _model_section(plan: Plan, ctx: Context, package: str, builder: str) -> dict[str, Any]:
    """The model builder: the base model's, or its lora_ / qlora_ builder with the adapter settings."""
    from memplan.trainers.emit import lora_target_names, number

    model: dict[str, Any] = {"_component_": f"torchtune.models.{package}.{builder}"}
    if plan.trains_adapters:
        prefix = "qlora_" if plan.method == "qlora" else "lora_"
        model["_component_"] = f"torchtune.models.{package}.{prefix}{builder}"
        names = lora_target_names(plan, ctx.spec)
        model.update(lora_attn_modules=[ATTN_MODULES[t] for t in names if t in ATTN_MODULES],
                     apply_lora_to_mlp=any(t in MLP_NAMES for t in names), apply_lora_to_output=False,
                     lora_rank=plan.lora.rank, lora_alpha=number(plan.lora.alpha), lora_dropout=plan.lora.dropout)
    return model


def _emit_training(plan: Plan, ctx: Context, notes: list[str]) -> dict[str, Any]:
    """Optimizer, the cosine schedule with its warmup steps, the chunked loss, epochs and accumulation."""
    import math

    h, data = plan.hparams, {}
    component, switches = OPTIMIZER_COMPONENTS[plan.optimizer]
    data["optimizer"] = {"_component_": component, **switches, "lr": h.effective_lr(plan.method),
                         "weight_decay": h.weight_decay}
    if h.warmup_steps is not None:
        warmup = h.warmup_steps
    elif ctx.total_steps:
        warmup = math.ceil(h.warmup_ratio * ctx.total_steps)  # transformers rounds a ratio up, as memplan does
    else:
        warmup = 0
        notes.append(f"warmup {h.warmup_ratio:g} of the steps: torchtune takes a step count "
                     "(lr_scheduler.num_warmup_steps), and the run's steps are not known; set it")
    data["lr_scheduler"] = {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                            "num_warmup_steps": warmup}
    # CEWithChunkedOutputLoss: in the released torchtune (0.6.1) and its main branch alike (LinearCrossEntropyLoss
    # is not in 0.6.1: the trainer check found it missing)
    data["loss"] = {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"}
    data.update(epochs=1 if h.max_steps else int(h.epochs), max_steps_per_epoch=h.max_steps,
                gradient_accumulation_steps=plan.grad_accum, clip_grad_norm=h.max_grad_norm or None, compile=False)
    if h.max_steps:
        notes.append(f"max_steps {h.max_steps}: written as one epoch of at most {h.max_steps} steps "
                     "(max_steps_per_epoch)")
    return data


def hf_alloc(plan: Plan) -> str:
    from memplan.trainers.hf import alloc_env

    return alloc_env(plan)


def _dataset(plan: Plan, ctx: Context, notes: list[str]) -> dict[str, Any]:
    """The dataset component for the local JSONL (load_dataset("json", data_files=...)): alpaca_dataset,
    chat_dataset (OpenAI-style messages) or text_completion_dataset; the prompt is masked as memplan masks it."""
    common = {"source": "json", "data_files": plan.data.train or "FILE.jsonl", "split": "train",
              "packed": plan.data.packing}
    if not plan.data.train:
        notes.append(f"no training file in the plan: set dataset.data_files in {CONFIG}")
    fmt = ctx.data_format
    if fmt == "chat":
        return {"_component_": "torchtune.datasets.chat_dataset", **common, "conversation_column": "messages",
                "conversation_style": "openai", "train_on_input": False}
    if fmt == "text":
        return {"_component_": "torchtune.datasets.text_completion_dataset", **common, "column": "text"}
    if not fmt:
        notes.append("the data's shape is not known: alpaca_dataset is written; use chat_dataset or "
                     "text_completion_dataset for other shapes")
    return {"_component_": "torchtune.datasets.alpaca_dataset", **common, "train_on_input": False}
