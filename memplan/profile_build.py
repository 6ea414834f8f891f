"""Build the model a plan trains, on fake tensors, the CPU or a CUDA device: the one construction path of
`memplan profile`, the tracer (memplan.trace) and the GPU check.

- The transformers model comes from its config (`AutoModelForCausalLM.from_config`), built on the `meta`
  device in the plan's weight dtype (`torch.set_default_dtype` + `dtype=`: fake parameters cannot be
  `.to(dtype)`-ed), LoRA applied there (peft), then given storage with `to_empty`: fake tensors, or real
  tensors initialized by HF's own `initialize_weights` (memory does not depend on the values). `to_empty`
  unties tied embeddings; `tie_weights()` ties them again. With `weights=DIR` a local checkpoint is loaded
  instead (`from_pretrained`, nothing downloaded).
- QLoRA (real tensors only): a random model in the 16-bit weight dtype is saved and loaded back through
  `BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype = the plan's 16-bit dtype)` onto the
  target device, then LoRA. `prepare_model_for_kbit_training` is not applied (it upcasts norms and
  embeddings to fp32, which the plan does not ask for).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from memplan.errors import UserError
from memplan.runtime.hf import BNB_HINT, enable_checkpointing, lora_config, nf4_config
from memplan.models import read_config
from memplan.plan import PRECISIONS, Plan

AUTOCAST_DTYPE = {p: getattr(torch, r.compute) for p, r in PRECISIONS.items() if r.autocast}
WEIGHT_DTYPE = {p: getattr(torch, r.weights) for p, r in PRECISIONS.items()}


@dataclass
class Built:
    model: Any  # what trains: the HF model, or the peft model around it
    hf_model: Any  # the transformers model inside
    vocab_size: int
    softcap: Optional[float]  # final_logit_softcapping (Gemma-2), for the chunked loss


# ---------------------------------------------------------------- configs


def resolve_config(config: Any):
    """A transformers config from a PretrainedConfig, a dict with `model_type`, a config.json or a model dir."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return copy.deepcopy(config)
    if isinstance(config, dict):
        data = dict(config)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise UserError("a model config dict needs a 'model_type' key (e.g. 'llama')")
        try:
            return AutoConfig.for_model(model_type, **data)
        except ValueError as err:  # unknown model type
            raise UserError(f"cannot read the model config: {err}") from None
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_file():
            return resolve_config(read_config(path))
        if path.is_dir():
            return resolve_config(path / "config.json")
        raise UserError(f"model config {config}: no such file or directory (memplan never downloads)")
    raise UserError(f"cannot read a model config from {type(config).__name__}")


def config_path(ref: str) -> Path:
    """The config.json behind a model reference, resolved as `memplan estimate` resolves it (resolve_model):
    a config.json or model directory, a preset id/alias/hub id, or a hub id in the offline HF cache."""
    from memplan import models

    path = Path(ref).expanduser()
    if path.is_file():
        return path
    if (path / "config.json").is_file():
        return path / "config.json"
    preset = models._lookup().get(ref.strip().lower())
    if preset is not None:
        return models.models_dir() / preset / "config.json"
    cached = models._cached_config(ref.strip()) if ref.count("/") == 1 else None
    if cached is not None:
        return cached
    models.resolve_model(ref)  # raises the estimate's own error for this reference
    raise UserError(f"no config.json for model '{ref}'")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ---------------------------------------------------------------- the model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _attn(plan: Plan) -> str:
    # "flash" off CUDA is traced as "sdpa": PyTorch's CPU SDPA runs a flash-attention kernel that keeps no
    # s x s tensors (only the log-sum-exp), like CUDA flash-attention 2.
    return "sdpa" if plan.attn == "flash" else plan.attn


def _cuda_attn(plan: Plan) -> str:
    if plan.attn != "flash":
        return plan.attn
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:  # SDPA's flash backend: the same memory (no s x s tensors)
        return "sdpa"


def from_config(config, plan: Plan, attn: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    dtype = WEIGHT_DTYPE[plan.precision]
    try:
        with _default_dtype(dtype):
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn or _attn(plan), dtype=dtype)
    except ValueError as err:  # unknown model type, attention implementation not supported, ...
        raise UserError(f"cannot build the model: {err}") from None


def apply_lora(hf_model, plan: Plan):
    """peft LoRA with the plan's rank, alpha, dropout and targets; peft's defaults otherwise (adapters in fp32)."""
    from peft import get_peft_model

    try:
        return get_peft_model(hf_model, lora_config(plan))
    except ValueError as err:  # target modules not found
        raise UserError(f"cannot apply LoRA: {err}") from None


def build_model(config, plan: Plan, *, device: str = "cpu", fake_mode=None, weights: Optional[str] = None,
                on_meta: bool = False) -> Built:
    """The model `plan` trains, on `device` ("cpu", "cuda:N"); fake tensors when `fake_mode` is given;
    left on the meta device with `on_meta` (to be sharded first, then given storage by `materialize`)."""
    config = resolve_config(config)
    text = _text_config(config)
    if plan.method == "qlora":
        if fake_mode is not None:
            raise UserError("bitsandbytes' 4-bit kernels cannot run on fake tensors")
        model, hf_model = _build_qlora(config, plan, device, weights)
    elif weights is not None and fake_mode is None:
        if on_meta:
            raise UserError("--weights with FSDP: memplan shards a randomly initialized model; drop --weights")
        model, hf_model = _load_weights(plan, device, weights)
    else:
        model, hf_model = _meta_model(config, plan, device)
        if not on_meta:
            materialize(model, hf_model, device, fake_mode)
    model.train()
    return Built(model, hf_model, text.vocab_size, getattr(text, "final_logit_softcapping", None))


def _meta_model(config, plan: Plan, device: str):
    attn = _cuda_attn(plan) if device.startswith("cuda") else _attn(plan)
    with torch.device("meta"):
        hf_model = from_config(config, plan, attn)
        if plan.grad_ckpt:
            enable_checkpointing(hf_model)
        model = apply_lora(hf_model, plan) if plan.method == "lora" else hf_model
    return model, hf_model


def materialize(model, hf_model, device: str, fake_mode=None) -> None:
    """Give a meta model storage on `device`: fake tensors, or real ones that HF initializes itself."""
    if fake_mode is not None:
        with fake_mode:
            model.to_empty(device=device)
            hf_model.tie_weights()
        return
    model.to_empty(device=device)
    hf_model.tie_weights()
    for module in hf_model.modules():  # to_empty gave new tensors: initialize all of them
        if hasattr(module, "_is_hf_initialized"):
            del module._is_hf_initialized
    hf_model.initialize_weights()
    hf_model.tie_weights()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t = getattr(t, "_local_tensor", t)  # a DTensor's shard (FSDP2)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RuntimeError(f"{name} was not initialized")


def _load_weights(plan: Plan, device: str, weights: str, quantization_config=None):
    from transformers import AutoModelForCausalLM

    path = Path(weights).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"--weights {weights}: not a model directory (no config.json)")
    attn = _cuda_attn(plan) if device.startswith("cuda") else _attn(plan)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=WEIGHT_DTYPE[plan.precision], attn_implementation=attn,
            device_map={"": device}, local_files_only=True,
            quantization_config=quantization_config,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"--weights {weights}: cannot load: {str(err).splitlines()[0]}") from None
    if plan.grad_ckpt:
        enable_checkpointing(hf_model)
    model = apply_lora(hf_model, plan) if plan.trains_adapters else hf_model
    return model, hf_model


def _build_qlora(config, plan: Plan, device: str, weights: Optional[str]):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"QLoRA needs bitsandbytes, which is not installed. {BNB_HINT}") from None
    quant = nf4_config(getattr(torch, plan.regime.compute))
    if weights is not None:
        return _load_weights(plan, device, weights, quant)
    with tempfile.TemporaryDirectory(prefix="memplan-qlora-") as tmp:
        with torch.device(device):  # random init where it is fastest: on the GPU when there is one
            random_model = from_config(config, plan)
        random_model.save_pretrained(tmp)
        del random_model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return _load_weights(plan, device, tmp, quant)


def quant_state_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes keeps a 4-bit weight's absmax/code (and the nested ones) outside params and buffers."""
    out = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            out.extend(v for v in vars(state).values() if isinstance(v, torch.Tensor))
            state = getattr(state, "state2", None)
    return out


def decoder_layers(module) -> list:
    """The decoder layers inside `module`, found by the classes transformers itself never splits
    (`_no_split_modules` of the HF model, wherever it sits in a peft / loss wrapper)."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
        if names:
            break
    return [m for m in module.modules() if type(m).__name__ in names]
