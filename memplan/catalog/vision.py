"""Multimodal configs (a ``text_config`` and a ``vision_config``): the language model as its own family, the
vision tower and projector as frozen weights.

memplan plans fine-tuning the language model on text. The vision tower and the multimodal projector are in
memory under every method (they are loaded with the model) but are not trained: memplan assumes that full
fine-tuning freezes them (the common recipe when the language model is what is tuned), and LoRA targets the
language model only. They run no forward on text batches, so they add weights (and host / disk bytes)
but no activations, gradients or optimizer states. Under QLoRA they are assumed unquantized, in the 16-bit
weight dtype (bitsandbytes' ``llm_int8_skip_modules`` naming them, as VLM QLoRA recipes do).

Counts follow each vision model's constructor in transformers 5.x (``models/<type>/modeling_<type>.py``)
with its config class's defaults, and equal ``numel`` of the meta-device ``<Model>ForConditionalGeneration``
minus its language model (tests/catalog/test_vision.py). This module is on the estimate path: no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from memplan.catalog.spec import Cfg, ParamItem
from memplan.errors import UserError

# What every estimate of a multimodal config assumes, as the reports print it.
FROZEN_ASSUMPTION = ("the vision tower and projector are frozen weights under every method (full FT freezes "
                     "them too): counted in weights, host and disk bytes; text batches run no vision forward "
                     "(no activations); unquantized under QLoRA")


@dataclass(frozen=True)
class Wrapper:
    """How a multimodal model holds its language model and its vision parts (module paths as in the
    ``<Model>ForConditionalGeneration`` of transformers 5.x)."""

    text_default: str  # text_config's model_type when it names none (the config class's sub-config default)
    vision_default: str  # likewise for vision_config
    text_prefix: str  # the language model's base module, replacing "model" in the text family's paths
    lm_head: str
    vision: str  # the vision tower's module path
    projector: str  # the multimodal projector's module path ("" when it is inside the tower)
    flat_text: bool = False  # Hub configs may keep the text keys at the top level (Qwen2.5-VL)
    # a text_config that ties ties the model whatever the top level says (Qwen2_5_VLConfig.__post_init__: pre-v5
    # saves kept tie_word_embeddings in text_config)
    tie_from_text: bool = False
    # memplan profile builds it from its config.json (memplan.runtime.model), its text-only steps checked against
    # the estimate (tests/estimator/test_estimator_arch.py); the others it refuses (see refuse_profile)
    profiled: bool = False


WRAPPERS: dict[str, Wrapper] = {
    # Mistral3Config: text mistral (Mistral-Small-3.1), vision pixtral
    "mistral3": Wrapper("mistral", "pixtral", "model.language_model", "lm_head", "model.vision_tower",
                        "model.multi_modal_projector"),
    # Gemma3Config: text gemma3_text, vision siglip_vision_model
    "gemma3": Wrapper("gemma3_text", "siglip_vision_model", "model.language_model", "lm_head",
                      "model.vision_tower", "model.multi_modal_projector"),
    # Llama4Config: text llama4_text, vision llama4_vision_model (Llama4ForConditionalGeneration keeps a
    # whole Llama4ForCausalLM as language_model)
    "llama4": Wrapper("llama4_text", "llama4_vision_model", "language_model.model", "language_model.lm_head",
                      "vision_model", "multi_modal_projector"),
    # Qwen2_5_VLConfig: text qwen2_5_vl_text, vision qwen2_5_vl_vision (its patch merger is the projector)
    "qwen2_5_vl": Wrapper("qwen2_5_vl_text", "qwen2_5_vl_vision", "model.language_model", "lm_head",
                          "model.visual", "", flat_text=True, tie_from_text=True, profiled=True),
}


def _pair(value) -> tuple[int, int]:
    """An image or patch size given as an int or as [height, width]."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _patches(v: Cfg, image_default, patch_default) -> int:
    (ih, iw), (ph, pw) = _pair(v.opt("image_size", image_default)), _pair(v.opt("patch_size", patch_default))
    return (ih // ph) * (iw // pw)


def _linear(d_in: int, d_out: int, bias: bool) -> int:
    return d_in * d_out + (d_out if bias else 0)


def _pixtral(v: Cfg, top: Cfg, text_hidden: int) -> tuple[int, int]:
    """PixtralVisionModel: patch_conv (no bias), ln_pre (RMSNorm), layers of attention_norm, q/k/v/o
    (h x h, no bias), ffn_norm and a gated MLP (no bias). Mistral3MultiModalProjector: norm (RMSNorm of the
    vision width), patch_merger.merging_layer (h * m^2 -> h), linear_1 (h * feature layers -> text),
    linear_2 (text -> text), biases with multimodal_projector_bias."""
    h, inter = v.opt_int("hidden_size", 1024), v.opt_int("intermediate_size", 4096)
    p = _pair(v.opt("patch_size", 16))
    tower = v.opt_int("num_channels", 3) * h * p[0] * p[1] + h
    tower += v.opt_int("num_hidden_layers", 24) * (2 * h + 4 * h * h + 3 * h * inter)
    m = top.opt_int("spatial_merge_size", 2)
    layers = top.opt("vision_feature_layer", -1)
    feature_layers = 1 if isinstance(layers, int) else len(layers)
    bias = top.flag("multimodal_projector_bias", False)
    projector = h + h * m * m * h + _linear(h * feature_layers, text_hidden, bias)
    return tower, projector + _linear(text_hidden, text_hidden, bias)


def _siglip(v: Cfg, top: Cfg, text_hidden: int) -> tuple[int, int]:
    """SiglipVisionTransformer: patch_embedding (Conv2d with bias), position_embedding (one row per patch),
    encoder layers of layer_norm1/2 (LayerNorm), q/k/v/out_proj and fc1/fc2 (all with biases),
    post_layernorm, and with vision_use_head the attention-pooling head (probe, nn.MultiheadAttention,
    layernorm, MLP). Gemma3MultiModalProjector: mm_input_projection_weight (vision x text) and
    mm_soft_emb_norm (Gemma3RMSNorm of the vision width)."""
    h, inter = v.opt_int("hidden_size", 768), v.opt_int("intermediate_size", 3072)
    p = _pair(v.opt("patch_size", 16))
    mlp = _linear(h, inter, True) + _linear(inter, h, True)
    tower = v.opt_int("num_channels", 3) * h * p[0] * p[1] + h + _patches(v, 224, 16) * h
    tower += v.opt_int("num_hidden_layers", 12) * (2 * 2 * h + 4 * _linear(h, h, True) + mlp)
    tower += 2 * h
    if v.flag("vision_use_head", True):
        tower += h + _linear(h, 3 * h, True) + _linear(h, h, True) + 2 * h + mlp
    return tower, h * text_hidden + h


def _llama4(v: Cfg, top: Cfg, text_hidden: int) -> tuple[int, int]:
    """Llama4VisionModel: patch_embedding (Llama4UnfoldConvolution: C * p^2 -> h, no bias), class_embedding,
    positional_embedding_vlm (patches + 1 rows), layernorm_pre/post (LayerNorm), layers of q/k/v/o and
    fc1/fc2 (with biases) and two LayerNorms, vision_adapter (Llama4VisionMLP2: intermediate ->
    projector_input_dim, projector_output_dim -> itself, no biases). Llama4MultiModalProjector: linear_1
    (vision_output_dim -> text, no bias)."""
    h, inter = v.opt_int("hidden_size", 768), v.opt_int("intermediate_size", 5632)
    heads = v.opt_int("num_attention_heads", 16)
    attn = heads * (h // heads)
    p = _pair(v.opt("patch_size", 14))
    tower = v.opt_int("num_channels", 3) * p[0] * p[1] * h + h + (_patches(v, 448, 14) + 1) * h + 2 * 2 * h
    layer = 3 * _linear(h, attn, True) + _linear(attn, h, True) + _linear(h, inter, True) + _linear(inter, h, True)
    tower += v.opt_int("num_hidden_layers", 34) * (layer + 2 * 2 * h)
    p_out = v.opt_int("projector_output_dim", 4096)
    tower += inter * v.opt_int("projector_input_dim", 4096) + p_out * p_out
    return tower, v.opt_int("vision_output_dim", 7680) * text_hidden


def _qwen2_5_vl(v: Cfg, top: Cfg, text_hidden: int) -> tuple[int, int]:
    """Qwen2_5_VisionTransformerPretrainedModel: patch_embed (Conv3d, kernel temporal x p x p, no bias),
    blocks of norm1/norm2 (RMSNorm), attn.qkv (h -> 3h) and attn.proj, a gated MLP (all with biases), and
    the merger (ln_q RMSNorm, then h * m^2 -> h * m^2 -> out_hidden_size with biases), counted as the
    projector although it is a submodule of the tower."""
    h, inter = v.opt_int("hidden_size", 3584), v.opt_int("intermediate_size", 3420)
    p = _pair(v.opt("patch_size", 14))
    tower = v.opt_int("in_channels", 3) * h * v.opt_int("temporal_patch_size", 2) * p[0] * p[1]
    block = 2 * h + _linear(h, 3 * h, True) + _linear(h, h, True)
    block += 2 * _linear(h, inter, True) + _linear(inter, h, True)
    tower += v.opt_int("depth", 32) * block
    merged = h * v.opt_int("spatial_merge_size", 2) ** 2
    return tower, h + _linear(merged, merged, True) + _linear(merged, v.opt_int("out_hidden_size", 3584), True)


# vision_config's model_type -> (tower, projector) parameter counts
VISION_MODELS: dict[str, Callable[[Cfg, Cfg, int], tuple[int, int]]] = {
    "pixtral": _pixtral,
    "siglip_vision_model": _siglip,
    "llama4_vision_model": _llama4,
    "qwen2_5_vl_vision": _qwen2_5_vl,
}


def text_config(config: dict, name: str, wrapper: Wrapper) -> dict:
    """The language model's config.json object: text_config with its model_type (the wrapper's default when
    it names none) and the wrapper's tie_word_embeddings when config.json sets one at the top level."""
    text = config.get("text_config")
    if text is None and wrapper.flat_text:
        text = {k: v for k, v in config.items() if k not in ("vision_config", "model_type", "architectures")}
    if not isinstance(text, dict):
        raise UserError(f"{name}: config.json for model_type '{config['model_type']}' has no text_config object "
                        "(the language model's config)")
    text = dict(text)
    text["model_type"] = text.get("model_type") or wrapper.text_default
    # Where the top level says nothing, the language model's own setting (Mistral-Small-3.1's checkpoint stores
    # its lm_head: text_config unties it, though transformers 5's Mistral3Config defaults the top level to True)
    tied_by_text = wrapper.tie_from_text and text.get("tie_word_embeddings")
    if config.get("tie_word_embeddings") is not None and not tied_by_text:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return text


def vision_items(config: dict, name: str, wrapper: Wrapper, text_hidden: int) -> tuple[ParamItem, ...]:
    """The vision tower's and the projector's parameter counts, as frozen items."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise UserError(f"{name}: config.json for model_type '{config['model_type']}' has no vision_config object")
    vtype = vision.get("model_type") or wrapper.vision_default
    if vtype == "qwen2_5_vl":  # Qwen2_5_VLConfig.__post_init__: old checkpoints' vision model_type
        vtype = "qwen2_5_vl_vision"
    count = VISION_MODELS.get(vtype)
    if count is None:
        raise UserError(f"{name}: memplan cannot count the vision model '{vtype}' of this multimodal config "
                        f"(supported: {', '.join(VISION_MODELS)}); give the language model's own config.json")
    tower, projector = count(Cfg(vision, name, vtype), Cfg(config, name, config["model_type"]), text_hidden)
    if not wrapper.projector:
        return (ParamItem(wrapper.vision, tower + projector, f"{vtype} vision tower with its merger (frozen)"),)
    return (ParamItem(wrapper.vision, tower, f"{vtype} vision tower (frozen)"),
            ParamItem(wrapper.projector, projector, "multimodal projector (frozen)"))


def relocate(path: str, wrapper: Wrapper) -> str:
    """A text family's module path ("model.embed_tokens", "lm_head") inside the multimodal model."""
    if path == "lm_head":
        return wrapper.lm_head
    head, _, rest = path.partition(".")
    return f"{wrapper.text_prefix}.{rest}" if head == "model" else path


def refuse_runtime(name: str, config: dict, command: str) -> None:
    """memplan train (and profile, for a multimodal type it does not build: refuse_profile) loads the model with
    AutoModelForCausalLM and trains all of it (or LoRA on every linear layer): it cannot train a multimodal
    model as its estimate assumes (frozen vision tower, the language model trained), so it takes the language
    model's own config or checkpoint instead."""
    wrapper = WRAPPERS.get(config.get("model_type"))
    if wrapper is None:
        return
    text = text_config(config, name, wrapper)
    raise UserError(f"{name}: a multimodal '{config['model_type']}' model: memplan {command} builds a language model "
                    f"alone; give it the language model's own config.json or checkpoint (model_type "
                    f"'{text['model_type']}', this config's text_config). `memplan estimate` takes this config, "
                    "with the vision tower counted as frozen weights")


def refuse_profile(name: str, config: dict, weights: str | None, method: str) -> None:
    """memplan profile builds a multimodal model of a Wrapper.profiled type from its config.json as the estimate
    assumes (memplan.runtime.model: its <Model>ForConditionalGeneration, the vision tower and projector frozen,
    LoRA on the language model only), but not from a checkpoint, nor quantized (bitsandbytes would quantize the
    vision tower's linears too, which the estimate keeps 16-bit). Other multimodal types: refuse_runtime."""
    wrapper = WRAPPERS.get(config.get("model_type"))
    if wrapper is None:
        return
    if not wrapper.profiled:
        refuse_runtime(name, config, "profile")
    if weights is None and method not in ("qlora", "lora-8bit"):
        return
    why = "from a checkpoint (--weights)" if weights is not None else \
        {"qlora": "under QLoRA", "lora-8bit": "on an 8-bit base"}[method]
    text = text_config(config, name, wrapper)
    raise UserError(f"{name}: a multimodal '{config['model_type']}' model: memplan profile builds it from its "
                    f"config.json with the vision tower frozen, not {why}; give it the language model's own "
                    f"config.json or checkpoint (model_type '{text['model_type']}', this config's text_config) for "
                    "that")
