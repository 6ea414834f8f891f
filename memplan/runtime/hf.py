"""How memplan sets up the Hugging Face libraries, shared by `profile` (which measures a plan) and `train`
(which runs it), so both build the very same thing: checkpointing, peft LoRA, bitsandbytes NF4.

Importing this module, which both do before transformers, peft or bitsandbytes, also makes those libraries
work offline and keeps their messages about optional kernels off the user's screen (`offline_and_quiet`).
"""

from __future__ import annotations

import logging
import os

from memplan.plan import ALL_LINEAR, Plan

# memplan never downloads: every file is read with local_files_only=True. bitsandbytes >= 0.49 on a CPU with
# AVX512-BF16 asks the Hub for an optional CPU kernel when it is imported (bitsandbytes/backends/cpu/ops.py:
# kernels.get_kernel("kernels-community/quantization-bitsandbytes"), which first checks the publisher on
# huggingface.co, measured: two DNS look-ups of huggingface.co at `import bitsandbytes`). Offline, the look-up
# reads only the local cache; without the kernel bitsandbytes uses its own C++ CPU code.
# This holds over a user's own HF_HUB_OFFLINE=0 too: that setting allows downloads, it asks for none, and
# train and profile have nothing to download; a look-up nobody asked for stays a look-up nobody asked for.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
BNB_HINT = "Hint: pip install bitsandbytes (CPU wheels exist for Linux x86-64/aarch64)."

# Exactly the two lines that optional-kernel look-up logs offline: nothing the user can or needs to act on.
QUIET_LOG_LINES = {
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropLines(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def offline_and_quiet() -> None:
    """Offline Hub access for this process and the processes it starts, and the optional-kernel lines
    filtered out of their loggers. Idempotent; needs no heavy import."""
    os.environ.update(OFFLINE_ENV)
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read at import: imported already, so told directly
        constants.HF_HUB_OFFLINE = True
    for name, prefix in QUIET_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(prefix))


offline_and_quiet()


def enable_checkpointing(model, reentrant: bool = False) -> None:
    """Checkpointing of every decoder layer: torch's non-reentrant implementation, or the reentrant one
    (`plan.ckpt_reentrant`). transformers makes the input embeddings' output require grad either way
    (PreTrainedModel._activation_checkpointing_enable -> enable_input_require_grads), which the reentrant form
    needs: without an input that requires grad its layers would pass no gradient to the adapters."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_config(plan: Plan, all_linear: list[str] | None = None, frozen: list[str] | None = None):
    """peft LoRA with the plan's rank, alpha, dropout and targets; peft's defaults otherwise (adapters in fp32).
    `all_linear`: the module names that "all-linear" stands for, where not peft's own "all-linear". `frozen`:
    module paths whose linears take no adapter (a multimodal model's vision tower: peft's exclude_modules)."""
    import re

    from peft import LoraConfig

    targets = plan.lora.targets
    if targets == ALL_LINEAR:
        targets = all_linear or ALL_LINEAR
    exclude = "|".join(re.escape(path) for path in frozen or [])
    return LoraConfig(
        r=plan.lora.rank,
        lora_alpha=plan.lora.alpha,
        lora_dropout=plan.lora.dropout,
        target_modules=ALL_LINEAR if targets == ALL_LINEAR else list(targets),
        exclude_modules=rf"(?:{exclude})(?:\..*)?" if exclude else None,
        task_type="CAUSAL_LM",
    )


def nf4_config(compute_dtype, quant_storage=None):
    """QLoRA's quantization (Dettmers et al. 2023): 4-bit NF4 with double quantization, computing in `compute_dtype`;
    the packed weights stored as `quant_storage` (bitsandbytes' default: uint8)."""
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **extra)


def int8_config():
    """LLM.int8 (Dettmers et al. 2022): 8-bit weights with transformers' defaults (llm_int8_threshold 6.0, lm_head
    skipped: llm_int8_skip_modules None -> the output embeddings stay in the load dtype)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def quantization_config(plan: Plan, compute_dtype):
    """transformers' BitsAndBytesConfig for the plan's quantized base (Plan.quantized_base). Under FSDP on GPUs the
    4-bit weights are stored in the compute dtype: accelerate leaves uint8 ones out of FSDP2's sharding (every GPU
    would hold the whole quantized base, fsdp_utils.fsdp2_prepare_model), floating ones it shards, as the estimate
    counts them (LLaMA-Factory and the PEFT FSDP-QLoRA recipe store them so too)."""
    if plan.quantized_base != "nf4":
        return int8_config()
    sharded = plan.fully_shards and plan.device == "cuda"
    return nf4_config(compute_dtype, compute_dtype if sharded else None)


def keep_4bit_layers_differentiable(model) -> int:
    """Keep bitsandbytes' 4-bit layers on the path that backpropagates; returns how many layers were set.

    On a CPU with AVX512-BF16, a Linear4bit's first forward in eval mode without gradients (an evaluation)
    repacks its weight for bitsandbytes' fused CPU kernel, for good: every later forward, training ones
    included, goes through `bitsandbytes::gemv_4bit`, which has no autograd formula. torch then warns
    "gemv_4bit: an autograd kernel was not registered ... may lead to silently incorrect behavior" and
    the gradient through the frozen 4-bit weight is dropped: measured on a 256 -> 512 NF4 layer, the
    input's gradient was None (relative error 1.0) after an evaluation, 2.3e-3 (bf16 rounding) without
    one, while the two forwards agree (3e-3 from the fp32 dequantize-then-matmul). Turning the repacking
    off keeps every forward on dequantize + matmul (`gemm_4bit`), which has its autograd formula."""
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n
