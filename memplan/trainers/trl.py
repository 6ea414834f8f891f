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

from typing import Any

from memplan.errors import UserError
from memplan.trainers import hf, lora
from memplan.trainers.source import ConfigSource, Reading

SFT_CONFIG = "TRL's SFTConfig default (trl/trainer/sft_config.py)"
MODEL_CONFIG = "TRL's ModelConfig default (trl/trainer/model_config.py)"

#: TRL packs with best-fit decreasing and then runs padding-free (sft_config.py: packing_strategy "bfd").
PACKED = ("packed rows run padding-free (all sequences of a micro-batch in one row, flash-attention per "
          "sequence): memplan counts micro_batch x seq_len tokens as separate padded rows")

UNMODELLED = {
    "padding_free": "padding-free batches (one row of all tokens, per-sequence flash-attention)",
    "use_dora": "DoRA's magnitude vectors and the extra activations of its weight norm",
    "lora_target_parameters": "LoRA on parameters (MoE experts) rather than modules",
    "bnb_4bit_quant_storage": "the storage dtype of the 4-bit weights",
}
QUIET = {"model_revision", "trust_remote_code", "dataset_config", "dataset_train_split", "dataset_test_split",
         "dataset_text_field", "dataset_kwargs", "dataset_num_proc", "dataset_mixture", "dataset_streaming",
         "chat_template", "chat_template_path", "eos_token", "pad_token", "completion_only_loss",
         "assistant_only_loss", "truncation_mode", "shuffle_dataset", "eval_packing", "packing_strategy",
         "lora_task_type", "use_rslora", "bnb_4bit_quant_type", "use_bnb_nested_quant", "router_aux_loss_coef",
         "pad_to_multiple_of", "gradient_checkpointing_use_reentrant", "ignore_bias_buffers",
         "dataset_name", "model_name_or_path", "torch_dtype", "dtype", "lora_r", "lora_alpha", "lora_dropout"}


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
    if r.has("packing"):
        r.take("data.packing", bool(r.get("packing")), "packing")
        if r.get("packing"):
            r.unmodelled("packing", True, PACKED)
    loss = r.get("loss_type")
    if loss is not None:
        r.take("loss", "chunked" if loss == "chunked_nll" else "standard", "loss_type")
    elif r.get("use_liger_kernel"):
        r.assume("loss", "standard", "loss_type not set; with use_liger_kernel TRL's default is nll (its Liger "
                                     "fused linear cross-entropy: see not modelled)")
    else:
        r.assume("loss", "chunked", f"loss_type not set; {SFT_CONFIG}, chunked_nll (no full logits)")


def read(data: dict[str, Any], path: str) -> ConfigSource:
    r = Reading("trl", path, data)
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
    if r.plan.get("method") == "qlora" and weights == "float32":
        r.unmodelled("dtype", "float32", "with load_in_4bit, the modules left unquantized (embeddings, lm_head, "
                                         "norms) load in float32; memplan counts them in 16 bits")
    hf.parallel(r, args, weights, weights_key)
    lora.local_data(r, r.get("dataset_name"), "dataset_name")
    hf.unmodelled(r, UNMODELLED)
    return r.finish(hf.QUIET | QUIET)
