"""Model presets and ModelSpec: exact parameter counts against transformers' own models.

Every preset is built on the meta device (no memory, no weights) and its parameters are compared
with the analytic counts, line item by line item.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from memplan.catalog import families
from memplan.catalog.families import FAMILIES, SUPPORTED_MODEL_TYPES, builder
from memplan.catalog.presets import list_presets, models_dir, preset_ids, preset_info
from memplan.catalog.resolve import config_file, preset_id, resolve_model
from memplan.catalog.spec import Linear, ModelSpec, spec_from_config
from memplan.errors import UserError

from support import REPO

REQUIRED_IDS = """
llama-1-7b llama-1-13b llama-1-30b llama-1-65b llama-2-7b llama-2-13b llama-2-70b llama-3-8b llama-3-70b
llama-3.1-8b llama-3.1-70b llama-3.1-405b llama-3.2-1b llama-3.2-3b mistral-7b mixtral-8x7b
qwen2.5-0.5b qwen2.5-1.5b qwen2.5-3b qwen2.5-7b qwen2.5-14b qwen2.5-32b qwen2.5-72b
gemma-2b gemma-7b gemma-2-2b gemma-2-9b gemma-2-27b phi-3-mini tinyllama-1.1b
gpt2 gpt2-medium gpt2-large gpt2-xl opt-1.3b
qwen3-0.6b qwen3-1.7b qwen3-4b qwen3-8b qwen3-14b qwen3-32b olmo-2-7b olmo-2-13b gemma-3-1b smollm3-3b
llama-3.3-70b granite-3.3-8b phi-4
gpt-oss-20b gpt-oss-120b
deepseek-r1 qwen3-30b-a3b
""".split()


# ---------------------------------------------------------------------------------------------
# Helpers: build the real model on the meta device and read its parameters
# ---------------------------------------------------------------------------------------------


def _meta_model(config):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model


def _numel_under(params: dict[str, torch.nn.Parameter], prefix: str) -> int:
    """Parameters of the module (or the parameter) at ``prefix``."""
    return sum(p.numel() for n, p in params.items() if n == prefix or n.startswith(prefix + "."))


def _check_against_model(spec: ModelSpec, model) -> None:
    """Total, every line item, and the Linear shapes of layer 0 agree with the real model."""
    params = dict(model.named_parameters())  # shared (tied) tensors appear once, under the first name
    assert spec.params_total == sum(p.numel() for p in model.parameters())

    for item in (*spec.embedding_items, *spec.final_items, *spec.lm_head_items):
        assert _numel_under(params, item.path) == item.params, item
    assert len(model.get_submodule(spec.layer_prefix)) == spec.num_layers
    assert sorted(i for g in spec.layer_groups for i in g.indices) == list(range(spec.num_layers))
    for group in spec.layer_groups:
        for index in group.indices:  # every layer of every group: its items, its total, its linears
            layer = f"{spec.layer_prefix}.{index}"
            for item in group.items:
                assert _numel_under(params, f"{layer}.{item.path}") == item.params, (index, item)
            assert _numel_under(params, layer) == group.params, index
            _check_layer_linears(group.linears, model.get_submodule(layer), spec.traits.experts_transposed)


def _check_layer_linears(linears: tuple[Linear, ...], layer, transposed: bool = False) -> None:
    modules = [(n, m) for n, m in layer.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    dense = [lin for lin in linears if lin.kind in ("linear", "conv1d")]
    assert [lin.path for lin in dense] == [n for n, _ in modules]
    for lin in linears:
        parts = lin.path.split(".")
        assert lin.name == ".".join(parts[-2:] if lin.kind == "experts" else parts[-1:])
        if lin.kind == "linear":
            m = layer.get_submodule(lin.path)
            assert (m.in_features, m.out_features, m.bias is not None) == (lin.d_in, lin.d_out, lin.bias)
        elif lin.kind == "conv1d":
            m = layer.get_submodule(lin.path)
            assert isinstance(m, Conv1D)
            assert tuple(m.weight.shape) == (lin.d_in, lin.d_out) and (m.bias is not None) == lin.bias
        elif lin.kind == "router":
            assert tuple(layer.get_submodule(lin.path).weight.shape) == (lin.d_out, lin.d_in)
        else:  # fused experts parameter (E, d_out, d_in), or (E, d_in, d_out) stored transposed (GPT-OSS)
            dims = (lin.d_in, lin.d_out) if transposed else (lin.d_out, lin.d_in)
            assert tuple(layer.get_parameter(lin.path).shape) == (lin.count, *dims)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_preset_set_is_complete():
    ids = preset_ids()
    assert len(ids) >= 28
    assert set(REQUIRED_IDS) <= set(ids)
    assert all(pid == pid.lower() for pid in ids)
    dirs = {p.name for p in models_dir().iterdir() if p.is_dir()}
    assert dirs == set(ids)
    assert all((models_dir() / pid / "config.json").is_file() for pid in ids)


@pytest.mark.parametrize("preset", REQUIRED_IDS)
def test_preset_matches_transformers(preset):
    spec = resolve_model(preset)
    assert spec.name == preset
    config = AutoConfig.from_pretrained(models_dir() / preset)
    _check_against_model(spec, _meta_model(config))


@pytest.mark.parametrize("preset", REQUIRED_IDS)
def test_preset_config_is_hf_format(preset):
    config = json.loads((models_dir() / preset / "config.json").read_text())
    assert config["model_type"] in SUPPORTED_MODEL_TYPES
    assert config["architectures"] and config["architectures"][0].endswith(("ForCausalLM", "LMHeadModel"))
    info = preset_info(preset)
    assert info["source"] == f"https://huggingface.co/{info['hub_id']}/blob/main/config.json"
    assert info["family"] == config["model_type"]


def test_family_registry_covers_every_preset_model_type():
    """Every preset's model_type is a family, or a multimodal type (memplan.catalog.vision) whose language model's
    family may still be missing (its tests skip until it exists)."""
    from memplan.catalog.vision import WRAPPERS

    used = {preset_info(pid)["family"] for pid in preset_ids()}
    used |= {json.loads((models_dir() / pid / "config.json").read_text())["model_type"] for pid in preset_ids()}
    assert used <= set(FAMILIES) | set(WRAPPERS), sorted(used - set(FAMILIES) - set(WRAPPERS))
    assert all(callable(builder(model_type)) for model_type in FAMILIES)
    assert builder("bert") is None


def test_every_family_module_is_registered():
    modules = {p.stem for p in Path(families.__file__).parent.glob("*.py")} - {"__init__", "common"}
    assert set(FAMILIES.values()) == modules


@pytest.mark.parametrize("preset", [p for p in REQUIRED_IDS if "published_params" in preset_info(p)])
def test_published_totals(preset):
    info = preset_info(preset)
    assert info["published_source"]
    assert resolve_model(preset).params_total == info["published_params"]


def test_known_totals():
    assert resolve_model("llama-2-7b").params_total == 6_738_415_616
    tied = resolve_model("qwen2.5-0.5b")
    assert tied.tie_word_embeddings and tied.params_lm_head == 0
    assert tied.params_total == 494_032_768
    assert resolve_model("gpt2").params_total == 124_439_808


def test_spec_fields():
    llama = resolve_model("llama-3-8b")
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim) == (32, 8, 128)
    assert llama.mlp_gated and llama.norm == "rms" and llama.norms_per_layer == 2
    assert llama.layer_norm_params == 4096 and llama.position_embeddings == 0
    assert llama.linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "lm_head"]

    gemma2 = resolve_model("gemma-2-27b")
    assert (gemma2.head_dim, gemma2.norms_per_layer, gemma2.hidden_act) == (128, 4, "gelu_pytorch_tanh")
    assert resolve_model("gemma-7b").hidden_act == "gelu_pytorch_tanh"  # legacy "gelu" in config.json

    mixtral = resolve_model("mixtral")
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.intermediate_size) == (8, 2, 14336)
    assert [(lin.name, lin.kind, lin.count) for lin in mixtral.layer_linears[4:]] == [
        ("gate", "router", 1), ("experts.gate_up_proj", "experts", 8), ("experts.down_proj", "experts", 8)]

    phi3 = resolve_model("phi3-mini")
    assert [lin.name for lin in phi3.layer_linears] == ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    assert phi3.layer_linears[1].d_out == 3 * 3072

    gpt2 = resolve_model("gpt2")
    assert gpt2.norm == "layer" and gpt2.layer_norm_params == 2 * 768 and not gpt2.mlp_gated
    assert gpt2.position_embeddings == 1024 and gpt2.intermediate_size == 3072
    assert gpt2.linear_names() == ["c_attn", "c_proj", "c_fc", "lm_head"]
    assert {lin.kind for lin in gpt2.layer_linears} == {"conv1d"}

    opt = resolve_model("opt-1.3b")
    assert opt.position_embeddings == 2050 and opt.tie_word_embeddings
    assert [lin.name for lin in opt.layer_linears] == ["k_proj", "v_proj", "q_proj", "out_proj", "fc1", "fc2"]

    qwen = resolve_model("qwen2.5-7b")
    assert [lin.bias for lin in qwen.layer_linears[:4]] == [True, True, True, False]


def test_linear_params_and_breakdown():
    assert Linear("q_proj", 10, 20, True).params == 220
    assert Linear("experts", 10, 20, False, count=8).params == 1600
    spec = resolve_model("llama-2-7b")
    rows = spec.param_breakdown()
    assert rows[0] == ("embedding", "model.embed_tokens", 32000 * 4096, "vocab x hidden")
    assert sum(n for g, _, n, _ in rows if g == "layer") == spec.layer_groups[0].params
    assert len(spec.layer_groups) == 1 and spec.layer_groups[0].indices == tuple(range(32))


def test_list_presets_rows():
    rows = {row["id"]: row for row in list_presets()}
    assert set(rows) == set(preset_ids())
    row = rows["llama-2-7b"]
    assert row == {
        "id": "llama-2-7b",
        "family": "llama",
        "hub_id": "meta-llama/Llama-2-7b-hf",
        "params_total": 6_738_415_616,
        "aliases": row["aliases"],
        "source": "https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json",
    }
    assert "llama2-7b" in row["aliases"]


# ---------------------------------------------------------------------------------------------
# Defaults: configs that leave keys out get the transformers config-class defaults
# ---------------------------------------------------------------------------------------------

_SMALL = dict(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=32, intermediate_size=64)

VARIANTS = {
    "llama-minimal": dict(model_type="llama", **_SMALL),
    "llama-biases": dict(model_type="llama", attention_bias=True, mlp_bias=True, num_key_value_heads=4,
                         tie_word_embeddings=True, **_SMALL),
    "llama-head-dim": dict(model_type="llama", head_dim=16, num_key_value_heads=8, **_SMALL),
    "mistral-minimal": dict(model_type="mistral", **_SMALL),
    "mixtral-minimal": dict(model_type="mixtral", **_SMALL),
    "mixtral-experts": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=1, **_SMALL),
    "qwen2-minimal": dict(model_type="qwen2", **_SMALL),
    "qwen2-tied": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, **_SMALL),
    "gemma-minimal": dict(model_type="gemma", **_SMALL),
    "gemma-untied": dict(model_type="gemma", head_dim=32, tie_word_embeddings=False, **_SMALL),
    "gemma2-minimal": dict(model_type="gemma2", **_SMALL),
    # Phi3Config's default pad_token_id (32000) would not fit the tiny vocabulary
    "phi3-minimal": dict(model_type="phi3", pad_token_id=0, **_SMALL),
    "phi3-gqa": dict(model_type="phi3", pad_token_id=0, num_key_value_heads=8, **_SMALL),
    "gpt2-minimal": dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4),
    "gpt2-inner": dict(model_type="gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=100,
                       n_positions=77, tie_word_embeddings=False),
    "opt-minimal": dict(model_type="opt", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, ffn_dim=96),
    "opt-350m-like": dict(model_type="opt", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=32, do_layer_norm_before=False,
                          enable_bias=False),
    "qwen2_moe-minimal": dict(model_type="qwen2_moe", **_SMALL),
    "qwen2_moe-dense-layers": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, mlp_only_layers=[0], decoder_sparse_step=2,
                                   qkv_bias=False, norm_topk_prob=True, **dict(_SMALL, num_hidden_layers=5)),
    "qwen2_moe-no-experts": dict(model_type="qwen2_moe", num_experts=0, **_SMALL),
    "deepseek_v3-minimal": dict(model_type="deepseek_v3", **_SMALL),
    "deepseek_v3-moe": dict(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                            topk_group=1, moe_intermediate_size=32, n_shared_experts=2, first_k_dense_replace=1,
                            kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
                            **dict(_SMALL, num_hidden_layers=3)),
    "deepseek_v3-no-q-lora": dict(model_type="deepseek_v3", n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                  topk_group=1, q_lora_rank=None, first_k_dense_replace=0, attention_bias=True,
                                  **_SMALL),
    "deepseek_v2-minimal": dict(model_type="deepseek_v2", num_experts_per_tok=6, **_SMALL),
    "deepseek_v2-lite-like": dict(model_type="deepseek_v2", num_experts_per_tok=2, n_routed_experts=8,
                                  q_lora_rank=None, first_k_dense_replace=1, mlp_bias=True,
                                  topk_method="group_limited_greedy", n_group=2, topk_group=1,
                                  **dict(_SMALL, num_hidden_layers=3)),
    "qwen3_moe-minimal": dict(model_type="qwen3_moe", **_SMALL),
    "qwen3_moe-dense-layers": dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, head_dim=16,
                                   moe_intermediate_size=32, mlp_only_layers=[2], attention_bias=True,
                                   **dict(_SMALL, num_hidden_layers=3)),
    "opt-no-affine": dict(model_type="opt", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, ffn_dim=96, layer_norm_elementwise_affine=False),
    "qwen3-minimal": dict(model_type="qwen3", **_SMALL),
    "qwen3-bias-tied": dict(model_type="qwen3", attention_bias=True, num_key_value_heads=4, head_dim=16,
                            tie_word_embeddings=True, **_SMALL),
    "olmo2-minimal": dict(model_type="olmo2", **_SMALL),
    "olmo2-gqa-bias": dict(model_type="olmo2", attention_bias=True, num_key_value_heads=8, **_SMALL),
    "gemma3_text-minimal": dict(model_type="gemma3_text", **_SMALL),
    "gemma3_text-untied-bias": dict(model_type="gemma3_text", head_dim=32, num_key_value_heads=8, attention_bias=True,
                                    tie_word_embeddings=False, **_SMALL),
    # Gemma-3 4B/12B/27B's Hub text_config leaves vocab_size and the heads to Gemma3TextConfig's defaults
    "gemma3_text-hub-defaults": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=2,
                                     intermediate_size=96),
    "smollm3-minimal": dict(model_type="smollm3", pad_token_id=0, bos_token_id=1, eos_token_id=2, **_SMALL),
    "smollm3-biases-untied": dict(model_type="smollm3", pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  attention_bias=True, mlp_bias=True, num_key_value_heads=8,
                                  tie_word_embeddings=False, **_SMALL),
    "granite-minimal": dict(model_type="granite", **_SMALL),
    "granite-biases": dict(model_type="granite", attention_bias=True, mlp_bias=True, num_key_value_heads=4,
                           tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=16.0, **_SMALL),
    "granite-head-dim": dict(model_type="granite", head_dim=16, num_key_value_heads=8, **_SMALL),
    # Mistral-Small-3 / Ministral: head_dim 128 with hidden 5120 and 32 heads (not hidden // heads)
    "mistral-head-dim": dict(model_type="mistral", vocab_size=128, hidden_size=320, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=64),
    "gpt_oss-minimal": dict(model_type="gpt_oss", **_SMALL),
    "gpt_oss-options": dict(model_type="gpt_oss", attention_bias=False, num_local_experts=4, num_experts_per_tok=2,
                            head_dim=16, num_key_value_heads=4, tie_word_embeddings=True, **_SMALL),
    "llama4_text-minimal": dict(model_type="llama4_text", **_SMALL),
    "llama4_text-options": dict(model_type="llama4_text", attention_bias=True, use_qk_norm=False, num_local_experts=4,
                                num_experts_per_tok=2, head_dim=16, num_key_value_heads=4, tie_word_embeddings=True,
                                moe_layers=[0, 1], interleave_moe_layer_step=2, **_SMALL),
    # Maverick: dense layers (Llama4TextMLP of intermediate_size_mlp) interleaved with the MoE layers
    "llama4_text-interleaved": dict(model_type="llama4_text", interleave_moe_layer_step=2, intermediate_size_mlp=96,
                                    num_local_experts=4, **dict(_SMALL, num_hidden_layers=4)),
    "llama4_text-moe-layers": dict(model_type="llama4_text", moe_layers=[0, 3], intermediate_size_mlp=96,
                                   num_local_experts=4, **dict(_SMALL, num_hidden_layers=4)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_defaults_match_transformers(variant):
    raw = VARIANTS[variant]
    spec = spec_from_config(dict(raw), variant)
    kwargs = {k: v for k, v in raw.items() if k != "model_type"}
    _check_against_model(spec, _meta_model(AutoConfig.for_model(raw["model_type"], **kwargs)))


def test_default_values():
    assert spec_from_config(VARIANTS["llama-minimal"], "x").num_kv_heads == 32
    assert spec_from_config(VARIANTS["mistral-minimal"], "x").num_kv_heads == 8
    assert spec_from_config(VARIANTS["qwen2-minimal"], "x").num_kv_heads == 32
    gemma = spec_from_config(VARIANTS["gemma-minimal"], "x")
    assert (gemma.head_dim, gemma.num_kv_heads, gemma.tie_word_embeddings) == (256, 16, True)
    assert spec_from_config(VARIANTS["gemma2-minimal"], "x").num_kv_heads == 4
    gpt2 = spec_from_config(VARIANTS["gpt2-minimal"], "x")
    assert (gpt2.intermediate_size, gpt2.position_embeddings, gpt2.hidden_act) == (256, 1024, "gelu_new")
    granite = spec_from_config(VARIANTS["granite-minimal"], "x")
    assert (granite.num_kv_heads, granite.tie_word_embeddings, granite.traits.decoder_layer) == (
        32, False, "GraniteDecoderLayer")
    assert spec_from_config(VARIANTS["mistral-head-dim"], "x").head_dim == 128
    opt = spec_from_config(VARIANTS["opt-350m-like"], "x")
    assert opt.params_final_norm == 0 and opt.position_embeddings == 2050


_KINDS = {
    "qwen3-sliding": dict(VARIANTS["qwen3-minimal"], num_hidden_layers=4, use_sliding_window=True,
                          sliding_window=64, max_window_layers=2),
    "qwen3-window-unused": dict(VARIANTS["qwen3-minimal"], sliding_window=64),
    "gemma3_text-pattern": dict(VARIANTS["gemma3_text-minimal"], num_hidden_layers=7),
    "gemma3_text-pattern-3": dict(VARIANTS["gemma3_text-minimal"], num_hidden_layers=7, sliding_window_pattern=3),
    "smollm3-interval": dict(VARIANTS["smollm3-minimal"], num_hidden_layers=6, no_rope_layer_interval=3),
    "smollm3-sliding": dict(VARIANTS["smollm3-minimal"], num_hidden_layers=4, use_sliding_window=True,
                            sliding_window=64),
    "smollm3-listed": dict(VARIANTS["smollm3-minimal"], no_rope_layers=[0, 1]),
}


@pytest.mark.parametrize("variant", sorted(_KINDS))
def test_layer_kinds_match_transformers(variant):
    """Each layer's attention kind and whether it applies the rotary, as the config class derives them."""
    raw = _KINDS[variant]
    spec = spec_from_config(dict(raw), variant)
    config = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    assert list(spec.traits.layer_types) == list(config.layer_types)
    window = config.sliding_window if "sliding_attention" in config.layer_types else None
    assert spec.traits.sliding_window == window
    if raw["model_type"] == "smollm3":
        assert list(spec.traits.rope_layers) == [bool(r) for r in config.no_rope_layers]


def test_new_family_traits():
    gemma3 = resolve_model("gemma-3-1b")
    assert gemma3.traits.layer_types.count("full_attention") == 4 and gemma3.traits.sliding_window == 512
    assert gemma3.traits.rotary_tables == 2 and gemma3.qk_norm_widths == (256, 256)
    assert gemma3.traits.final_softcap is None and gemma3.traits.attn_softcap is None and gemma3.traits.sdpa
    olmo2 = resolve_model("olmo-2-7b")
    assert olmo2.qk_norm_widths == (4096, 4096) and not olmo2.traits.pre_norms and olmo2.norms_per_layer == 2
    assert resolve_model("qwen3-8b").qk_norm_widths == (128, 128)
    smol = resolve_model("smollm3-3b")
    assert [i for i, r in enumerate(smol.traits.rope_layers) if not r] == list(range(3, 36, 4))
    with pytest.raises(UserError, match="'no_rope_layers' must list 0 or 1 for each of the 2 layers"):
        spec_from_config(dict(VARIANTS["smollm3-minimal"], no_rope_layers=[1]), "x")


# ---------------------------------------------------------------------------------------------
# Errors from spec_from_config
# ---------------------------------------------------------------------------------------------


def test_unsupported_model_type():
    with pytest.raises(UserError, match=r"unsupported model_type 'bert'.*llama.*gpt2"):
        spec_from_config({"model_type": "bert", "hidden_size": 8}, "my-bert")
    with pytest.raises(UserError, match="no 'model_type'"):
        spec_from_config({"hidden_size": 8}, "x")


def test_missing_and_bad_keys():
    config = dict(VARIANTS["llama-minimal"])
    del config["hidden_size"]
    with pytest.raises(UserError, match=r"mine: .*missing required key 'hidden_size'"):
        spec_from_config(config, "mine")
    with pytest.raises(UserError, match="'n_embd'"):
        spec_from_config({"model_type": "gpt2", "vocab_size": 10, "n_layer": 2, "n_head": 2}, "g")
    with pytest.raises(UserError, match="'num_attention_heads' must be a positive integer"):
        spec_from_config(dict(VARIANTS["llama-minimal"], num_attention_heads="32"), "x")
    with pytest.raises(UserError, match="not divisible"):
        spec_from_config(dict(VARIANTS["llama-minimal"], hidden_size=250), "x")


def test_values_of_the_wrong_type_are_one_error():
    """A family that reads a value of the wrong type gives one line naming the model, never a traceback, and a
    layer-index list that is not one is refused rather than read as characters."""
    r1 = json.loads((models_dir() / "deepseek-r1" / "config.json").read_text())
    with pytest.raises(UserError, match=r"r1: config.json for model_type 'deepseek_v3' has a value memplan cannot "
                                        r"read \(ValueError: invalid literal"):
        spec_from_config(dict(r1, first_k_dense_replace="x"), "r1")
    moe = json.loads((models_dir() / "qwen3-30b-a3b" / "config.json").read_text())
    with pytest.raises(UserError, match="'mlp_only_layers' must be a list of layer indices, got 'x'"):
        spec_from_config(dict(moe, mlp_only_layers="x"), "q")
    assert [g.indices for g in spec_from_config(dict(moe, mlp_only_layers=[0]), "q").layer_groups][0] == (0,)


# ---------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref, preset", [
    ("llama-7b", "llama-1-7b"), ("llama-13b", "llama-1-13b"), ("llama-30b", "llama-1-30b"),
    ("llama-65b", "llama-1-65b"), ("llama2-7b", "llama-2-7b"), ("mistral-7b-v0.1", "mistral-7b"),
    ("mixtral", "mixtral-8x7b"), ("phi3-mini", "phi-3-mini"), ("tinyllama", "tinyllama-1.1b"),
    ("LLAMA-2-7B", "llama-2-7b"), ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("META-LLAMA/LLAMA-2-7B-HF", "llama-2-7b"), ("huggyllama/llama-7b", "llama-1-7b"),
    ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"), ("  gpt2  ", "gpt2"),
    ("Qwen/Qwen3-8B", "qwen3-8b"), ("Qwen/Qwen3-0.6B-Base", "qwen3-0.6b"),
    ("allenai/OLMo-2-1124-7B-Instruct", "olmo-2-7b"), ("google/gemma-3-1b-it", "gemma-3-1b"),
    ("HuggingFaceTB/SmolLM3-3B", "smollm3-3b"),
])
def test_resolve_names(ref, preset):
    assert resolve_model(ref).name == preset


@pytest.mark.parametrize("ref, preset", [
    ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b"), ("llama-3.3-70b-instruct", "llama-3.3-70b"),
    ("ibm-granite/granite-3.3-8b-instruct", "granite-3.3-8b"),
    ("mistralai/Mistral-Small-3.1-24B-Base-2503", "mistral-small-3.1-24b"),
    ("mistralai/Mistral-Small-3.1-24B-Instruct-2503", "mistral-small-3.1-24b"),
    ("google/gemma-3-4b-pt", "gemma-3-4b"), ("google/gemma-3-4b-it", "gemma-3-4b"),
    ("google/gemma-3-12b-pt", "gemma-3-12b"), ("google/gemma-3-12b-it", "gemma-3-12b"),
    ("google/gemma-3-27b-pt", "gemma-3-27b"), ("google/gemma-3-27b-it", "gemma-3-27b"),
])
def test_instruct_ids_listed_as_aliases(ref, preset):
    assert preset_id(ref) == preset and resolve_model(ref).name == preset


def test_instruct_ids_not_listed_are_not_guessed():
    """An -Instruct / -it / -Chat id resolves to a preset only where presets.yaml lists it: any other is a hub id."""
    for ref in ("meta-llama/Llama-3.1-8B-Instruct", "ibm-granite/granite-3.3-8b-base", "llama-3.1-70b-instruct",
                "google/gemma-2-9b-it", "qwen2.5-7b-chat"):
        assert preset_id(ref) is None, ref


def test_preset_id():
    assert preset_id("  LLaMA-7B ") == "llama-1-7b"
    assert preset_id("META-LLAMA/LLAMA-2-7B-HF") == "llama-2-7b"
    assert preset_id("llama-2-7b") == "llama-2-7b"
    assert preset_id("no-such-model") is None
    assert preset_id("./config.json") is None


def test_config_file(tmp_path):
    assert config_file("llama2-7b") == (models_dir() / "llama-2-7b" / "config.json", "llama-2-7b")
    (tmp_path / "config.json").write_text((models_dir() / "gpt2" / "config.json").read_text())
    assert config_file(str(tmp_path)) == (tmp_path / "config.json", str(tmp_path))
    assert config_file(str(tmp_path / "config.json")) == (tmp_path / "config.json", str(tmp_path / "config.json"))
    with pytest.raises(UserError, match="unknown model 'no-such-model'"):
        config_file("no-such-model")
    with pytest.raises(UserError, match="empty model name"):
        config_file("  ")


def test_resolve_config_file_and_directory(tmp_path):
    src = (models_dir() / "qwen2.5-0.5b" / "config.json").read_text()
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(src)
    by_dir = resolve_model(str(model_dir))
    by_file = resolve_model(str(model_dir / "config.json"))
    assert by_dir.name == str(model_dir) and by_file.name == str(model_dir / "config.json")
    assert by_dir.params_total == by_file.params_total == 494_032_768


def test_resolve_relative_path(tmp_path, monkeypatch):
    (tmp_path / "cfg.json").write_text((models_dir() / "gpt2" / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert resolve_model("cfg.json").params_total == 124_439_808
    assert resolve_model("./cfg.json").params_total == 124_439_808


def _fake_cache(root: Path, repo_id: str, snapshot: str, config: dict, ref: bool = True) -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / snapshot
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    if ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(snapshot)
    return repo


def test_resolve_hf_cache(tmp_path, monkeypatch):
    config = json.loads((models_dir() / "tinyllama-1.1b" / "config.json").read_text())
    hub = tmp_path / "hub"
    _fake_cache(hub, "acme/tiny-llama", "0123abcd", config)
    repo = _fake_cache(hub, "acme/old", "aaaa", dict(config, num_hidden_layers=1), ref=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    spec = resolve_model("acme/tiny-llama")
    assert spec.name == "acme/tiny-llama" and spec.params_total == 1_100_048_384
    assert resolve_model("acme/old").num_layers == 1  # no refs/main: the snapshot present

    # refs/main wins over a newer snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("aaaa")
    newer = repo / "snapshots" / "bbbb"
    newer.mkdir()
    (newer / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=3)))
    assert resolve_model("acme/old").num_layers == 1


def test_resolve_hf_home(tmp_path, monkeypatch):
    config = json.loads((models_dir() / "gpt2" / "config.json").read_text())
    _fake_cache(tmp_path / "hfhome" / "hub", "acme/g", "c0ffee", config)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert resolve_model("acme/g").params_total == 124_439_808


def test_unknown_name_suggests_presets():
    with pytest.raises(UserError) as err:
        resolve_model("llama7b")
    message = str(err.value)
    assert message.startswith("unknown model 'llama7b'. Closest presets: llama-1-7b (llama-7b), llama-2-7b (llama2-7b)")
    assert "memplan models" in message


def test_uncached_hub_id_in_offline_mode(tmp_path, monkeypatch):
    """Not cached, and offline (what huggingface_hub read from HF_HUB_OFFLINE at import): nothing is fetched.
    tests/catalog/test_hub.py covers the fetch itself against a stand-in Hub."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"acme/nothing is not in the HF cache \(.*\) and HF_HUB_OFFLINE is set"):
        resolve_model("acme/nothing")


def test_missing_paths(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve_model(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(UserError, match="directory without a config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="empty model name"):
        resolve_model("  ")


def test_malformed_config(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",, }')
    with pytest.raises(UserError) as err:
        resolve_model(str(tmp_path))
    assert str(bad) in str(err.value) and "malformed JSON" in str(err.value) and "line 1" in str(err.value)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        resolve_model(str(bad))


# ---------------------------------------------------------------------------------------------
# The fast path stays free of torch
# ---------------------------------------------------------------------------------------------


def _run_fresh(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter (nothing imported yet), from this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_import_does_not_load_torch():
    code = ("import sys, memplan.catalog.resolve as r, memplan.catalog.presets as p; "
            "r.resolve_model('llama-2-7b'); p.list_presets(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    result = _run_fresh(code)
    assert result.returncode == 0, result.stderr


def test_only_the_needed_family_is_imported():
    code = ("import sys, memplan.catalog.resolve as r; r.resolve_model('llama-2-7b'); "
            "loaded = sorted(m for m in sys.modules if m.startswith('memplan.catalog.families.')); "
            "assert loaded == ['memplan.catalog.families.common', 'memplan.catalog.families.llama'], loaded")
    result = _run_fresh(code)
    assert result.returncode == 0, result.stderr


def test_layer_groups_and_peft_targets_of_moe_families():
    """Qwen2-MoE's dense layers are their own group; peft's all-linear reaches the routers and expert stacks (its
    MoE conversion, for Qwen2-MoE from peft 0.22), and keeps the nn.Linear layers named like an expert projection."""
    spec = spec_from_config(VARIANTS["qwen2_moe-dense-layers"], "x")
    assert [g.indices for g in spec.layer_groups] == [(0, 2, 4), (1, 3)]  # step 2: layers 1, 3 sparse
    assert [g.experts for g in spec.layer_groups] == [0, 4] and spec.group_of(3).shared_ffn == 48
    assert {row[0] for row in spec.param_breakdown()} == {"embedding", "layers 0,2,4", "layers 1,3",
                                                           "final_norm", "lm_head"}
    assert spec.lora_target_names("all-linear") == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj", "shared_expert_gate", "gate",
                                                     "experts.gate_up_proj", "experts.down_proj"}
    mixtral = spec_from_config(VARIANTS["mixtral-minimal"], "x")
    assert mixtral.lora_target_names("all-linear") == {"q_proj", "k_proj", "v_proj", "o_proj", "gate",
                                                        "experts.gate_up_proj", "experts.down_proj"}
    assert mixtral.lora_expert_stacks() == ["experts.gate_up_proj", "experts.down_proj"]
    assert spec.lora_expert_stacks() == ["experts.gate_up_proj", "experts.down_proj"]
    assert spec.lora_target_names(["down_proj"]) == {"down_proj", "experts.down_proj"}
    deepseek = spec_from_config(VARIANTS["deepseek_v3-moe"], "x")
    assert deepseek.lora_expert_stacks(["down_proj"]) == ["experts.down_proj"]
    assert deepseek.lora_expert_stacks(["q_b_proj"]) == []


@pytest.mark.parametrize("model_type, window", [("qwen2_moe", dict(use_sliding_window=True, max_window_layers=3)),
                                                 ("qwen2_moe", {}), ("qwen3_moe", dict(use_sliding_window=True))])
def test_moe_layer_types_match_the_config_class(model_type, window):
    """Which layers slide, as the config class decides (Qwen2-MoE: the even layers below max_window_layers)."""
    raw = dict(model_type=model_type, **window, **dict(_SMALL, num_hidden_layers=5))
    spec = spec_from_config(dict(raw), "x")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    expected = getattr(config, "layer_types", None) or ["sliding_attention" if config.sliding_window else
                                                        "full_attention"] * 5
    assert list(spec.traits.layer_types) == expected


# ---------------------------------------------------------------------------------------------
# GPT-OSS: sinks and expert biases counted, LoRA targets as peft wraps them
# ---------------------------------------------------------------------------------------------


def test_gpt_oss_spec():
    spec = resolve_model("gpt-oss-20b")
    assert spec.params_total == 20_914_757_184  # the model card's 20.9B (bf16 experts)
    assert resolve_model("gpt-oss:120b").params_total == 116_829_156_672  # 116.8B
    extra = {i.path: i.params for i in spec.layer_groups[0].items[-5:]}
    assert extra["self_attn.sinks"] == 64
    assert extra["mlp.experts.gate_up_proj_bias"] == 32 * 2 * 2880
    assert extra["mlp.experts.down_proj_bias"] == 32 * 2880
    assert spec.traits.layer_types[:3] == ("sliding_attention", "full_attention", "sliding_attention")
    assert spec.traits.sliding_window == 128 and not spec.traits.sdpa
    assert spec.linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]


def test_gpt_oss_all_linear_is_what_peft_wraps():
    from peft import LoraConfig, get_peft_model

    raw = VARIANTS["gpt_oss-options"]
    spec = spec_from_config(dict(raw), "x")
    config = AutoConfig.for_model("gpt_oss", **{k: v for k, v in raw.items() if k != "model_type"})
    peft_model = get_peft_model(_meta_model(config), LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {n.split(".")[-4] for n, p in peft_model.named_parameters() if p.requires_grad and ".layers.0." in n}
    assert wrapped == set(spec.linear_names()) - {"lm_head"}
    with pytest.raises(ValueError):  # the router is not a module peft can wrap
        get_peft_model(_meta_model(config), LoraConfig(r=4, target_modules=["router"]))


def test_llama4_text_spec():
    spec = spec_from_config(dict(VARIANTS["llama4_text-minimal"], num_hidden_layers=8), "x")
    assert spec.traits.rope_layers == (True, True, True, False) * 2
    assert spec.traits.layer_types[:4] == ("chunked_attention",) * 3 + ("full_attention",)
    assert spec.linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                   "lm_head"]
    maverick = spec_from_config(dict(VARIANTS["llama4_text-minimal"], interleave_moe_layer_step=2,
                                     intermediate_size_mlp=96, num_hidden_layers=4), "maverick-like")
    dense, moe = maverick.layer_groups
    assert (dense.indices, dense.experts, dense.ffn, moe.indices, moe.experts) == ((0, 2), 0, 96, (1, 3), 16)
    mlp = {i.path: i.params for i in dense.items if i.path.startswith("feed_forward.")}
    assert mlp == {f"feed_forward.{n}": 256 * 96 for n in ("gate_proj", "up_proj", "down_proj")}
