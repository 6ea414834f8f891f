"""Two CPU processes (torchrun, gloo) with DDP and with FSDP: same losses as one process at the same
effective batch, and a loadable model. Tolerance: 1e-5 relative (float32 sums in another order)."""

import subprocess
import sys

import pytest
import torch

from test_train_support import SUBPROCESS_ENV, metrics, run_dir, tiny  # noqa: F401  (tiny is a fixture)

SETTINGS = dict(hparams={"max_steps": 6, "eval_every": 3, "eval_samples": 0})
TOLERANCE = 1e-5


def _train(plan, *sets):
    args = [sys.executable, "-m", "memplan", "train", str(plan), "--quiet"]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["step"], k): r[k] for r in metrics(plan.parent) for k in ("loss", "eval_loss") if k in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny):
    # micro_batch 4 on one process = micro_batch 2 on each of two processes
    plan = run_dir(tmp_path_factory.mktemp("single"), tiny, micro_batch=4, **SETTINGS)
    return _train(plan)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, tiny, single, sharding):
    from transformers import AutoModelForCausalLM

    plan = run_dir(tmp_path, tiny, micro_batch=2, gpus=2, sharding=sharding, zero=3 if sharding == "fsdp" else 0,
                   **SETTINGS)
    two = _train(plan)
    assert two.keys() == single.keys()
    for key, value in single.items():
        assert two[key] == pytest.approx(value, rel=TOLERANCE), key
    model = AutoModelForCausalLM.from_pretrained(plan.parent / "model")
    ckpt = torch.load(plan.parent / "checkpoints" / "checkpoint-000006" / "model.pt", weights_only=True)
    assert all(torch.equal(p, ckpt[n]) for n, p in model.named_parameters())
