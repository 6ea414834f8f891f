"""metrics.jsonl, the training plot and summary.json.

metrics.jsonl holds one JSON object per line:
  training lines   step, epoch, loss (mean token cross-entropy over the logged steps), lr, grad_norm,
                   tokens (trained-on input tokens in the window, all processes), tokens_per_s,
                   peak_memory_bytes (measured, see memory.py), elapsed_s
  evaluation lines step, eval_loss, eval_ppl, eval_accuracy (exact match; absent without answers)
Step 0 is the evaluation of the model before training.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsLog:
    """A resumed run continues the file from its checkpoint: the lines of later steps came from the lost
    steps and are dropped, and so is a line cut off by a crash while it was written (not JSON; `dropped`
    holds the line numbers). The file is fsync'ed before each checkpoint (`sync`), so the lines up to a
    checkpoint's step are on the disk when the checkpoint is."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        from memplan.train.outputs import write_durable

        self.path = path
        self.records: list[dict] = []
        self.dropped: list[int] = []
        if resume_step is not None and path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    self.dropped.append(number)
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durable(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        from memplan.errors import UserError
        from memplan.train.outputs import disk_full_message, free_bytes, is_disk_full

        self.records.append(record)
        line = json.dumps(record) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise UserError(disk_full_message(self.path, "a metrics line", len(line.encode()),
                                              free_bytes(self.path), "the checkpoints are kept")) from None

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def write_json(path: Path, data: Any) -> None:
    from memplan.train.outputs import write_durable

    write_durable(path, json.dumps(data, indent=2) + "\n")


def plot(records: list[dict], path: Path) -> None:
    """Loss and validation loss, learning rate, exact-match accuracy and tokens/s over optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    acc = [r for r in evals if r.get("eval_accuracy") is not None]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
    ax.set_title("loss (mean token cross-entropy)")
    ax.legend()
    ax = axes[0][1]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set_title("learning rate")
    ax = axes[1][0]
    if acc:
        ax.plot([r["step"] for r in acc], [100 * r["eval_accuracy"] for r in acc], "o-")
        ax.set_ylim(-2, 102)
    ax.set_title("exact-match accuracy on validation (%)")
    ax = axes[1][1]
    ax.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train])
    ax.set_title("tokens/s")
    for a in axes.flat:
        a.set_xlabel("optimizer step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


def median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
