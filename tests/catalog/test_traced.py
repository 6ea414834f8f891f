"""model_types without a family module: the ModelSpec read from transformers' model on the meta device.

Counts against the model itself (test_models' line-item checks), the one-line errors for configs
transformers cannot build as a decoder-only causal LM, and the cache that makes the next run torch-free.
"""

from __future__ import annotations

import json

import pytest
from test_models import _check_against_model, _meta_model
from transformers import AutoConfig

from memplan.catalog import traced
from memplan.catalog.spec import spec_from_config
from memplan.errors import UserError

from support import run_torch_free

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "cohere2": dict(SMALL, model_type="cohere2"),  # tied, LayerNorm without bias
    "glm4": dict(SMALL, model_type="glm4"),  # fused gate_up_proj, sandwich norms
    "starcoder2": dict(SMALL, model_type="starcoder2"),  # biases, LayerNorm with bias, tied
    "exaone4": dict(SMALL, model_type="exaone4"),  # q/k norms of head_dim
    "seed_oss": dict(SMALL, model_type="seed_oss", attention_bias=True),
    "olmoe": dict(SMALL, model_type="olmoe", num_experts=8, num_experts_per_tok=2,
                  intermediate_size=128),  # fused expert stacks, a router module
    "glm4-defaults": {"model_type": "glm4"},
    "starcoder2-defaults": {"model_type": "starcoder2"},
}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _hf(config: dict):
    data = dict(config)
    return AutoConfig.for_model(data.pop("model_type"), **data)


@pytest.mark.parametrize("name", CONFIGS)
def test_counts_match_transformers(name):
    spec = spec_from_config(dict(CONFIGS[name]), name)
    assert spec.traits.calibrated
    _check_against_model(spec, _meta_model(_hf(CONFIGS[name])))


def test_moe_stacks_and_router_are_lora_targets():
    spec = spec_from_config(dict(CONFIGS["olmoe"]), "olmoe")
    kinds = {lin.name: (lin.kind, lin.count, lin.d_in, lin.d_out) for lin in spec.layer_linears}
    assert kinds["gate"] == ("router", 1, 256, 8)
    assert kinds["experts.gate_up_proj"] == ("experts", 8, 256, 256)
    assert kinds["experts.down_proj"] == ("experts", 8, 128, 256)
    assert (spec.num_experts, spec.experts_per_token) == (8, 2)


def test_lora_targets_are_the_layer_linears():
    spec = spec_from_config(dict(CONFIGS["starcoder2"]), "starcoder2")
    assert spec.linear_names() == ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj", "lm_head"]
    assert all(lin.bias for lin in spec.layer_linears)


@pytest.mark.parametrize("config, match", [
    ({"model_type": "no-such-model"}, "transformers .* cannot build it as a causal LM"),
    ({"model_type": "t5"}, "transformers .* cannot build it as a causal LM"),
    ({"model_type": "bert"}, "BertLMHeadModel is not a decoder-only model"),
    ({"model_type": "glm4", "auto_map": {"AutoModelForCausalLM": "m.M"}}, "only with --trust-remote-code"),
])
def test_what_transformers_cannot_build_is_one_error(config, match):
    with pytest.raises(UserError, match=f"x: unsupported model_type .{config['model_type']}.: .*{match}"):
        spec_from_config(config, "x")


def test_cli_unbuildable_config_exits_2(run_cli, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "t5"}))
    rc, out, err = run_cli("estimate", "--model", str(path), "--method", "lora")
    assert rc == 2 and out == ""
    assert err.startswith("memplan: error: ") and err.count("\n") == 1 and "unsupported model_type 't5'" in err


def test_remote_code_with_the_flag_reads_the_directory(tmp_path):
    """--trust-remote-code: the config is read from the model's directory (here its code is transformers')."""
    config = dict(CONFIGS["glm4"], auto_map={"AutoConfig": "configuration_glm4.Glm4Config"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    traced.trust_remote_code(True)
    try:
        with pytest.raises(UserError, match="cannot build it as a causal LM"):  # no configuration_glm4.py there
            spec_from_config(config, "x", source=tmp_path / "config.json")
    finally:
        traced.trust_remote_code(False)


def test_cached_spec_needs_neither_torch_nor_transformers(cache_dir):
    spec = spec_from_config(dict(CONFIGS["exaone4"]), "exaone4")
    out = run_torch_free("from memplan.catalog.spec import spec_from_config\n"
                         f"s = spec_from_config({CONFIGS['exaone4']!r}, 'exaone4')\n"
                         "print(s.params_total, len(s.layer_groups[0].items), s.traits.calibrated)", cache_dir)
    assert out.split() == [str(spec.params_total), str(len(spec.layer_groups[0].items)), spec.traits.calibrated]


def test_cli_trust_remote_code_flag(run_cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(CONFIGS["glm4"], auto_map={"AutoConfig": "c.C"})))
    rc, _, err = run_cli("estimate", "--model", str(tmp_path), "--method", "lora")
    assert rc == 2 and "only with --trust-remote-code" in err
    rc, _, err = run_cli("estimate", "--model", str(tmp_path), "--method", "lora", "--trust-remote-code")
    assert rc == 2 and "--trust-remote-code" not in err and "cannot build it" in err  # no c.py in the directory
    rc, _, err = run_cli("estimate", "--model", str(tmp_path), "--method", "lora")
    assert rc == 2 and "only with --trust-remote-code" in err  # the flag holds for one command


def test_an_unwritable_cache_still_serves_this_process(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be created
    spec = spec_from_config(dict(CONFIGS["glm4"]), "glm4")
    assert spec_from_config(dict(CONFIGS["glm4"]), "glm4").params_total == spec.params_total
    assert not (blocker / "cache").exists()


@pytest.mark.parametrize("config", [
    dict(model_type="mpt", d_model=256, n_heads=4, n_layers=2, vocab_size=1000),
    dict(model_type="bloom", hidden_size=256, n_head=4, n_layer=2, vocab_size=1000),
], ids=["mpt", "bloom"])
def test_attention_the_model_class_lacks_is_in_its_traits(config):
    """MPT and BLOOM have neither an SDPA nor a flash-attention path (_supports_sdpa / _supports_flash_attn):
    the estimate runs eager for an sdpa plan and recommend's search never offers flash."""
    spec = spec_from_config(dict(config), config["model_type"])
    assert (spec.traits.sdpa, spec.traits.flash) == (False, False)
    llama = spec_from_config(dict(CONFIGS["glm4"]), "glm4")
    assert (llama.traits.sdpa, llama.traits.flash) == (True, True)
