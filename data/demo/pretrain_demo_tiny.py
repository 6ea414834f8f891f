"""Pre-train demo-tiny, memplan's shipped demo model, on the demo general text.

A small Llama (4 layers, hidden 256, 4 query / 2 key-value heads, vocabulary of the demo tokenizer)
is trained from random initialization as a causal language model on ``general.jsonl``: documents
as ``<s> text </s>`` concatenated and cut into blocks of SEQ_LEN tokens, AdamW, linear warmup then
cosine decay, gradient clipping.  Perplexity on ``retention.jsonl`` (held out from this text) is
measured before and after.  The result is written with ``save_pretrained`` (safetensors, float32)
together with the tokenizer and ``pretrain_summary.json`` into ``data/models/demo-tiny``, replacing
it atomically.

Run ``python data/demo/make_demo.py`` first (it makes the data and tokenizer), then
``python data/demo/pretrain_demo_tiny.py`` (4 minutes on a 2-core machine; see README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "models" / "demo-tiny"
SEED = 1234

# Model shape: 1.25 M parameters. Full fine-tuning on the date task reaches a third of exact matches in
# about a minute on two CPU cores; a 3.95 M version (hidden 256) stood at 6 % after the same 232 steps
# (116 s; see README.md).
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 128, 4, 4, 2, 344, 512

# Optimization.  A model this small trains well at a high peak learning rate.
SEQ_LEN = 256
BATCH = 8
STEPS = 400
PEAK_LR = 3e-3
WARMUP_STEPS = 30
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
MAX_GRAD_NORM = 1.0
LOG_EVERY = 20
# A fixed thread count: a float sum's order depends on it, so the result does not depend on the
# machine's core count; and on a small shared machine two threads competing with other work are slower.
THREADS = 1


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream of ``<s> text </s>`` (the tokenizer adds <s>)."""
    ids: list[int] = []
    for enc in tokenizer(texts)["input_ids"]:
        ids += enc + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def blocks(stream: torch.Tensor, length: int, keep_tail: bool) -> list[torch.Tensor]:
    """Consecutive blocks of ``length`` tokens; the shorter last one only when ``keep_tail``."""
    out = list(stream.split(length))
    if out and len(out[-1]) < length and not keep_tail:
        out.pop()
    return out


def build_model(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def perplexity(model, eval_blocks: list[torch.Tensor], batch: int = 16) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of the blocks
    (each block predicts its len - 1 next tokens; equal-length blocks go through in batches)."""
    full = [b for b in eval_blocks if len(b) == len(eval_blocks[0])]
    batches = [torch.stack(full[i:i + batch]) for i in range(0, len(full), batch)]
    batches += [b.unsqueeze(0) for b in eval_blocks[len(full):]]  # the shorter last block
    model.eval()
    nll, count = 0.0, 0
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss  # mean over all len - 1 predictions of the batch
        predicted = ids.shape[0] * (ids.shape[1] - 1)
        nll += loss.item() * predicted
        count += predicted
    model.train()
    return math.exp(nll / count)


def param_groups(model) -> list[dict]:
    """Weight decay on matrices only; norms (1-D) are not decayed, as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def save(model, tokenizer, summary: dict, out: Path) -> None:
    """save_pretrained into a temporary directory next to ``out``, then swap it in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is shipped
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    old = out.with_name(f".{out.name}-old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps (default {STEPS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model directory")
    parser.add_argument("--retention-blocks", type=int, default=None,
                        help="measure perplexity on only the first N retention blocks (quick checks; default all)")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    hf_logging.set_verbosity_error()  # documents are longer than model_max_length before blocking; that is fine

    tokenizer = AutoTokenizer.from_pretrained(HERE / "tokenizer")
    train_blocks = blocks(token_stream(tokenizer, read_texts(HERE / "general.jsonl")), SEQ_LEN, keep_tail=False)
    retention_blocks = blocks(token_stream(tokenizer, read_texts(HERE / "retention.jsonl")), SEQ_LEN, keep_tail=True)
    retention_blocks = retention_blocks[:args.retention_blocks]
    train_data = torch.stack(train_blocks)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo-tiny: {n_params:,} parameters; {train_data.numel():,} training tokens in {len(train_data)} "
          f"blocks of {SEQ_LEN}; {sum(len(b) for b in retention_blocks):,} retention tokens")

    ppl_before = perplexity(model, retention_blocks)
    print(f"retention perplexity before: {ppl_before:,.1f} (vocabulary size {len(tokenizer)})")

    optimizer = torch.optim.AdamW(param_groups(model), lr=PEAK_LR, betas=BETAS)
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, args.steps)
    shuffle = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(train_data), generator=shuffle)
    cursor, losses = 0, []
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc="pre-training", unit="step")
    for step in bar:
        if cursor + BATCH > len(order):  # next epoch: a fresh permutation
            order, cursor = torch.randperm(len(train_data), generator=shuffle), 0
        batch = train_data[order[cursor:cursor + BATCH]]
        cursor += BATCH

        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if step % LOG_EVERY == 0 or step == args.steps:
            tqdm.write(f"step {step:4d}  loss {sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:]):.3f}  "
                       f"lr {scheduler.get_last_lr()[0]:.2e}")

    ppl_after = perplexity(model, retention_blocks)
    wall = time.perf_counter() - started
    tail = losses[-LOG_EVERY:]
    summary = {
        "parameters": n_params, "steps": args.steps, "batch": BATCH, "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * BATCH * SEQ_LEN, "training_tokens": train_data.numel(),
        "peak_lr": PEAK_LR, "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "seed": SEED,
        "loss_first_step": losses[0], "loss_last_steps_mean": sum(tail) / len(tail),
        "retention_perplexity_before": ppl_before, "retention_perplexity_after": ppl_after,
        "wall_seconds": round(wall, 1), "torch_threads": torch.get_num_threads(),
    }
    save(model, tokenizer, summary, args.out)
    print(f"loss {losses[0]:.3f} -> {summary['loss_last_steps_mean']:.3f} (mean of the last {len(tail)} steps); "
          f"retention perplexity {ppl_before:,.1f} -> {ppl_after:.1f}; {wall / 60:.1f} min; saved {args.out}")


if __name__ == "__main__":
    main()
