"""LLaMA-Factory's YAML config (`llamafactory-cli train FILE`): its model, data and fine-tuning arguments next
to transformers' TrainingArguments (per_device_train_batch_size is per GPU, as in transformers).

Sources (hiyouga/LLaMA-Factory ff6d4d1, 2026-08): src/llamafactory/hparams/data_args.py (cutoff_len 2048,
packing: on for stage pt), finetuning_args.py (finetuning_type lora, lora_rank 8, lora_alpha None = 2 x rank,
lora_dropout 0.0, lora_target "all", pure_bf16), model_args.py (flash_attn auto, disable_gradient_checkpointing
false, use_reentrant_gc true, quantization_bit, quantization_method bnb), model/loader.py (the model is loaded
with torch_dtype "auto": the checkpoint's dtype), model/adapter.py (trainable parameters are upcast to fp32
unless pure_bf16, BAdam, or ZeRO-3 without quantization).

Precision: full fine-tuning upcasts the trained weights to fp32 and bf16: true autocasts = amp-bf16 (fp16:
amp-fp16, neither: fp32); LoRA / QLoRA keep the base in its 16-bit dtype = bf16; pure_bf16 = bf16. Under
DeepSpeed its bf16 engine decides (bf16-master).
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

ARGS = "LLaMA-Factory's default (src/llamafactory/hparams)"
ATTENTION = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2",
             "fa3": "flash_attention_3"}

UNMODELLED = {
    "use_unsloth": "unsloth's patched model", "use_unsloth_gc": "unsloth's checkpointing (offloads to host)",
    "upcast_lmhead_output": "the logits upcast to fp32", "upcast_layernorm": "norm weights upcast to fp32",
    "neat_packing": "packed sequences with block-diagonal attention",
    "additional_target": "whole modules trained next to the adapters (weights, gradients and optimizer states)",
    "use_dora": "DoRA's magnitude vectors and the extra activations of its weight norm",
    "use_badam": "BAdam: one block of layers trained at a time", "use_galore": "GaLore projected optimizer states",
    "use_apollo": "APOLLO optimizer states", "use_adam_mini": "Adam-mini's shared second moments",
    "mixture_of_depths": "mixture of depths", "shift_attn": "LongLoRA's shifted attention",
}
QUIET = {"trust_remote_code", "do_train", "dataset", "eval_dataset", "dataset_dir", "template", "max_samples",
         "preprocessing_num_workers", "overwrite_cache", "val_size", "plot_loss", "stage", "finetuning_type",
         "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "pissa_init", "loraplus_lr_ratio",
         "quantization_bit", "quantization_method", "double_quantization", "flash_attn", "pure_bf16",
         "disable_gradient_checkpointing", "use_reentrant_gc", "model_name_or_path", "adapter_name_or_path",
         "create_new_adapter", "tokenized_path", "streaming", "buffer_size", "mix_strategy", "train_on_prompt",
         "mask_history", "image_max_pixels", "video_max_pixels", "media_dir", "freeze_trainable_layers",
         "freeze_trainable_modules", "print_param_status", "ray_run_name", "ray_storage_path", "ray_num_workers",
         "resources_per_worker", "placement_strategy", "export_dir", "infer_backend", "compute_accuracy"}


def _method(r: Reading) -> None:
    kind = r.get("finetuning_type", "lora")
    bits = r.get("quantization_bit")
    where = "finetuning_type" if r.has("finetuning_type") else f"finetuning_type not set ({ARGS}: lora)"
    if kind in ("full", "freeze"):
        if bits is not None:
            raise UserError(f"{r.path}: quantization_bit with finetuning_type {kind}: LLaMA-Factory trains a "
                            "quantized model only through adapters. Hint: finetuning_type: lora")
        (r.take if r.has("finetuning_type") else r.assume)("method", "full", where)
        if kind == "freeze":
            r.unmodelled("finetuning_type", "freeze", "only the last layers trained: counted as full fine-tuning")
        return
    if kind not in ("lora", "oft"):
        raise UserError(f"{r.path}: finetuning_type: {kind!r}; memplan reads full, freeze, lora and oft")
    if kind == "oft":
        r.unmodelled("finetuning_type", "oft", "OFT adapters: counted as LoRA adapters of the same rank")
    # model/model_utils/quantization.py, bnb: quantization_bit 8 -> BitsAndBytesConfig(load_in_8bit=True),
    # 4 -> load_in_4bit (NF4 by default)
    method = {4: "qlora", 8: "lora-8bit"}.get(int(bits), "lora") if bits is not None else "lora"
    (r.take if r.has("finetuning_type") else r.assume)("method", method, where + (" + quantization_bit" * (
        bits is not None)))
    if bits is not None and int(bits) not in (4, 8):
        r.unmodelled("quantization_bit", bits, f"a {bits}-bit base: memplan counts it at 16 bits (it models "
                                               "bitsandbytes' 4-bit and 8-bit bases)")
    if r.get("quantization_method", "bnb") != "bnb":
        r.unmodelled("quantization_method", r.get("quantization_method"),
                     "counted as bitsandbytes' NF4 (4-bit) / LLM.int8 (8-bit)")
    rank = int(r.get("lora_rank", 8))
    (r.take if r.has("lora_rank") else r.assume)("lora.rank", rank, "lora_rank" if r.has("lora_rank") else
                                                 f"lora_rank not set; {ARGS}")
    if r.has("lora_alpha"):
        r.take("lora.alpha", float(r.get("lora_alpha")), "lora_alpha")
    else:
        r.assume("lora.alpha", float(2 * rank), f"lora_alpha not set; {ARGS}: 2 x lora_rank")
    if r.has("lora_dropout"):
        r.take("lora.dropout", float(r.get("lora_dropout")), "lora_dropout")
    else:
        r.assume("lora.dropout", 0.0, f"lora_dropout not set; {ARGS}")
    if r.has("lora_target"):
        lora.targets(r, r.get("lora_target"), "lora_target")
    else:
        r.assume("lora.targets", "all-linear", f"lora_target not set; {ARGS}: all")


def _model_side(r: Reading) -> None:
    """cutoff_len, packing, attention and checkpointing (LLaMA-Factory's model and data arguments)."""
    if r.has("cutoff_len"):
        r.take("seq_len", int(r.get("cutoff_len")), "cutoff_len")
    else:
        r.assume("seq_len", 2048, f"cutoff_len not set; {ARGS}")
    name = ATTENTION.get(str(r.get("flash_attn", "auto")), None)
    if name:
        hf.attention(r, name, "flash_attn")
    else:
        r.assume("attn", "sdpa", f"flash_attn not set or auto ({ARGS}): transformers picks sdpa where torch has it")
    packing = r.get("packing", r.get("stage", "sft") == "pt") or r.get("neat_packing")
    if packing:
        # DataArguments.__post_init__: packing (neat_packing sets it) makes rows of cutoff_len - 1 tokens
        cutoff = int(r.get("cutoff_len", 2048))
        (r.take if r.has("cutoff_len") else r.assume)("seq_len", cutoff - 1, "cutoff_len - 1 (packed rows: "
                                                      "data_args.py cutoff_len -= 1)")
        if r.has("packing") or r.get("neat_packing"):
            r.take("data.packing", True, "packing" if r.has("packing") else "neat_packing")
        else:
            r.assume("data.packing", True, f"packing not set; {ARGS}: on for stage pt")
        if r.plan.get("attn") == "flash":
            r.count("packing", True, "packed rows of cutoff_len: flash-attention keeps what unpacked full rows keep")
        elif not r.get("neat_packing"):
            r.unmodelled("packing", True, "packed rows attend across examples (neat_packing false): no mask, where "
                                          "memplan counts the packed-row mask of SDPA / eager attention")
    off = bool(r.get("disable_gradient_checkpointing", False))
    (r.take if r.has("disable_gradient_checkpointing") else r.assume)(
        "grad_ckpt", not off, "disable_gradient_checkpointing" if r.has("disable_gradient_checkpointing") else
        f"disable_gradient_checkpointing not set; {ARGS}: checkpointing on")
    # model/model_utils/checkpointing.py: gradient_checkpointing_enable(gradient_checkpointing_kwargs=
    # {"use_reentrant": use_reentrant_gc}), whatever TrainingArguments' gradient_checkpointing_kwargs say
    if off:
        r.ignore("use_reentrant_gc")
    elif r.has("use_reentrant_gc"):
        r.take("ckpt_reentrant", bool(r.get("use_reentrant_gc")), "use_reentrant_gc")
    else:
        r.assume("ckpt_reentrant", True, f"use_reentrant_gc not set; {ARGS}: torch's reentrant checkpointing")
    stage = r.get("stage", "sft")
    if stage not in ("sft", "pt"):
        r.unmodelled("stage", stage, "preference / reward stages: chosen and rejected sequences, a reference or "
                                     "reward model; memplan estimates supervised training")


def read(data: dict[str, Any], path: str, launcher: str | None = None) -> ConfigSource:
    """`launcher`: the accelerate config that launches it, if any (memplan.trainers.accelerate)."""
    r = Reading("llama-factory", path, data)
    r.launcher = launcher
    r.take("model", str(r.get("model_name_or_path")), "model_name_or_path")
    _method(r)
    args = hf.training_arguments(r, {})
    _model_side(r)  # after: LLaMA-Factory turns checkpointing on itself, whatever TrainingArguments say
    method = r.plan.get("method")
    if r.get("pure_bf16"):
        weights, key = "bfloat16", "pure_bf16"
        args["bf16"], args["autocast"] = True, None
    elif method == "full":
        weights, key = "float32", "finetuning_type full (trained weights upcast to fp32)"
    else:
        weights, key = "bfloat16", "the checkpoint's dtype (torch_dtype auto), counted as bfloat16"
    hf.parallel(r, args, weights, key)
    _local_data(r)
    _liger(r)
    hf.unmodelled(r, UNMODELLED)
    return r.finish(hf.QUIET | QUIET)


def _local_data(r: Reading) -> None:
    """data.train: the local file that dataset_dir/dataset_info.json registers under the first `dataset` name
    (LLaMA-Factory's data/loader.py joins dataset_dir and file_name), when that file is on this machine."""
    import json

    names = str(r.data.get("dataset") or "").split(",")
    directory = Path(str(r.data.get("dataset_dir") or "data"))
    for base in (Path.cwd(), Path(r.path).resolve().parent):
        info_path = base / directory / "dataset_info.json"
        if info_path.is_file():
            try:
                entry = json.loads(info_path.read_text(encoding="utf-8")).get(names[0].strip())
            except (ValueError, AttributeError):
                return
            if isinstance(entry, dict) and entry.get("file_name"):
                lora.local_data(r, str(directory / str(entry["file_name"])), "dataset")
            return


# ---------------------------------------------------------------- writing (memplan.trainers.emit)

CONFIG = "llamafactory.yaml"
DATASET_INFO = "dataset_info.json"
#: memplan's JSONL shapes -> dataset_info.json entries (data/README.md of LLaMA-Factory: alpaca columns,
#: sharegpt with OpenAI-style role/content tags, and a text column for stage pt).
DATASET_FORMATS = {
    "alpaca": {"formatting": "alpaca", "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
    "chat": {"formatting": "sharegpt", "columns": {"messages": "messages"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}},
    "text": {"columns": {"prompt": "text"}},
}
FLASH_ATTN = {"eager": "disabled", "sdpa": "sdpa", "flash": "fa2"}


def _liger(r: Reading) -> None:
    """enable_liger_kernel: model/model_utils/liger_kernel.py apply_liger_kernel runs the model type's
    apply_liger_kernel_to_<type>() with its defaults for stages pt and sft; the other stages need the logits
    (require_logits): fused_linear_cross_entropy off, cross_entropy on."""
    if r.get("stage", "sft") in ("sft", "pt"):
        liger.read_hf(r, "enable_liger_kernel")
    elif r.get("enable_liger_kernel"):
        liger.take(r, {**liger.defaults(), "fused_linear_cross_entropy": False, "cross_entropy": True},
                   "enable_liger_kernel")


def nearest(plan: Plan, ctx: Context) -> Nearest:
    """LLaMA-Factory upcasts full fine-tuning's weights to fp32 (bf16 / fp16: autocast) unless pure_bf16, and
    keeps a LoRA / QLoRA base in the checkpoint's 16-bit dtype; no chunked loss."""
    n = Nearest(plan)
    hf.nearest_optimizer(n)
    if plan.trains_adapters and plan.sharding != "deepspeed" and plan.precision != "bf16":
        n.change("precision", "bf16", f"precision {plan.precision} -> bf16: LLaMA-Factory loads a LoRA / QLoRA base "
                                      "in the checkpoint's dtype (torch_dtype auto, bfloat16 for these models) and "
                                      "keeps it so; the adapters train in fp32 (model/adapter.py)")
    else:
        hf.nearest_precision(n)
    if plan.loss == "chunked":
        n.change("loss", "standard", "loss chunked -> standard: LLaMA-Factory computes the full logits unless "
                                     "Liger's fused cross-entropy does (enable_liger_kernel: --liger all)")
    liger.all_or_none(n, "LLaMA-Factory", "enable_liger_kernel")
    if plan.offload_activations:
        n.change("offload_activations", False, "activation offloading -> off: LLaMA-Factory has no activation "
                                               "offloading")
    return n


def _dataset(plan: Plan, ctx: Context, data: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The dataset_info.json registrations of the plan's files, and the keys that name them."""
    fmt = DATASET_FORMATS.get(ctx.data_format or "", DATASET_FORMATS["alpaca"])
    info: dict[str, Any] = {}
    if not plan.data.train:
        notes.append(f"no training file in the plan: set file_name of memplan_train in {DATASET_INFO}")
    info["memplan_train"] = {"file_name": plan.data.train or "FILE.jsonl", **fmt}
    data.update(dataset="memplan_train", dataset_dir=".")
    if plan.data.validation:
        info["memplan_validation"] = {"file_name": plan.data.validation, **fmt}
        data["eval_dataset"] = "memplan_validation"
    elif plan.data.val_ratio > 0:
        data["val_size"] = plan.data.val_ratio
    if not ctx.data_format:
        notes.append(f"the data's shape is not known: {DATASET_INFO} registers it as alpaca "
                     "(instruction/input/output)")
    return info


def emit(plan: Plan, ctx: Context) -> Emitted:
    """llamafactory.yaml and dataset_info.json for `llamafactory-cli train` (keys: src/llamafactory/hparams:
    model_args.py, data_args.py, finetuning_args.py, and transformers' TrainingArguments)."""
    import json

    from memplan.trainers.emit import hub_id, number, yaml_text

    notes: list[str] = []
    text = ctx.data_format == "text"
    data: dict[str, Any] = {"model_name_or_path": hub_id(plan), "stage": "pt" if text else "sft", "do_train": True,
                            "finetuning_type": "full" if plan.method == "full" else "lora"}
    if plan.trains_adapters:
        lo = plan.lora
        data.update(lora_rank=lo.rank, lora_alpha=number(lo.alpha), lora_dropout=lo.dropout,
                    lora_target="all" if lo.targets == "all-linear" else ",".join(lo.targets))
        if plan.method == "qlora":
            # memplan's QLoRA: NF4 with double quantization (memplan.runtime.hf)
            data.update(quantization_bit=4, quantization_method="bnb", double_quantization=True)
        elif plan.method == "lora-8bit":
            data.update(quantization_bit=8, quantization_method="bnb")
    if plan.sharding == "deepspeed":
        data["deepspeed"] = DS_CONFIG_NAME
    info = _dataset(plan, ctx, data, notes)
    if plan.liger:
        data["enable_liger_kernel"] = True
    data.update(cutoff_len=plan.seq_len + (1 if plan.data.packing else 0), packing=plan.data.packing,
                output_dir="output/llamafactory",
                logging_steps=plan.hparams.log_every)
    args = hf.training_arguments_for(plan)
    for key in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):  # LLaMA-Factory's own keys below
        args.pop(key, None)
    if plan.precision == "bf16" and plan.method == "full":
        data["pure_bf16"] = True
        args["bf16"] = False  # pure_bf16 is no autocast: LLaMA-Factory refuses it with bf16 / fp16
    elif plan.precision == "bf16":
        args["bf16"] = True  # the autocast of a bf16 base (what the Trainer runs the adapters under)
    data.update(args)
    data.update(hf.fsdp_arguments(plan, ctx.spec))
    data.update(flash_attn=FLASH_ATTN[plan.attn], disable_gradient_checkpointing=not plan.grad_ckpt,
                use_reentrant_gc=plan.ckpt_reentrant, save_steps=plan.hparams.save_every or plan.hparams.eval_every,
                save_total_limit=plan.hparams.save_total_limit)
    if "val_size" in data or "eval_dataset" in data:
        data.update(eval_strategy="steps", eval_steps=plan.hparams.eval_every)
    if text:
        notes.append("text records train as LLaMA-Factory's stage pt (every token), as memplan trains them")
    distributed = plan.world_size > 1 or plan.sharding != "ddp"
    env = (f"FORCE_TORCHRUN=1 NNODES={plan.nodes} NODE_RANK=0 NPROC_PER_NODE={plan.gpus} "
           + ("MASTER_ADDR=MACHINE0_ADDRESS MASTER_PORT=29500 " if plan.nodes > 1 else "")) if distributed else ""
    launch = f"{hf.alloc_env(plan)}{env}llamafactory-cli train {CONFIG}"
    if plan.nodes > 1:
        notes.append("multi-node: replace MACHINE0_ADDRESS with machine 0's address, and set NODE_RANK=K on "
                     "machine K")
    header = [f"LLaMA-Factory: {launch}", "(run from this directory: dataset_dir . is where dataset_info.json is; "
              "written by memplan recommend --emit llamafactory)",
              f"precision {plan.precision}: {_precision_note(plan)}",
              "keys: src/llamafactory/hparams (model_args.py, data_args.py, finetuning_args.py) and transformers "
              "TrainingArguments; template unset: the tokenizer's chat template (data/template.py)"]
    files = {CONFIG: yaml_text(data, header), DATASET_INFO: json.dumps(info, indent=2) + "\n"}
    return Emitted("llamafactory", files, CONFIG, [launch], plan, notes=notes)


def _precision_note(plan: Plan) -> str:
    if plan.sharding == "deepspeed":
        return ("DeepSpeed's bf16 engine (ds_config.json bf16.enabled, bf16: true): bf16 weights with fp32 masters"
                if plan.precision == "bf16-master" else "DeepSpeed in fp32 (bf16: false)")
    if plan.trains_adapters:
        return "the base in the checkpoint's 16-bit dtype, bf16: true autocasts the adapters' step"
    return {"fp32": "bf16: false (the trained weights upcast to fp32, no autocast)",
            "amp-bf16": "bf16: true (the trained weights upcast to fp32, the forward autocast to bf16)",
            "amp-fp16": "fp16: true (the trained weights upcast to fp32, the forward autocast to fp16)",
            "bf16": "pure_bf16: true (weights, gradients and states in bf16, no autocast)"}[plan.precision]
