"""Two CPU processes (torchrun, gloo) under FSDP with LoRA: same losses as one process at the same effective batch,
and a loadable adapter. Tolerance: 1e-5 relative in fp32 (float32 sums in another order). DDP and FSDP with
bf16-master and full fine-tuning: test_train_precision.py."""

import subprocess
import sys

import pytest
import torch

from helpers import SUBPROCESS_ENV, metrics, run_dir, train_here

SETTINGS = dict(method="lora", precision="fp32", hparams={"max_steps": 6, "eval_every": 3, "eval_samples": 2},
                lora={"rank": 4, "dropout": 0.0})


def _curve(plan):
    return {(r["step"], k): r[k] for r in metrics(plan.parent) for k in ("loss", "eval_loss", "eval_accuracy")
            if k in r}


# FSDP (FULL_SHARD) with LoRA in fp32, whose exact-match generation runs through the inner model of the sharded
# root. It runs at the dependency floors too (.ci/run): the one place FSDP2 trains, in the units accelerate
# (>= 1.15) makes (memplan.runtime.fsdp).
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.floors
def test_two_processes_match_one(tmp_path, tiny):
    # micro_batch 4 on one process = micro_batch 2 on each of two
    single = run_dir(tmp_path / "one", tiny, micro_batch=4, **SETTINGS)
    train_here(single)
    plan = run_dir(tmp_path / "two", tiny, micro_batch=2, gpus=2, sharding="fsdp", zero=3, **SETTINGS)
    done = subprocess.run([sys.executable, "-m", "memplan", "train", str(plan), "--quiet"], capture_output=True,
                          text=True, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _curve(single), _curve(plan)
    assert two.keys() == one.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5), key
    ckpt = torch.load(plan.parent / "checkpoints" / "checkpoint-000006" / "model.pt", weights_only=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), plan.parent / "adapter")
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(trained) == len(ckpt)
    for name, value in ckpt.items():  # checkpoint names carry peft's adapter name ("default")
        assert torch.equal(dict(model.named_parameters())[name], value), name
