"""How a plan configures a transformers model, shared by `profile` (which measures it) and `train`
(which runs it), so both build the very same thing: checkpointing, peft LoRA, bitsandbytes NF4."""

from __future__ import annotations

from memplan.plan import ALL_LINEAR, Plan


def enable_checkpointing(model) -> None:
    """Non-reentrant checkpointing of every decoder layer (the reentrant form needs inputs that require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_config(plan: Plan):
    """peft LoRA with the plan's rank, alpha, dropout and targets; peft's defaults otherwise (adapters in fp32)."""
    from peft import LoraConfig

    targets = plan.lora.targets
    return LoraConfig(
        r=plan.lora.rank,
        lora_alpha=plan.lora.alpha,
        lora_dropout=plan.lora.dropout,
        target_modules=ALL_LINEAR if targets == ALL_LINEAR else list(targets),
        task_type="CAUSAL_LM",
    )


def nf4_config(compute_dtype):
    """QLoRA's quantization (Dettmers et al. 2023): 4-bit NF4 with double quantization, computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
