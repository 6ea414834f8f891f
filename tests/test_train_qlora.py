"""QLoRA on the CPU: bitsandbytes' 4-bit NF4 base, LoRA trained on top, adapter loadable by peft."""

import json

import pytest
import torch

from test_train_support import build_tiny_model, one_thread, run_dir, tiny  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny):  # noqa: F811
    """The tiny task's data with a 64-wide model: every layer of it fits bitsandbytes' CPU 4-bit packing
    (input widths multiples of 64, output widths of 32; the 32-wide tiny model's do not)."""
    model = build_tiny_model(tmp_path_factory.mktemp("wide"), width=64, name="wide-llama")
    return model, tiny[1]


def qlora_plan(tmp_path, model_and_data):
    return run_dir(tmp_path, model_and_data, method="qlora", precision="bf16", micro_batch=2, grad_accum=1,
                   lora={"rank": 4, "dropout": 0.0},
                   hparams={"lr": 2e-2, "max_steps": 4, "eval_every": 4, "eval_samples": 1, "warmup_steps": 0})


@pytest.mark.usefixtures("one_thread")
def test_qlora_trains_on_the_cpu(tmp_path, wide, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = qlora_plan(tmp_path, wide)
    code, out, err = run_cli("train", str(plan), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "qlora"
    assert summary["eval_last"]["eval_loss"] < summary["eval_first"]["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(wide[0])
    model = PeftModel.from_pretrained(base, plan.parent / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it was trained
    assert torch.isfinite(model(torch.tensor([[1, 50, 60]])).logits).all()


@pytest.mark.parametrize("command", ["train", "estimate", "profile"])
def test_qlora_on_the_cpu_refuses_layers_too_narrow_for_4bit_packing(tmp_path, tiny, run_cli, command):  # noqa: F811
    plan = qlora_plan(tmp_path, tiny)
    args = ["train", str(plan)] if command == "train" else [command, "--config", str(plan)]
    code, out, err = run_cli(*args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "multiple of 64" in lines[0] and "k_proj 32->16" in lines[0] and "--method lora" in lines[0]
