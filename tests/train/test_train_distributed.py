"""Two CPU processes (torchrun, gloo) with DDP and with FSDP: same losses as one process at the same
effective batch, and a loadable model. Tolerance: 1e-5 relative in fp32 (float32 sums in another order);
2e-4 with bf16-master, whose bf16 gradients are summed in another order and rounded to bf16 (measured 2e-5;
test_train_precision.py runs FSDP's sharded masters)."""

import subprocess
import sys

import pytest
import torch

from helpers import SUBPROCESS_ENV, metrics, run_dir

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SETTINGS = dict(hparams={"max_steps": 6, "eval_every": 3, "eval_samples": 2}, lora={"rank": 4, "dropout": 0.0})
TOLERANCE = {"fp32": 1e-5, "bf16-master": 2e-4}


def _train(plan, *sets):
    args = [sys.executable, "-m", "memplan", "train", str(plan), "--quiet"]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["step"], k): r[k] for r in metrics(plan.parent) for k in ("loss", "eval_loss", "eval_accuracy")
            if k in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny):
    """One-process runs by method and precision; micro_batch 4 on one process = micro_batch 2 on each of two."""
    runs = {}

    def get(method, precision):
        if (method, precision) not in runs:
            plan = run_dir(tmp_path_factory.mktemp(f"single-{method}"), tiny, method=method, precision=precision,
                           micro_batch=4, **SETTINGS)
            runs[method, precision] = _train(plan)
        return runs[method, precision]

    return get


# DDP with full fine-tuning in bf16 with fp32 masters; FSDP (FULL_SHARD) with LoRA in fp32, whose exact-match
# generation runs through the inner model of the sharded root. FSDP runs at the dependency floors too (.ci/run): the
# one place FSDP2 trains, in the units accelerate (>= 1.15) makes (memplan.runtime.fsdp).
@pytest.mark.parametrize("sharding, method, precision", [
    ("ddp", "full", "bf16-master"), pytest.param("fsdp", "lora", "fp32", marks=pytest.mark.floors)])
def test_two_processes_match_one(tmp_path, tiny, single, sharding, method, precision):
    plan = run_dir(tmp_path, tiny, method=method, precision=precision, micro_batch=2, gpus=2, sharding=sharding,
                   zero=3 if sharding == "fsdp" else 0, **SETTINGS)
    two = _train(plan)
    one = single(method, precision)
    assert two.keys() == one.keys()
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=TOLERANCE[precision]), key
    ckpt = torch.load(plan.parent / "checkpoints" / "checkpoint-000006" / "model.pt", weights_only=True)
    if method == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(plan.parent / "model")
        assert model.dtype == torch.bfloat16
        assert all(torch.equal(p, ckpt[n]) for n, p in model.named_parameters())
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[0]), plan.parent / "adapter")
        trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
        assert len(trained) == len(ckpt)
        for name, value in ckpt.items():  # checkpoint names carry peft's adapter name ("default")
            assert torch.equal(dict(model.named_parameters())[name], value), name
