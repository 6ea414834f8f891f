"""The model a plan trains, built one way for `memplan profile` (which measures it) and `memplan train` (which
trains it): where its weights are, its tokenizer, and `build_model`, the one constructor.

How each Plan field becomes the model (the same mapping memplan's estimator assumes):
- precision: the weights are created or loaded in the regime's weight dtype (memplan.plan.PRECISIONS): fp32
  for fp32 and amp-* (the amp regimes autocast the forward), bf16 for bf16 and bf16-master (gradients and
  optimizer states follow; bf16-master's fp32 masters are the optimizer's, memplan.runtime.optim).
- method: full trains every weight; lora wraps the model with peft `LoraConfig(r, lora_alpha, lora_dropout,
  target_modules)` ("all-linear" = every linear layer but the output head); qlora loads the weights through
  transformers' `BitsAndBytesConfig` (4-bit NF4, double quantization, computing in the regime's compute
  dtype) and adds LoRA on top; lora-8bit the same with `load_in_8bit` (LLM.int8 8-bit weights).
  peft's `prepare_model_for_kbit_training` is not applied: it would upcast norms
  and embeddings to fp32, which the plan's estimate does not assume.
- grad_ckpt: activation checkpointing of every decoder layer, non-reentrant unless ckpt_reentrant.
- attn: eager | sdpa | flash, as the estimate assumes (`attention`: eager for a model without an SDPA path,
  flash-attention 2 on CUDA, else SDPA's flash kernel).
- training builds no KV cache: `config.use_cache = False`.

Where the model comes from:
- a checkpoint directory (`weights`: what `memplan train` trains, `memplan profile --weights`):
  `from_pretrained`, nothing downloaded (`local_files_only=True`);
- a config only (`memplan profile`): `AutoModelForCausalLM.from_config` on the `meta` device in the plan's
  weight dtype (`torch.set_default_dtype` + `dtype=`: fake parameters cannot be `.to(dtype)`-ed), LoRA applied
  there, then given storage by `materialize`: fake tensors, or real ones initialized by HF's own
  `initialize_weights` (memory does not depend on the values). QLoRA from a config: a random model in the
  16-bit weight dtype is saved and loaded back through the NF4 quantization onto the target device.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.catalog.spec import read_config
from memplan.errors import UserError
from memplan.plan import Plan
from memplan.runtime.hf import (
    BNB_HINT,
    enable_checkpointing,
    keep_4bit_layers_differentiable,
    lora_config,
    quantization_config,
)

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


@dataclass
class Built:
    model: Any  # what trains: the HF model, or the peft model around it
    hf_model: Any  # the transformers model inside
    vocab_size: int
    notes: list[str] = field(default_factory=list)  # for the output: where the model differs from the plan


# ---------------------------------------------------------------- where the model is


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in WEIGHT_FILES)


def model_dir(ref: str) -> Path:
    """The directory holding the weights: a local HF model directory, or a preset that ships weights."""
    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import preset_id

    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model {ref}: the directory has no config.json (a save_pretrained directory is needed)")
        if not _has_weights(path):
            raise UserError(f"model {ref}: no weights in the directory (*.safetensors or pytorch_model*.bin)")
        return path.resolve()
    preset = preset_id(ref)
    if preset is not None:
        if _has_weights(models_dir() / preset):
            return models_dir() / preset
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


# ---------------------------------------------------------------- the one constructor


def attention(plan: Plan, device: str, spec=None) -> str:
    """transformers' attn_implementation for the plan on `device`: what the estimate assumes for the model `spec`
    (memplan.estimator.activations.attention_runs: "sdpa" is eager for a model without an SDPA path, which
    transformers refuses to load with "sdpa"); flash is flash-attention 2 on CUDA when the flash_attn package is
    there, and otherwise SDPA, whose flash kernel (CUDA's, and PyTorch's CPU one) keeps no s x s tensors either
    (only the log-sum-exp): the same memory. Without a spec (a model memplan does not estimate): as asked."""
    from memplan.estimator.activations import attention_runs

    attn = plan.attn if spec is None else attention_runs(spec, plan.attn)
    if attn is None:
        raise UserError(f"attn {plan.attn}: transformers has no flash-attention for {spec.model_type} models that "
                        "memplan can load. Hint: --attn sdpa or eager")
    if attn != "flash":
        return attn
    if device.startswith("cuda"):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa" if spec is None else attention_runs(spec, "sdpa")


def attention_note(plan: Plan, spec) -> str | None:
    """One line for the output where the model runs another attention than the plan names (None otherwise)."""
    if spec is None or plan.attn != "sdpa" or attention(plan, "cpu", spec) == "sdpa":
        return None
    return (f"attention: eager, not sdpa: transformers has no SDPA path for {spec.model_type} models "
            "(the estimate assumes eager too)")


def model_spec(config) -> Any:
    """memplan's ModelSpec of a transformers config, a config dict or a model directory; None for a model type or
    layout that memplan does not estimate."""
    from memplan.catalog.spec import spec_from_config

    if isinstance(config, (str, Path)):
        path = Path(config)
        config = read_config(path / "config.json" if path.is_dir() else path)
    elif not isinstance(config, dict):
        config = config.to_dict()
    try:
        return spec_from_config(config, str(config.get("model_type")))
    except UserError:
        return None


def build_model(plan: Plan, *, config: Any = None, weights: str | Path | None = None, device: Any = "cpu",
                fake_mode=None, on_meta: bool = False, trust_remote_code: bool = False, on_host: bool = False) -> Built:
    """The model `plan` trains, on `device` ("cpu", "cuda:N"), from the checkpoint `weights` or else from
    `config` (a transformers config, a dict with `model_type`, a config.json or a model directory) with random
    weights; fake tensors (from `config`) when `fake_mode` is given; left on the meta device with `on_meta` (to
    be sharded first, then given storage by `materialize`); a checkpoint left on the host with `on_host`."""
    import torch

    device = str(device)
    meta = False
    if weights is not None and fake_mode is None:
        if on_meta:
            raise UserError("--weights with FSDP: memplan shards a randomly initialized model; drop --weights")
        hf_model = _load(plan, Path(weights).expanduser(), device, trust_remote_code, on_host)
    elif plan.quantized_base:
        if fake_mode is not None:
            raise UserError("bitsandbytes' quantized kernels cannot run on fake tensors")
        hf_model = _quantized_from_config(resolve_config(config), plan, device)
    else:
        meta = True
        config = resolve_config(config)
        with torch.device("meta"):
            hf_model = _from_config(config, plan, attention(plan, device, model_spec(config)))
            model = _apply_plan(hf_model, plan)
    if not meta:
        model = _apply_plan(hf_model, plan)
    elif not on_meta:
        materialize(model, hf_model, device, fake_mode)
    model.train()
    text = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    note = attention_note(plan, model_spec(hf_model.config))
    return Built(model, hf_model, text.vocab_size, [note] if note else [])


def load_model(plan: Plan, path: Path, device: Any, trust_remote_code: bool = False):
    """What `memplan train` trains: `build_model` from the checkpoint at `path` (peft-wrapped for LoRA / QLoRA).

    Under FSDP on GPUs the model stays on the host, as `device`'s model (its attention): accelerate's sharded load
    (`fsdp_cpu_ram_efficient_loading`, fsdp2_prepare_model) expects it there and copies one tensor at a time to the
    GPU, where a model already on it would be whole on every GPU before any shard is made. A 4-bit base is
    quantized on the GPU as it loads, whole (accelerate cannot load it sharded)."""
    return build_model(plan, weights=path, device=device, trust_remote_code=trust_remote_code,
                       on_host=loads_on_host(plan)).model


def loads_on_host(plan: Plan) -> bool:
    """Whether `memplan train` leaves the loaded model on the host for accelerate to shard (FSDP on GPUs)."""
    return plan.device == "cuda" and plan.fully_shards and not plan.quantized_base


def _apply_plan(hf_model, plan: Plan):
    """Checkpointing and LoRA on the transformers model; the model that trains."""
    hf_model.config.use_cache = False  # training builds no KV cache
    frozen = _frozen_modules(hf_model)
    for path in frozen:
        hf_model.get_submodule(path).requires_grad_(False)
    if plan.grad_ckpt:
        enable_checkpointing(hf_model, plan.ckpt_reentrant)
    from memplan.runtime import liger

    liger.apply(hf_model, plan)
    if not plan.trains_adapters:
        return hf_model
    from peft import get_peft_model

    try:
        return get_peft_model(hf_model, lora_config(plan, _all_linear(hf_model.config.to_dict()), frozen))
    except ValueError as err:  # a target module that the model does not have
        raise UserError(f"LoRA targets {plan.lora.targets}: {str(err).splitlines()[0]}") from None


def _frozen_modules(hf_model) -> list[str]:
    """A multimodal model's vision tower and projector (memplan.catalog.vision): frozen under every method, LoRA
    kept off them, as the estimate assumes; none for a language model."""
    from memplan.catalog.vision import WRAPPERS

    wrapper = WRAPPERS.get(getattr(hf_model.config, "model_type", None))
    return [] if wrapper is None else [p for p in (wrapper.vision, wrapper.projector) if p]


def _all_linear(config: dict) -> list[str] | None:
    """The modules "all-linear" names where peft's own "all-linear" would also wrap one it cannot train
    (Traits.lora_unreachable: Llama 4's router, an nn.Linear whose forward returns a tuple): the estimate's
    targets (ModelSpec.linear_names). None (peft's "all-linear") for every other model."""
    spec = model_spec(config)
    if spec is None or not spec.traits.lora_unreachable:  # None: a model memplan does not estimate, peft decides
        return None
    return [name for name in spec.linear_names() if name != "lm_head"]


@contextlib.contextmanager
def _default_dtype(dtype) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _from_config(config, plan: Plan, attn: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from memplan.catalog.vision import WRAPPERS

    # a multimodal config (memplan.catalog.vision): its <Model>ForConditionalGeneration, vision tower included
    auto = AutoModelForImageTextToText if config.model_type in WRAPPERS else AutoModelForCausalLM
    dtype = getattr(torch, plan.regime.weights)
    try:
        with _default_dtype(dtype):
            return auto.from_config(config, attn_implementation=attn, dtype=dtype)
    except ValueError as err:  # unknown model type, attention implementation not supported, ...
        raise UserError(f"cannot build the model: {err}") from None


def materialize(model, hf_model, device: str, fake_mode=None) -> None:
    """Give a meta model storage on `device`: fake tensors, or real ones that HF initializes itself."""
    import torch

    if fake_mode is not None:
        with fake_mode:
            model.to_empty(device=device)
            hf_model.tie_weights()
        return
    model.to_empty(device=device)
    hf_model.tie_weights()  # to_empty unties tied embeddings
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


def _load(plan: Plan, path: Path, device: str, trust_remote_code: bool = False, on_host: bool = False):
    """The transformers model of the checkpoint at `path` on `device` (left on the host with `on_host`), in the
    plan's weight dtype; QLoRA's weights quantized to NF4 as they load (bitsandbytes places them itself:
    `device_map`)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise UserError(f"model {path}: not a model directory (no config.json)")
    kwargs: dict[str, Any] = dict(dtype=getattr(torch, plan.regime.weights),
                                  attn_implementation=attention(plan, device, model_spec(path)),
                                  local_files_only=True, trust_remote_code=trust_remote_code)
    if plan.quantized_base:
        _need_bitsandbytes()
        kwargs.update(quantization_config=quantization_config(plan, getattr(torch, plan.regime.compute)),
                      device_map={"": device})
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"model {path}: cannot load it ({str(err).splitlines()[0]})") from None
    if plan.quantized_base:
        keep_4bit_layers_differentiable(hf_model)
    elif not on_host:
        hf_model.to(device)
    return hf_model


def _need_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"a quantized base (QLoRA, lora-8bit) needs bitsandbytes, which is not installed. "
                        f"{BNB_HINT}") from None


def _quantized_from_config(config, plan: Plan, device: str):
    """A random model in the weight dtype, saved and loaded back quantized (QLoRA / lora-8bit without a checkpoint)."""
    import torch
    from safetensors.torch import save_model

    _need_bitsandbytes()
    with tempfile.TemporaryDirectory(prefix="memplan-quantized-") as tmp:
        with torch.device(device):  # random init where it is fastest: on the GPU when there is one
            random_model = _from_config(config, plan, attention(plan, device, model_spec(config)))
        # every rank writes its own copy: save_pretrained writes on rank 0 only once a process group is up
        random_model.config.to_json_file(Path(tmp) / "config.json")
        save_model(random_model, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        del random_model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return _load(plan, Path(tmp), device)


# ---------------------------------------------------------------- what the model holds


def decoder_layers(module) -> list:
    """The decoder layers inside `module`, found by the classes transformers itself never splits
    (`_no_split_modules` of the HF model, wherever it sits in a peft / loss wrapper)."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
        if names:
            break
    return [m for m in module.modules() if type(m).__name__ in names]


def fsdp_mixed_precision_policy(plan: Plan):
    """The MixedPrecisionPolicy accelerate gives fully_shard under autocast (Plan.fsdp_mixed_precision: parameters
    gathered and gradients reduced in the compute dtype), for memplan's own FSDP wrapping to run alike; None else."""
    if not plan.fsdp_mixed_precision:
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = getattr(torch, plan.regime.compute)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=compute)


@contextlib.contextmanager
def gradient_sync(model, sync: bool) -> Iterator[None]:
    """A micro-batch's backward with (sync) or without its gradient reduction: FSDP2 through
    `set_requires_gradient_sync` (what accelerate's and transformers' no_sync do for a fully_shard model), DDP
    through its own `no_sync`."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def quant_state_tensors(model) -> list:
    """bitsandbytes keeps a 4-bit weight's absmax/code (and the nested ones), and an 8-bit weight's row statistics
    (Int8Params.SCB), outside params and buffers. A Linear4bit keeps its weight's state on the module as well, where
    it outlives the parameter FSDP replaces with its shard (bitsandbytes `fix_4bit_weight_quant_state_from_module`)."""
    import torch

    out: dict[int, torch.Tensor] = {}
    states = []
    for p in model.parameters():
        if isinstance(getattr(p, "SCB", None), torch.Tensor):
            out[id(p.SCB)] = p.SCB
        states.append(getattr(p, "quant_state", None))
    states += [getattr(m, "quant_state", None) for m in model.modules()]
    for state in states:
        while state is not None:
            out.update((id(v), v) for v in vars(state).values() if isinstance(v, torch.Tensor))
            state = getattr(state, "state2", None)
    return list(out.values())


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
