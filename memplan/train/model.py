"""The model a plan trains: where its weights are, its tokenizer, and how the plan's settings apply.

How each Plan field becomes the model (the same mapping memplan's estimator and tracer assume):
- precision: fp32 / amp-bf16 / amp-fp16 keep fp32 weights (the amp regimes autocast the forward through
  accelerate); bf16 loads the weights in bf16 (grads and AdamW states follow). bf16-master loads them in
  bf16 too, and the optimizer steps fp32 master copies: DeepSpeed's bf16 optimizer with sharding deepspeed,
  memplan.runtime.optim with one process, DDP, or FSDP2 on the CPU (adamw / sgd).
- method: full trains every weight; lora wraps the model with peft `LoraConfig(r, lora_alpha,
  lora_dropout, target_modules)` ("all-linear" = every linear layer but the output head); qlora loads the
  weights through transformers' `BitsAndBytesConfig` (4-bit NF4, double quantization, compute dtype bf16,
  fp16 for amp-fp16) and adds LoRA on top. peft's `prepare_model_for_kbit_training` is not applied: it
  would upcast norms and embeddings to fp32, which the plan's estimate does not assume.
- grad_ckpt: non-reentrant activation checkpointing of every decoder layer.
- attn: eager | sdpa | flash (flash_attention_2, CUDA only).
Nothing is ever fetched from the network: files are read with `local_files_only=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memplan.errors import UserError
from memplan.runtime.hf import enable_checkpointing, keep_4bit_layers_differentiable, lora_config, nf4_config
from memplan.models import read_config
from memplan.plan import Plan

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")

# Used when a tokenizer has no chat template of its own; saved with the trained model's tokenizer so
# that inference formats prompts the same way. A conversation renders as
#   <bos>### User:\n{content}\n\n### Assistant:\n{content}<eos>
# and the generation prompt is "\n\n### Assistant:\n". An alpaca record is a user turn of
# "{instruction}\n\n{input}" and an assistant turn of "{output}".
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{% if not loop.first %}\n\n{% endif %}"
    "### {{ m['role'] | capitalize }}:\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}\n\n### Assistant:\n{% endif %}"
)


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in WEIGHT_FILES)


def _preset_dir(ref: str) -> Path | None:
    from memplan.models import models_dir, preset_ids, preset_info

    key = ref.strip().lower()
    for pid in preset_ids():
        info = preset_info(pid)
        names = [pid, info.get("hub_id") or "", *(info.get("aliases") or [])]
        if key in (n.lower() for n in names if n):
            return models_dir() / pid
    return None


def model_dir(ref: str) -> Path:
    """The directory holding the weights: a local HF model directory, or a preset that ships weights."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model {ref}: the directory has no config.json (a save_pretrained directory is needed)")
        if not _has_weights(path):
            raise UserError(f"model {ref}: no weights in the directory (*.safetensors or pytorch_model*.bin)")
        return path.resolve()
    preset = _preset_dir(ref)
    if preset is not None:
        if _has_weights(preset):
            return preset
        raise UserError(f"model '{ref}' is a preset without shipped weights (only its config.json, for "
                        "estimates). Hint: set model to a local checkpoint directory (save_pretrained layout), "
                        "or use a preset that ships weights such as demo-tiny")
    if path.exists():
        raise UserError(f"model {ref}: not a directory (give a save_pretrained directory)")
    raise UserError(f"model '{ref}': no such directory and not a preset (memplan train never downloads; "
                    "`memplan models` lists the presets)")


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    config = read_config(path / "config.json")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(f"model {path} ships its own Python code (auto_map in config.json); memplan runs it only "
                        "with --trust-remote-code")


def weight_dtype(plan: Plan):
    import torch

    return getattr(torch, plan.regime.weights)


def compute_dtype(plan: Plan):
    import torch

    return getattr(torch, plan.regime.compute)


def load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"model {path}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    if tok.pad_token is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def load_model(plan: Plan, path: Path, device: Any, trust_remote_code: bool):
    """The model to train (peft-wrapped for LoRA / QLoRA), on `device`, in the plan's regime."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=weight_dtype(plan),
        attn_implementation={"flash": "flash_attention_2"}.get(plan.attn, plan.attn),
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
    if plan.method == "qlora":
        kwargs["quantization_config"] = nf4_config(compute_dtype(plan))
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"model {path}: cannot load it for training ({str(err).splitlines()[0]})") from None
    if plan.method == "qlora":
        keep_4bit_layers_differentiable(model)
    else:
        model.to(device)
    model.config.use_cache = False  # training builds no KV cache
    if plan.grad_ckpt:
        enable_checkpointing(model)
    if plan.trains_adapters:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, lora_config(plan))
        except ValueError as err:  # a target module that the model does not have
            raise UserError(f"LoRA targets {plan.lora.targets}: {str(err).splitlines()[0]}") from None
    model.train()
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its elements, not its packed bytes."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:
            n = int(p.quant_state.shape.numel()) if hasattr(p.quant_state, "shape") else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
