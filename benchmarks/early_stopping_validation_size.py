"""How many validation examples early stopping needs: the measurement behind
memplan.train.data.MIN_EARLY_STOPPING_EXAMPLES.

demo-tiny is fine-tuned (full FT, fp32, AdamW at a constant rate, micro-batch 8, seq_len 64) on the first N
examples of data/demo/train.jsonl, long enough to overfit them; every 5 steps the loss of each of the 200
examples of data/demo/test.jsonl is recorded. Early stopping (patience 3, keep the best evaluation) is then
replayed on 2000 random validation subsets of n examples each, and the weights it keeps are scored on all
200: how often they are more than 10 % worse than what early stopping on all 200 keeps, how often it stopped
before that point, and how often they are no worse than the last step's (training on, without early
stopping). One thread, seeded: the same numbers on every run on the same machine type.

    python benchmarks/early_stopping_validation_size.py [--out benchmarks/results/early-stopping-validation-size.txt]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from memplan.plan import build_plan
from memplan.runtime.model import load_model, load_tokenizer, model_dir
from memplan.train import data as D

ROOT = Path(__file__).resolve().parent.parent / "data" / "demo"
RUNS = ((64, 1e-3), (32, 2e-3))  # (training examples, learning rate); 300 steps each
STEPS, EVAL_EVERY, MICRO_BATCH, PATIENCE = 300, 5, 8, 3
SUBSET_SIZES = (1, 2, 3, 5, 10, 20, 50, 100)
DRAWS = 2000


def per_example_losses(n_train: int, lr: float) -> list[tuple[list[float], list[int]]]:
    """At each evaluation: every validation example's summed token loss and its token count."""
    torch.manual_seed(0)
    plan = build_plan(dict(model="demo-tiny", method="full", precision="fp32", device="cpu", seq_len=64,
                           grad_ckpt=False))
    path = model_dir("demo-tiny")
    tok = load_tokenizer(path, False)
    train, _ = D.tokenize_all(D.read_jsonl(ROOT / "train.jsonl")[:n_train], tok, 64)
    val, _ = D.tokenize_all(D.read_jsonl(ROOT / "test.jsonl"), tok, 64)
    model = load_model(plan, path, "cpu", False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    pad = tok.pad_token_id

    def evaluate():
        model.eval()
        sums, counts = [], []
        with torch.no_grad():
            for chunk in D.batches(val, 50):
                batch = D.collate(chunk, pad, False)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=D.IGNORE,
                                                         reduction="none")
                sums += loss.sum(1).tolist()
                counts += (labels != D.IGNORE).sum(1).tolist()
        model.train()
        return sums, counts

    evals = [evaluate()]
    rng = random.Random(0)
    for step in range(1, STEPS + 1):
        model(**D.collate(rng.sample(train, MICRO_BATCH), pad, False)).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % EVAL_EVERY == 0:
            evals.append(evaluate())
    return evals


def early_stop(curve: list[float]) -> tuple[int, int]:
    """(the evaluation whose weights are kept, the evaluation at which training stops)."""
    best, best_i, bad = None, 0, 0
    for i, x in enumerate(curve):
        if best is None or x < best:
            best, best_i, bad = x, i, 0
        else:
            bad += 1
            if bad >= PATIENCE:
                return best_i, i
    return best_i, len(curve) - 1


def replay(evals) -> list[str]:
    n_val = len(evals[0][0])
    full = [sum(s) / sum(c) for s, c in evals]
    ref, _ = early_stop(full)
    lines = [f"all {n_val} validation examples: keep step {ref * EVAL_EVERY} (loss {full[ref]:.3f}); loss at the start "
             f"{full[0]:.3f}, lowest {min(full):.3f}, last step {full[-1]:.3f}",
             f"{'n':>4}  {'kept loss: median':>17}  {'p90':>6}  {'>10 % worse':>11}  {'stopped sooner':>14}  "
             f"{'no worse than last':>18}"]
    rng = random.Random(0)
    for n in SUBSET_SIZES:
        kept, sooner = [], 0
        for _ in range(DRAWS):
            idx = rng.sample(range(n_val), n)
            i, stop = early_stop([sum(s[j] for j in idx) / sum(c[j] for j in idx) for s, c in evals])
            kept.append(full[i])
            sooner += stop < ref
        worse = sum(k > 1.10 * full[ref] for k in kept)
        lines.append(f"{n:>4}  {statistics.median(kept):>17.3f}  {sorted(kept)[int(0.9 * DRAWS)]:>6.3f}  "
                     f"{100 * worse / DRAWS:>10.0f}%  {100 * sooner / DRAWS:>13.0f}%  "
                     f"{100 * sum(k <= full[-1] for k in kept) / DRAWS:>17.0f}%")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = []
    for n_train, lr in RUNS:
        t0 = time.perf_counter()
        evals = per_example_losses(n_train, lr)
        lines += [f"== demo-tiny full FT on {n_train} examples, lr {lr:g}, {STEPS} steps of {MICRO_BATCH} "
                  f"({time.perf_counter() - t0:.0f} s)"] + replay(evals) + [""]
        print("\n".join(lines[-len(SUBSET_SIZES) - 4:]), flush=True)
    if args.out:
        args.out.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
