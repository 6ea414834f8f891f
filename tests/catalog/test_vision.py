"""Multimodal configs: the language model counted as its own family, the vision tower and projector as frozen
weights, each against transformers' meta-device <Model>ForConditionalGeneration."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from memplan.catalog import vision
from memplan.catalog.families import FAMILIES
from memplan.catalog.spec import ModelSpec, spec_from_config
from memplan.errors import UserError

MISTRAL_TEXT = dict(model_type="mistral", vocab_size=128, hidden_size=320, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=64,
                    sliding_window=None)
PIXTRAL = dict(model_type="pixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, head_dim=16, patch_size=14, image_size=1540)
GEMMA3_TEXT = dict(model_type="gemma3_text", vocab_size=128, hidden_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=64, intermediate_size=64)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, image_size=896, patch_size=14, vision_use_head=False)
LLAMA4_TEXT = dict(model_type="llama4_text", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64,
                   intermediate_size_mlp=96, num_local_experts=2)
LLAMA4_VISION = dict(model_type="llama4_vision_model", hidden_size=64, intermediate_size=96,
                     num_hidden_layers=2, num_attention_heads=4, vision_output_dim=128, projector_input_dim=128,
                     projector_output_dim=128, image_size=336, patch_size=14)
QWEN_TEXT = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64)
QWEN_VISION = dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=64,
                   fullatt_block_indexes=[1])

# (multimodal config, whether its language model's family is needed to count it)
CONFIGS = {
    "mistral3-small": dict(model_type="mistral3", text_config=MISTRAL_TEXT, vision_config=PIXTRAL),
    "mistral3-bias-layers": dict(model_type="mistral3", text_config=dict(MISTRAL_TEXT, model_type=None),
                                 vision_config=PIXTRAL, multimodal_projector_bias=True,
                                 vision_feature_layer=[-1, -2], spatial_merge_size=1, tie_word_embeddings=True),
    "mistral3-default-vision": dict(model_type="mistral3", text_config=MISTRAL_TEXT, vision_config={}),
    "gemma3-small": dict(model_type="gemma3", text_config=GEMMA3_TEXT, vision_config=SIGLIP, mm_tokens_per_image=64),
    "gemma3-default-vision": dict(model_type="gemma3", text_config=GEMMA3_TEXT, vision_config={}),
    "llama4-small": dict(model_type="llama4", text_config=LLAMA4_TEXT, vision_config=LLAMA4_VISION),
    "llama4-default-vision": dict(model_type="llama4", text_config=LLAMA4_TEXT, vision_config={}),
    "qwen2_5_vl-flat": dict(model_type="qwen2_5_vl", **QWEN_TEXT, vision_config=QWEN_VISION),
    "qwen2_5_vl-default-vision": dict(model_type="qwen2_5_vl", **QWEN_TEXT, vision_config={}),
    # Qwen2.5-VL-3B ties its embeddings
    "qwen2_5_vl-tied": dict(model_type="qwen2_5_vl", **QWEN_TEXT, tie_word_embeddings=True, vision_config=QWEN_VISION),
    # a pre-v5 save: tie_word_embeddings inside text_config ties the model (Qwen2_5_VLConfig.__post_init__)
    "qwen2_5_vl-nested-tied": dict(model_type="qwen2_5_vl", text_config=dict(QWEN_TEXT, tie_word_embeddings=True),
                                   tie_word_embeddings=False, vision_config=QWEN_VISION),
    # Qwen2_5_VLTextConfig's defaults: vocabulary 152,064, 8 kv heads
    "qwen2_5_vl-text-defaults": dict(model_type="qwen2_5_vl", hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=8, intermediate_size=64, vision_config=QWEN_VISION),
    # Qwen2_5_VLAttention ignores head_dim: hidden // heads; layers from max_window_layers on slide
    "qwen2_5_vl-head-dim-window": dict(model_type="qwen2_5_vl", **QWEN_TEXT, head_dim=128, use_sliding_window=True,
                                       sliding_window=64, max_window_layers=1, vision_config=QWEN_VISION),
}


def _meta(config: dict, spec_tie: bool | None = None):
    kwargs = {k: v for k, v in config.items() if k != "model_type"}
    if isinstance(kwargs.get("text_config"), dict):
        kwargs["text_config"] = {k: v for k, v in kwargs["text_config"].items() if v is not None}
    if spec_tie is not None:
        # memplan ties as the language model's config says unless config.json sets the top level (see vision.py)
        kwargs["tie_word_embeddings"] = spec_tie
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(config["model_type"], **kwargs))
    model.tie_weights()
    return model


def _numel_under(params: dict, prefix: str) -> int:
    return sum(p.numel() for n, p in params.items() if n == prefix or n.startswith(prefix + "."))


def _text_supported(config: dict) -> bool:
    wrapper = vision.WRAPPERS[config["model_type"]]
    return vision.text_config(config, "x", wrapper)["model_type"] in FAMILIES


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_vision_tower_and_projector_match_transformers(variant):
    config = CONFIGS[variant]
    wrapper = vision.WRAPPERS[config["model_type"]]
    text = vision.text_config(config, variant, wrapper)
    params = dict(_meta(config).named_parameters())
    items = vision.vision_items(config, variant, wrapper, text["hidden_size"])
    for item in items:
        assert _numel_under(params, item.path) == item.params, item
    language = {n for n in params if n.startswith((wrapper.text_prefix + ".", wrapper.lm_head))}
    assert sum(i.params for i in items) == sum(p.numel() for n, p in params.items() if n not in language)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_multimodal_spec_matches_transformers(variant):
    config = CONFIGS[variant]
    if not _text_supported(config):
        wrapper = vision.WRAPPERS[config["model_type"]]
        text_type = vision.text_config(config, variant, wrapper)["model_type"]
        pytest.skip(f"the language model's model_type {text_type} is not a memplan family")
    spec = spec_from_config(dict(config), variant)
    params = dict(_meta(config, spec.tie_word_embeddings).named_parameters())
    assert spec.params_total + spec.params_frozen == sum(p.numel() for p in params.values())
    for item in (*spec.embedding_items, *spec.final_items, *spec.lm_head_items, *spec.frozen_items):
        assert _numel_under(params, item.path) == item.params, item
    for group in spec.layer_groups:
        for item in group.items:
            assert _numel_under(params, f"{spec.layer_prefix}.{group.indices[0]}.{item.path}") == item.params, item
    assert spec.wrapper == config["model_type"] and spec.model_type != spec.wrapper


@pytest.mark.parametrize("variant", sorted(v for v in CONFIGS if v.startswith("qwen2_5_vl")))
def test_qwen2_5_vl_text_reads_the_config_as_transformers(variant):
    """Ties, layer kinds, window and head_dim as Qwen2_5_VLConfig derives them (no override of the top level)."""
    config = CONFIGS[variant]
    spec = spec_from_config(dict(config), variant)
    hf = AutoConfig.for_model("qwen2_5_vl", **{k: v for k, v in config.items() if k != "model_type"})
    text = hf.text_config
    assert spec.tie_word_embeddings == hf.tie_word_embeddings
    assert list(spec.traits.layer_types) == list(text.layer_types)
    assert spec.traits.sliding_window == (text.sliding_window if "sliding_attention" in text.layer_types else None)
    assert (spec.vocab_size, spec.num_kv_heads) == (text.vocab_size, text.num_key_value_heads)
    assert spec.head_dim == text.hidden_size // text.num_attention_heads
    assert spec.traits.rotary_per_sequence and spec.traits.decoder_layer == "Qwen2_5_VLDecoderLayer"


def test_mistral3_spec_is_its_language_model():
    spec = spec_from_config(dict(CONFIGS["mistral3-small"]), "m")
    text = spec_from_config(dict(MISTRAL_TEXT), "t")
    assert isinstance(spec, ModelSpec) and spec.model_type == "mistral" and spec.head_dim == 128
    assert spec.params_total == text.params_total and spec.layer_linears == text.layer_linears
    assert not spec.tie_word_embeddings  # text_config's own setting: the checkpoint keeps its lm_head
    assert spec.layer_prefix == "model.language_model.layers"
    assert [i.path for i in spec.frozen_items] == ["model.vision_tower", "model.multi_modal_projector"]
    assert text.params_frozen == 0 and text.wrapper == ""


def test_gemma3_needs_the_gemma3_text_family():
    if "gemma3_text" in FAMILIES:
        spec = spec_from_config(dict(CONFIGS["gemma3-small"]), "g")
        assert spec.model_type == "gemma3_text" and spec.params_frozen > 0
    else:
        with pytest.raises(UserError, match=r"g: unsupported model_type 'gemma3_text' \(the language model of this "
                                            r"'gemma3' config; supported: .*mistral"):
            spec_from_config(dict(CONFIGS["gemma3-small"]), "g")


def test_multimodal_config_errors():
    with pytest.raises(UserError, match=r"m: config.json for model_type 'mistral3' has no text_config object"):
        spec_from_config({"model_type": "mistral3", "vision_config": PIXTRAL}, "m")
    with pytest.raises(UserError, match=r"m: config.json for model_type 'mistral3' has no vision_config object"):
        spec_from_config({"model_type": "mistral3", "text_config": MISTRAL_TEXT}, "m")
    with pytest.raises(UserError, match=r"m: memplan cannot count the vision model 'clip_vision_model' of this "
                                        r"multimodal config \(supported: pixtral, siglip_vision_model"):
        spec_from_config({"model_type": "mistral3", "text_config": MISTRAL_TEXT,
                          "vision_config": {"model_type": "clip_vision_model"}}, "m")


# preset: (total of the meta-device <Model>ForConditionalGeneration, its language model, vision tower + projector,
# (head_dim, heads, hidden)). Gemma-3's totals are keras-hub's published ones for the same architectures
# (medgemma_4b, medgemma_instruct_27b); its text models are keras-hub's gemma3_*_text totals + 64 x hidden
# (keras-hub's text presets drop the 64 unused vocabulary rows of the 262,208). Qwen2.5-VL's language models are
# Qwen2.5-7B's and -3B's published totals (their presets' published_params).
MULTIMODAL_PRESETS = {
    "qwen2.5-vl-7b": (8_292_166_656, 7_615_616_512, 676_550_144, (128, 28, 3584)),
    "qwen2.5-vl-3b": (3_754_622_976, 3_085_938_688, 668_684_288, (128, 16, 2048)),
    "mistral-small-3.1-24b": (24_011_361_280, 23_572_403_200, 438_958_080, (128, 32, 5120)),
    "gemma-3-4b": (4_300_079_472, 3_880_099_328 + 64 * 2560, 419_816_304, (256, 8, 2560)),
    "gemma-3-12b": (12_187_325_040, 11_765_788_416 + 64 * 3840, 421_290_864, (256, 16, 3840)),
    "gemma-3-27b": (27_432_406_640, 27_009_002_240 + 64 * 5376, 423_060_336, (128, 32, 5376)),
}


@pytest.mark.parametrize("preset", sorted(MULTIMODAL_PRESETS))
def test_multimodal_preset_matches_transformers(preset):
    """The preset's language model and frozen parts against its <Model>ForConditionalGeneration on the meta
    device (tied as memplan reads it: Mistral-Small's checkpoint keeps its own lm_head, Gemma-3 ties)."""
    from memplan.catalog.presets import preset_config
    from memplan.catalog.resolve import resolve_model
    from memplan.catalog.spec import read_config

    total, language, frozen, dims = MULTIMODAL_PRESETS[preset]
    spec = resolve_model(preset)
    config = read_config(preset_config(preset))
    params = dict(_meta(config, spec.tie_word_embeddings).named_parameters())
    assert spec.params_total + spec.params_frozen == sum(p.numel() for p in params.values()) == total
    assert (spec.params_total, spec.params_frozen) == (language, frozen)
    wrapper = vision.WRAPPERS[config["model_type"]]
    assert spec.params_frozen == _numel_under(params, wrapper.vision) + _numel_under(params, wrapper.projector)
    for item in (*spec.embedding_items, *spec.final_items, *spec.lm_head_items, *spec.frozen_items):
        assert _numel_under(params, item.path) == item.params, item
    for group in spec.layer_groups:
        for item in group.items:
            assert _numel_under(params, f"{spec.layer_prefix}.{group.indices[0]}.{item.path}") == item.params, item
    assert (spec.head_dim, spec.num_heads, spec.hidden_size) == dims


def test_gemma3_presets_read_the_hub_layout():
    """Gemma-3's Hub config.json leaves vocab_size (and for 4B the heads) to Gemma3TextConfig's defaults."""
    from memplan.catalog.presets import preset_config
    from memplan.catalog.resolve import resolve_model
    from memplan.catalog.spec import read_config

    text = read_config(preset_config("gemma-3-4b"))["text_config"]
    assert "vocab_size" not in text and "num_attention_heads" not in text
    spec = resolve_model("google/gemma-3-4b-it")
    assert spec.name == "gemma-3-4b" and spec.wrapper == "gemma3" and spec.model_type == "gemma3_text"
    assert (spec.vocab_size, spec.num_heads, spec.num_kv_heads, spec.tie_word_embeddings) == (262_208, 8, 4, True)
    assert spec.traits.sliding_window == 1024 and spec.traits.layer_types.count("full_attention") == 34 // 6


def test_multimodal_estimate_stays_torch_free():
    import subprocess
    import sys

    code = ("import sys\n"
            "from memplan.catalog.resolve import resolve_model\n"
            "from memplan.estimator import estimate\n"
            "from memplan.plan import Plan\n"
            "spec = resolve_model('mistral-small-3.1-24b')\n"
            "estimate(spec, Plan(method='lora'))\n"
            "assert spec.params_frozen and 'torch' not in sys.modules and 'transformers' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
