"""Without the torch extra, estimate and recommend work and the commands that need it say which extra to
install, in one line. The missing packages are hidden from a subprocess by an import hook."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO

HIDE = """
import importlib.abc, sys
HIDDEN = set(sys.argv.pop(1).split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from memplan.cli import main
sys.argv[0] = "memplan"
main()
"""
TORCH_STACK = "torch,transformers,accelerate,peft,safetensors,tokenizers,bitsandbytes,matplotlib,numpy"


def memplan_without(hidden: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE, hidden, *args], cwd=cwd, capture_output=True, text=True)


def test_estimate_and_recommend_need_no_torch(tmp_path):
    est = memplan_without(TORCH_STACK, "estimate", "--model", "llama-7b", "--gpus", "4", "--json")
    assert est.returncode == 0, est.stderr
    assert json.loads(est.stdout)["results"]
    rec = memplan_without(TORCH_STACK, "recommend", "--model", "demo-tiny", "--gpus", "1", "--data",
                          str(REPO / "data/demo/train.jsonl"), "-o", str(tmp_path / "plan"), "--json")
    assert rec.returncode == 0, rec.stderr
    # the demo model ships a tokenizer, which needs transformers: the lengths are approximated, and it says so
    assert "transformers is not installed" in json.loads(rec.stdout)["data"]["tokenizer"]
    assert (tmp_path / "plan" / "plan.yaml").is_file()


@pytest.mark.parametrize("args, needs", [
    (["profile", "--model", "demo-tiny", "--backend", "cpu"], "memplan profile needs torch"),
    (["train", "PLAN.yaml"], "memplan train needs torch"),
])
def test_the_torch_commands_name_the_extra(args, needs):
    out = memplan_without(TORCH_STACK, *args)
    assert out.returncode == 2 and out.stdout == ""
    line, = out.stderr.strip().splitlines()
    assert line.startswith(f"memplan: error: {needs}") and "pip install 'memplan[torch]'" in line


def test_a_model_without_a_family_module_names_the_extra(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "some_new_lm", "vocab_size": 1000, "hidden_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 4}))
    out = memplan_without(TORCH_STACK, "estimate", "--model", str(config), cwd=tmp_path)
    assert out.returncode == 2
    line, = out.stderr.strip().splitlines()
    assert "model_type 'some_new_lm' has no family module" in line and "pip install 'memplan[torch]'" in line


def test_plot_names_its_extra_before_searching(tmp_path):
    out = memplan_without("matplotlib", "recommend", "--model", "demo-tiny", "--gpus", "1", "--dataset-size", "100",
                          "--plot", str(tmp_path / "plans.png"))
    assert out.returncode == 2
    line, = out.stderr.strip().splitlines()
    assert line == "memplan: error: --plot needs matplotlib, not installed here: pip install 'memplan[plot]'"
