"""A multimodal config (text_config + vision_config) as a user meets it: estimate plans its language model and
says what it counts as frozen; profile measures a Qwen2.5-VL config as estimated (vision tower frozen) and
refuses the others, and train, which builds a language model alone, refuses it in one line."""

import json
import re

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.plan import Plan

TEXT = dict(model_type="mistral", vocab_size=1024, hidden_size=320, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, intermediate_size=640, sliding_window=None)
MISTRAL3 = dict(model_type="mistral3", architectures=["Mistral3ForConditionalGeneration"], text_config=TEXT,
                vision_config=dict(model_type="pixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, head_dim=16, patch_size=14, image_size=1540))


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MISTRAL3))
    return str(path)


@pytest.mark.parametrize("method, precision, weight_bytes", [
    ("full", "bf16", 2), ("lora", "bf16", 2), ("qlora", "bf16", 2), ("lora", "amp-bf16", 4), ("full", "fp32", 4)])
def test_frozen_vision_weights_add_to_weights_only(method, precision, weight_bytes):
    mm = spec_from_config(dict(MISTRAL3), "mm")
    text = spec_from_config(dict(TEXT), "t")
    plan = Plan(method=method, precision=precision, micro_batch=2, seq_len=256, optimizer="adamw")
    a, b = estimate(mm, plan), estimate(text, plan)
    frozen = mm.params_frozen * weight_bytes
    for phase in ("forward", "backward", "optimizer"):
        assert a.phases[phase]["weights"] - b.phases[phase]["weights"] == frozen
        assert {k: v for k, v in a.phases[phase].items() if k != "weights"} == \
               {k: v for k, v in b.phases[phase].items() if k != "weights"}
    assert a.params_trainable == b.params_trainable
    full = method == "full"
    assert a.disk["artifact_bytes"] - b.disk["artifact_bytes"] == (2 * mm.params_frozen if full else 0)
    assert a.disk["checkpoint_bytes"] - b.disk["checkpoint_bytes"] == (frozen if full else 0)


def test_frozen_weights_are_sharded_and_offloaded_like_the_others():
    mm = spec_from_config(dict(MISTRAL3), "mm")
    text = spec_from_config(dict(TEXT), "t")
    plan = Plan(method="full", precision="bf16-master", gpus=4, sharding="deepspeed", zero=3)
    a, b = estimate(mm, plan), estimate(text, plan)
    assert a.phases["optimizer"]["weights"] - b.phases["optimizer"]["weights"] == pytest.approx(
        2 * mm.params_frozen / 4, abs=1)
    offload = plan.model_copy(update=dict(offload="optimizer+params"))
    a, b = estimate(mm, offload), estimate(text, offload)
    assert a.host_offload_bytes - b.host_offload_bytes == pytest.approx(2 * mm.params_frozen, abs=4)
    # on the GPU only the decoder's persistent parameters (norms), whole: the vision tower is offloaded too
    from memplan.estimator.sharding import _persistent_bytes

    assert a.phases["optimizer"]["weights"] == b.phases["optimizer"]["weights"] == _persistent_bytes(text, offload, 2)


def test_estimate_says_what_is_frozen(run_cli, config):
    code, out, _ = run_cli("estimate", "--model", config, "--method", "lora", "--gpu-memory", "24GiB")
    assert code == 0
    assert "multimodal (mistral3): the counts above are its mistral language model; + 246,912 frozen" in out
    assert "model.vision_tower 107,584, model.multi_modal_projector 139,328" in out
    assert "frozen weights under every method (full FT freezes them too)" in out
    code, out, _ = run_cli("estimate", "--model", config, "--gpu-memory", "24GiB")
    assert code == 0 and "multimodal (mistral3)" in out.splitlines()[1]


def test_estimate_json_names_the_frozen_parts(run_cli, config):
    for args in (("--method", "lora"), ()):
        code, out, _ = run_cli("estimate", "--model", config, "--gpu-memory", "24GiB", "--json", *args)
        model = json.loads(out)["model"]
        assert code == 0 and model["multimodal"] == "mistral3" and model["language_model"] == "mistral"
        assert model["params_frozen"] == 246_912 == sum(p["params"] for p in model["frozen"])
        assert [p["module"] for p in model["frozen"]] == ["model.vision_tower", "model.multi_modal_projector"]
        assert "unquantized under QLoRA" in model["frozen_assumption"]


QWEN_VL = dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], vocab_size=8192,
               hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vision_config=dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4,
                                                         out_hidden_size=512, fullatt_block_indexes=[1]))


def test_profile_measures_a_multimodal_config_as_estimated(run_cli, tmp_path):
    """profile builds Qwen2_5_VLForConditionalGeneration with its vision tower frozen and LoRA on the language
    model only, and measures what the estimate plans (a text-only batch)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN_VL))
    code, out, _ = run_cli("profile", "--model", str(path), "--backend", "trace", "--method", "lora",
                           "--batch-size", "2", "--seq-len", "256", "--steps", "2", "--json")
    assert code == 0
    doc = json.loads(out)
    model = doc["model"]
    assert model["multimodal"] == "qwen2_5_vl" and model["language_model"] == "qwen2_5_vl_text"
    assert [p["module"] for p in model["frozen"]] == ["model.visual"]
    result = doc["results"][0]
    assert set(result["measured"]["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert all(-2.0 <= err <= 3.0 for err in result["phase_error_pct"].values()), result["phase_error_pct"]
    assert "within memplan's goal" in doc["profile"]["verdict"]


def test_profile_refuses_a_multimodal_config_it_does_not_build(run_cli, config):
    code, out, err = run_cli("profile", "--model", config, "--backend", "trace")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        f"memplan: error: {config}: a multimodal 'mistral3' model: memplan profile builds a language model alone; "
        "give it the language model's own config.json or checkpoint (model_type 'mistral', this config's "
        "text_config). `memplan estimate` takes this config, with the vision tower counted as frozen weights"]


@pytest.mark.parametrize("args, why", [(("--method", "qlora"), "under QLoRA"),
                                       (("--weights", "CKPT"), r"from a checkpoint \(--weights\)")])
def test_profile_refuses_a_multimodal_checkpoint_or_qlora(run_cli, tmp_path, args, why):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN_VL))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(QWEN_VL))
    args = tuple(str(ckpt) if a == "CKPT" else a for a in args)
    code, out, err = run_cli("profile", "--model", str(path), "--backend", "cpu", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"memplan: error: {re.escape(str(path))}: a multimodal 'qwen2_5_vl' model: memplan profile builds it from "
        rf"its config.json with the vision tower frozen, not {why}; give it the language model's own config.json "
        r"or checkpoint \(model_type 'qwen2_5_vl_text', this config's text_config\) for that", lines[0]), lines


def test_train_refuses_a_multimodal_checkpoint(run_cli, tmp_path, config):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(MISTRAL3))
    (ckpt / "model.safetensors").write_bytes(b"")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"model: {ckpt}\nmethod: lora\ndevice: cpu\n")
    code, _, err = run_cli("train", str(plan), "--dry-run")
    assert code == 2
    assert f"memplan: error: {ckpt}: a multimodal 'mistral3' model: memplan train builds a language model alone" in err
