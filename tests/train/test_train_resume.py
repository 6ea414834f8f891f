"""A run killed mid-way (SIGKILL) and resumed with --resume logs the same metrics as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import SUBPROCESS_ENV, metrics, run_dir, train_here

pytestmark = pytest.mark.slow

# LoRA with dropout: the resumed run must also restore the random state the dropout masks come from.
SETTINGS = dict(method="lora", lora={"rank": 4, "dropout": 0.1},
                hparams={"lr": 1e-2, "max_steps": 12, "eval_every": 6, "save_every": 3, "log_every": 4,
                         "eval_samples": 2, "save_total_limit": 2})


def _memplan(*args: str) -> list[str]:
    return [sys.executable, "-m", "memplan", *args]


def _kill_after_checkpoint(plan, step: int) -> None:
    """Start the run and SIGKILL it as soon as its checkpoint of `step` exists."""
    ckpt = plan.parent / "checkpoints" / f"checkpoint-{step:06d}"
    proc = subprocess.Popen(_memplan("train", str(plan), "--quiet"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    while proc.poll() is None and not ckpt.is_dir():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def test_killed_run_resumes_with_the_uninterrupted_runs_metrics(tmp_path, tiny):
    """Killed once its first checkpoint exists, resumed from the latest one the rotation kept. A metrics line is
    the mean loss of the log_every steps before it, and every checkpoint (3, 6, 9) falls inside a window of 4:
    the line that ends that window still averages all four steps (the window's state travels in the
    checkpoint), and the lines the killed run wrote after its checkpoint are replaced, not duplicated."""
    straight = run_dir(tmp_path / "a", tiny, **SETTINGS)
    train_here(straight)
    killed = run_dir(tmp_path / "b", tiny, **SETTINGS)
    _kill_after_checkpoint(killed, 3)
    assert max(r["step"] for r in metrics(killed.parent)) < 12
    train_here(killed, "--resume")
    keys = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "eval_loss", "eval_accuracy")
    a, b = ([{k: r[k] for k in keys if k in r} for r in metrics(run.parent)] for run in (straight, killed))
    assert [r["step"] for r in a if "loss" in r] == [4, 8, 12]
    assert b == a
