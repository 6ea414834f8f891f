"""Training throughput: `memplan train` vs Hugging Face `Trainer`, side by side in one run.

Both train the same model (the shipped demo-tiny) on the same micro-batches in the same order (memplan's
tokenized, prompt-masked examples, collated by the same function inside each side's timed step), with the same batch,
precision, optimizer (fused AdamW), schedule (warmup + cosine), clipping and number of optimizer steps.
Throughput = trained-on input tokens (padding excluded) / wall time of each optimizer step; memplan's
from its metrics.jsonl (one line per step, batch preparation included), the Trainer's from a callback
(end of one step to the end of the next, so its batch fetching is included too). The first
`WARMUP` steps are left out of both (memplan measures its memory there; first steps allocate), and the
median of the remaining steps is reported, with the ratio memplan / Trainer (goal: >= 1.0).

    python benchmarks/train_throughput.py [--steps 100] [--rounds 5] [--device cpu|cuda] [--out FILE]

Results: benchmarks/results/train-throughput.txt (the CPU run; `--device cuda` for the GPU check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2

CONFIGS = [  # (name, plan fields)
    ("full FT, fp32", dict(method="full", precision="fp32", hparams=dict(lr=5e-5))),
    ("LoRA r16 all-linear, fp32", dict(method="lora", precision="fp32", hparams=dict(lr=2e-4))),
]


def base_plan(device: str, steps: int, out: Path) -> dict:
    return {
        "model": "demo-tiny", "device": device, "optimizer": "adamw-fused", "micro_batch": 16, "grad_accum": 1,
        "seq_len": 128, "grad_ckpt": False, "attn": "sdpa",
        "hparams": {"max_steps": steps, "warmup_steps": 3, "lr_scheduler": "cosine", "max_grad_norm": 1.0,
                    "eval_every": 10 * steps, "save_every": 10 * steps, "log_every": 1, "seed": 1},
        "data": {"train": str(ROOT / "data" / "demo" / "train.jsonl"), "val_ratio": 0.0},
        "output_dir": str(out),
    }


def run_memplan(plan_dict: dict, workdir: Path) -> list[float]:
    import yaml

    from memplan.train.loop import train
    from memplan.train.settings import resolve_plan

    path = workdir / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_dict))
    train(resolve_plan(str(path)), echo=lambda _m: None, progress=False)
    lines = [json.loads(x) for x in (Path(plan_dict["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in lines if "tokens_per_s" in r and r["step"] > WARMUP]


def run_trainer(plan_dict: dict, workdir: Path) -> list[float]:
    """HF Trainer on memplan's exact micro-batches: an iterable dataset yields each micro-batch's examples
    and the Trainer's data collator pads them with memplan's `collate`, as memplan's step does."""
    import torch
    from torch.utils.data import IterableDataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from memplan.runtime.model import load_model, load_tokenizer, model_dir
    from memplan.train import data as D
    from memplan.train.settings import resolve_plan

    path = workdir / "plan-trainer.yaml"
    import yaml

    path.write_text(yaml.safe_dump(plan_dict))
    plan = resolve_plan(str(path)).plan
    base = model_dir(plan.model)
    tok = load_tokenizer(base, False)
    run_data = D.load_run_data(plan, tok)
    stream = D.Stream(run_data.train, plan.micro_batch, 1, 0, plan.hparams.seed)
    steps = plan.hparams.max_steps
    batches = [stream.micro_batch_at(k) for k in range(steps)]
    tokens = [sum(len(e.input_ids) for e in b) for b in batches]

    class Batches(IterableDataset):
        def __iter__(self):
            return iter(batches)

    torch.manual_seed(plan.hparams.seed)
    model = load_model(plan, base, torch.device(plan.device), False)
    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=1, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=plan.hparams.effective_lr(plan.method), lr_scheduler_type="cosine",
        warmup_steps=plan.hparams.warmup_steps, max_grad_norm=1.0, optim="adamw_torch_fused",
        bf16=plan.precision == "amp-bf16", use_cpu=plan.device == "cpu", logging_steps=10 * steps,
        save_strategy="no", eval_strategy="no", report_to=[], seed=plan.hparams.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        # From one step's end to the next: the Trainer fetches a step's batches before on_step_begin, and
        # memplan's step time includes its batch preparation too.
        def on_train_begin(self, *a, **k):
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    trainer = Trainer(model=model, args=args, train_dataset=Batches(),
                      data_collator=lambda items: D.collate(items[0], tok.pad_token_id, False),
                      callbacks=[Clock()])
    trainer.train()
    return [n / t for n, t in zip(tokens[WARMUP:], times[WARMUP:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rounds", type=int, default=5, help="alternate memplan / Trainer runs this many times")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train-throughput.txt"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    load_before = os.getloadavg()[0]
    rows = []
    for name, fields in CONFIGS:
        results: dict[str, list[float]] = {"memplan": [], "trainer": []}
        for _ in range(args.rounds):  # alternating, so a change in machine load hits both alike
            for who, runner in (("memplan", run_memplan), ("trainer", run_trainer)):
                with tempfile.TemporaryDirectory(prefix="memplan-bench-") as tmp:
                    plan = base_plan(args.device, args.steps, Path(tmp) / "out")
                    for key, value in fields.items():
                        plan[key] = {**plan[key], **value} if isinstance(value, dict) else value
                    results[who] += runner(plan, Path(tmp))
                print(f"{name}: {who} {statistics.median(results[who]):.0f} tokens/s", file=sys.stderr)
        results = {who: statistics.median(v) for who, v in results.items()}
        rows.append((name, results["memplan"], results["trainer"], results["memplan"] / results["trainer"]))

    from tabulate import tabulate

    table = tabulate([(n, f"{m:.0f}", f"{t:.0f}", f"{r:.2f}x") for n, m, t, r in rows],
                     headers=["demo-tiny, micro-batch 16 x <=128 tokens", "memplan train tok/s", "HF Trainer tok/s",
                              "ratio"], tablefmt="simple", disable_numparse=True)
    header = (f"# memplan train vs HF Trainer: median tokens/s over optimizer steps {WARMUP + 1}-{args.steps}, "
              f"{args.rounds} alternating runs each\n"
              f"# device {args.device}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
              f"{transformers.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, 1-minute load average "
              f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end (other work shares the CPUs)\n"
              f"# same batches in the same order, fused AdamW, warmup 3 + cosine, clip 1.0; written by "
              f"benchmarks/train_throughput.py\n")
    text = header + table + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
