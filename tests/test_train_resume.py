"""A run killed mid-way (SIGKILL) and resumed with --resume logs the same losses as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

from test_train_support import SUBPROCESS_ENV, metrics, run_dir, tiny  # noqa: F401  (tiny is a fixture)

# LoRA with dropout: the resumed run must also restore the random state the dropout masks come from.
SETTINGS = dict(method="lora", lora={"rank": 4, "dropout": 0.1},
                hparams={"lr": 1e-2, "max_steps": 24, "eval_every": 8, "save_every": 3, "log_every": 1,
                         "eval_samples": 2, "save_total_limit": 2})


def _memplan(*args: str) -> list[str]:
    return [sys.executable, "-m", "memplan", *args]


def _losses(run):
    return {(r["step"], k): r[k] for r in metrics(run) for k in ("loss", "eval_loss", "lr") if k in r}


def test_killed_run_resumes_with_identical_losses(tmp_path, tiny):
    straight = run_dir(tmp_path / "a", tiny, **SETTINGS)
    done = subprocess.run(_memplan("train", str(straight), "--quiet"), capture_output=True, text=True,
                          env=SUBPROCESS_ENV)
    assert done.returncode == 0, done.stderr

    killed = run_dir(tmp_path / "b", tiny, **SETTINGS)
    ckpts = killed.parent / "checkpoints"
    proc = subprocess.Popen(_memplan("train", str(killed), "--quiet"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    while proc.poll() is None and not (ckpts / "checkpoint-000003").is_dir():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    logged = max(r["step"] for r in metrics(killed.parent))
    assert logged < 24

    resumed = subprocess.run(_memplan("train", str(killed), "--resume", "--quiet"), capture_output=True,
                             text=True, env=SUBPROCESS_ENV)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _losses(straight.parent), _losses(killed.parent)
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])
    steps = [r["step"] for r in metrics(killed.parent) if "loss" in r]
    assert steps == list(range(1, 25))  # the lines of the lost steps were replaced, not duplicated
