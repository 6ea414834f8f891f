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
from typing import Any

from memplan.files import read_text
from memplan.trainers import lora
from memplan.trainers.source import ConfigSource, Reading

RECIPES = "torchtune's recipes (recipes/*.py)"
#: torchtune module names -> the Hugging Face names memplan's models use (torchtune/models/convert_weights.py).
LORA_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
MLP_NAMES = ["gate_proj", "down_proj", "up_proj"]  # w1, w2, w3
OPTIMIZERS = {"torch.optim.AdamW": "adamw", "torch.optim.Adam": "adamw", "torch.optim.SGD": "sgd",
              "bitsandbytes.optim.PagedAdamW8bit": "paged-adamw-8bit", "bitsandbytes.optim.AdamW8bit": "adamw-8bit",
              "bitsandbytes.optim.PagedAdamW": "adamw", "torchao.optim.AdamW8bit": "adamw-8bit"}
CHUNKED_LOSSES = ("LinearCrossEntropyLoss", "CEWithChunkedOutputLoss", "ChunkedCrossEntropyLoss")

UNMODELLED = {
    "enable_activation_offloading": "activations offloaded to host memory",
    "optimizer_in_bwd": "the optimizer steps in the backward, freeing each gradient as it goes",
    "compile": "torch.compile fuses kernels and changes which activations are kept",
    "custom_sharded_layers": "embeddings and output sharded as their own FSDP units",
    "activation_offloading_use_streams": "activation offloading on side streams",
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
    if kind == "adamw" and opt.get("fused"):
        kind = "adamw-fused"
    r.take("optimizer", kind, "optimizer._component_" + (" + fused" if opt.get("fused") else ""))
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
    for key, why in UNMODELLED.items():
        if r.data.get(key):
            r.unmodelled(key, r.get(key), why)
    return r.finish(QUIET | set(UNMODELLED))
