"""`memplan models`: the presets, the supported families (from the family registry) and the multimodal types."""

import json
import sys
import types

from memplan.catalog import families, presets
from memplan.catalog.families import FAMILIES


def test_families_listed_from_the_registry(run_cli):
    code, out, _ = run_cli("models", "--json")
    data = json.loads(out)
    assert code == 0 and set(data) == {"presets", "families", "multimodal"}
    assert [f["model_type"] for f in data["families"]] == [*FAMILIES, "*"]
    granite = next(f for f in data["families"] if f["model_type"] == "granite")
    assert granite == {"model_type": "granite", "module": "memplan.catalog.families.granite", "estimate": "analytic",
                       "about": "Granite (modeling_granite.py)"}
    mm = {m["model_type"]: m for m in data["multimodal"]}
    assert mm["mistral3"] == {"model_type": "mistral3", "language_model": "mistral", "vision_model": "pixtral",
                              "language_model_supported": True}
    code, out, _ = run_cli("models")
    assert code == 0 and "supported families (" in out
    assert any(line.split() == ["granite", "analytic", "Granite", "(modeling_granite.py)"] for line in out.splitlines())
    assert "mistral3      mistral" in out


def test_a_registered_family_appears_with_its_estimate_kind(run_cli, monkeypatch):
    """A family module that says how its estimate is made (ESTIMATE) is listed so, without touching the listing."""
    module = types.ModuleType("memplan.catalog.families.fake")
    module.__doc__ = "Fake (modeling_fake.py): a stand-in."
    module.ESTIMATE = "calibrated"
    monkeypatch.setitem(sys.modules, "memplan.catalog.families.fake", module)
    monkeypatch.setitem(families.FAMILIES, "fake", "fake")
    code, out, _ = run_cli("models", "--json")
    rows = json.loads(out)["families"]
    assert rows[-2] == {"model_type": "fake", "module": "memplan.catalog.families.fake", "estimate": "calibrated",
                        "about": "Fake (modeling_fake.py)"}


def test_an_unsupported_preset_is_listed_without_counts(run_cli, monkeypatch, tmp_path):
    (tmp_path / "future-1b").mkdir()
    (tmp_path / "future-1b" / "config.json").write_text(json.dumps({"model_type": "future", "hidden_size": 8}))
    monkeypatch.setattr(presets, "_presets", lambda: {"future-1b": {"family": "future", "aliases": []}})
    monkeypatch.setattr(presets, "models_dir", lambda: tmp_path)
    code, out, _ = run_cli("models", "--json")
    (row,) = json.loads(out)["presets"]
    assert code == 0 and row["params_total"] is None
    assert row["unsupported"].startswith("future-1b: unsupported model_type 'future'")
    code, out, _ = run_cli("models")
    assert code == 0 and "- (unsupported)" in out and "unsupported presets: future-1b: unsupported model_type" in out


def test_models_without_a_family_module_are_listed_as_calibrated(run_cli, monkeypatch, tmp_path):
    """The last family row covers every other model_type (calibrated by trace) and names the model classes
    this machine's cache already holds; an about text is its module docstring's first sentence."""
    from memplan.catalog.spec import spec_from_config

    monkeypatch.setenv("MEMPLAN_CACHE_DIR", str(tmp_path))
    code, out, _ = run_cli("models", "--json")
    rows = json.loads(out)["families"]
    assert rows[-1]["model_type"] == "*" and rows[-1]["estimate"] == "calibrated by trace"
    assert "none yet" in rows[-1]["about"]
    assert next(r for r in rows if r["model_type"] == "llama4_text")["about"] == (
        "Llama 4's text model (model_type llama4_text, Llama4ForCausalLM in modeling_llama4.py)")
    spec_from_config(dict(model_type="glm4", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, pad_token_id=0), "glm4-small")
    code, out, _ = run_cli("models")
    assert code == 0 and any(line.split()[:4] == ["*", "calibrated", "by", "trace"] and "Glm4ForCausalLM" in line
                             for line in out.splitlines())
