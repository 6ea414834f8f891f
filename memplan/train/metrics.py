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
from typing import Any, Optional


class MetricsLog:
    def __init__(self, path: Path, resume_step: Optional[int]) -> None:
        self.path = path
        self.records: list[dict] = []
        if resume_step is not None and path.is_file():
            # A resumed run continues the file from its checkpoint; later lines came from the lost steps.
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("step", 0) <= resume_step:
                        self.records.append(rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, path)
        self._file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))


def median(values: list[float]) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
