"""QLoRA on the CPU: bitsandbytes' 4-bit NF4 base, LoRA trained on top, adapter loadable by peft."""

import json

import pytest
import torch

from test_train_support import one_thread, run_dir, tiny  # noqa: F401  (fixtures)


@pytest.mark.usefixtures("one_thread")
def test_qlora_trains_on_the_cpu(tmp_path, tiny, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plan = run_dir(tmp_path, tiny, method="qlora", precision="bf16", micro_batch=2, grad_accum=1,
                   lora={"rank": 4, "dropout": 0.0},
                   hparams={"lr": 2e-2, "max_steps": 4, "eval_every": 4, "eval_samples": 1, "warmup_steps": 0})
    code, out, err = run_cli("train", str(plan), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["method"] == "qlora"
    assert summary["eval_last"]["eval_loss"] < summary["eval_first"]["eval_loss"]
    base = AutoModelForCausalLM.from_pretrained(tiny[0])
    model = PeftModel.from_pretrained(base, plan.parent / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it was trained
    assert torch.isfinite(model(torch.tensor([[1, 50, 60]])).logits).all()
