"""Pre-train demo-tiny, memplan's shipped demo model, on the demo general text.

A small Llama (4 layers, hidden 192, 6 query / 2 key-value heads, vocabulary of the demo tokenizer)
is trained from random initialization as a causal language model on ``general.jsonl`` mixed with
as many tokens of repetition exercises (a random string of words or digits written two or three
times): documents as ``<s> text </s>`` shuffled, concatenated and cut into blocks of SEQ_LEN tokens,
AdamW, linear warmup then cosine decay, gradient clipping.  Perplexity on ``retention.jsonl`` (held
out from this text) is measured before and after, and in-context copying on held-out digit strings
after.  The result is written with ``save_pretrained`` (safetensors, float32)
together with the tokenizer and ``pretrain_summary.json`` into ``data/models/demo-tiny``, replacing
it atomically.

Run ``python data/demo/make_demo.py`` first (it makes the data and tokenizer), then
``python data/demo/pretrain_demo_tiny.py`` (24 minutes on a 2-core machine; see README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
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

# Model shape: 2.36 M parameters, small enough that the README's LoRA demo on the date task runs in
# about a minute on two CPU cores (see README.md).
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 192, 4, 6, 2, 512, 512

# Optimization.  A model this small trains well at a high peak learning rate.
SEQ_LEN = 256
BATCH = 8
STEPS = 2000
PEAK_LR = 3e-3
WARMUP_STEPS = 30
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
MAX_GRAD_NORM = 1.0
LOG_EVERY = 20
# Repetition exercises, as a share of all training tokens.  A language model copies from its context
# with induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads"); an LLM forms
# them on natural text over billions of tokens, demo-tiny on 360 k tokens of documentation does not
# (the text-only model predicted 16-20 % of a repeated digit string, the digits' base rate).  With half
# its tokens repetition exercises the ability appears abruptly after 700-1,000 steps (copies 30 % at
# step 700, 94 % at 1,000); STEPS leaves room after it (a 1,500-step schedule of the 1.25 M version,
# its learning rate decaying sooner, reached 67 % at step 1,200).  Fine-tuning then starts, as with a
# real LLM, from a model that can copy and has only the task to learn.
COPY_SHARE = 0.5
COPY_SEPARATORS = ["\n", " | ", ": ", " -> ", "\n\n", " = ", "; "]
# Held-out digit strings for the copy check, from a seed the exercises do not use.
COPY_CHECK_SEED, COPY_CHECK_STRINGS = 999, 200
COPY_LOG_EVERY, COPY_LOG_STRINGS = 100, 50
# A fixed thread count: a float sum's order depends on it, so the result does not depend on the
# machine's core count; and on a small shared machine two threads competing with other work are slower.
THREADS = 1


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tokenized(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document as ``<s> text </s>`` (the tokenizer adds <s>)."""
    return [enc + [tokenizer.eos_token_id] for enc in tokenizer(texts)["input_ids"]]


def token_stream(documents: list[list[int]]) -> torch.Tensor:
    """The documents' ids concatenated into one stream."""
    return torch.tensor([i for doc in documents for i in doc], dtype=torch.long)


def digit_string(rng: random.Random) -> str:
    """1-4 groups of 1-5 random digits."""
    return " ".join("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 5)))
                    for _ in range(rng.randint(1, 4)))


def repetition_exercises(general: list[str], n_tokens: int, tokenizer, seed: int) -> list[list[int]]:
    """Token ids of documents holding one random string written two or three times, ``n_tokens`` in all.

    The string is random tokens of the vocabulary (30 %), digits (30 %), words of the general text (25 %)
    or words and numbers (15 %): its second and third copies are predictable only by copying from the
    context, which is what the exercises teach; random tokens make that the only way to predict them."""
    rng = random.Random(seed)
    words = sorted({w for text in general for w in re.findall(r"[A-Za-z]+", text)})
    first_plain = max(tokenizer.all_special_ids) + 1  # special tokens come first in the demo vocabulary
    docs, total = [], 0
    while total < n_tokens:
        kind = rng.random()
        if kind < 0.3:
            string = [rng.randrange(first_plain, len(tokenizer)) for _ in range(rng.randint(3, 16))]
        else:
            if kind < 0.6:
                text = digit_string(rng)
            elif kind < 0.85:
                text = " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))
            else:
                text = " ".join(rng.choice(words) if rng.random() < 0.5 else str(rng.randint(0, 9999))
                                for _ in range(rng.randint(2, 8)))
            string = tokenizer(text, add_special_tokens=False)["input_ids"]
        separator = tokenizer(rng.choice(COPY_SEPARATORS), add_special_tokens=False)["input_ids"]
        doc = [tokenizer.bos_token_id] + string
        for _ in range(rng.randint(1, 2)):
            doc += separator + string
        docs.append(doc + [tokenizer.eos_token_id])
        total += len(docs[-1])
    return docs


@torch.no_grad()
def copy_accuracy(model, tokenizer, seed: int = COPY_CHECK_SEED, n: int = COPY_CHECK_STRINGS) -> float:
    """Share of the tokens of ``s`` predicted right (argmax) in ``<s> s -> s``, over held-out digit strings."""
    rng = random.Random(seed)
    hits = count = 0
    model.eval()
    for _ in range(n):
        string = digit_string(rng)
        prompt = len(tokenizer(f"{string} -> ")["input_ids"])
        ids = tokenizer(f"{string} -> {string}")["input_ids"]
        predicted = model(input_ids=torch.tensor([ids])).logits[0, prompt - 1:-1].argmax(-1)
        hits += (predicted == torch.tensor(ids[prompt:])).sum().item()
        count += len(ids) - prompt
    model.train()
    return hits / count


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
    general_texts = read_texts(HERE / "general.jsonl")
    general = tokenized(tokenizer, general_texts)
    general_tokens = sum(map(len, general))
    exercises = repetition_exercises(general_texts, round(general_tokens * COPY_SHARE / (1 - COPY_SHARE)),
                                     tokenizer, SEED)
    documents = general + exercises
    random.Random(SEED).shuffle(documents)
    train_blocks = blocks(token_stream(documents), SEQ_LEN, keep_tail=False)
    retention = tokenized(tokenizer, read_texts(HERE / "retention.jsonl"))
    retention_blocks = blocks(token_stream(retention), SEQ_LEN, keep_tail=True)
    retention_blocks = retention_blocks[:args.retention_blocks]
    train_data = torch.stack(train_blocks)
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo-tiny: {n_params:,} parameters; {train_data.numel():,} training tokens in {len(train_data)} "
          f"blocks of {SEQ_LEN} ({general_tokens:,} of general text, {len(exercises):,} repetition exercises); "
          f"{sum(len(b) for b in retention_blocks):,} retention tokens")

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
            copying = ""
            if step % COPY_LOG_EVERY == 0:  # in-context copying forms abruptly; show when
                copying = f"  copies {100 * copy_accuracy(model, tokenizer, n=COPY_LOG_STRINGS):.0f} %"
            tqdm.write(f"step {step:4d}  loss {sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:]):.3f}  "
                       f"lr {scheduler.get_last_lr()[0]:.2e}{copying}")

    ppl_after = perplexity(model, retention_blocks)
    copied = copy_accuracy(model, tokenizer)
    wall = time.perf_counter() - started
    tail = losses[-LOG_EVERY:]
    summary = {
        "parameters": n_params, "steps": args.steps, "batch": BATCH, "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * BATCH * SEQ_LEN, "training_tokens": train_data.numel(),
        "peak_lr": PEAK_LR, "warmup_steps": WARMUP_STEPS, "weight_decay": WEIGHT_DECAY, "seed": SEED,
        "loss_first_step": losses[0], "loss_last_steps_mean": sum(tail) / len(tail),
        "general_tokens": general_tokens, "repetition_exercises": len(exercises), "copy_share": COPY_SHARE,
        "retention_perplexity_before": ppl_before, "retention_perplexity_after": ppl_after,
        "copy_accuracy": copied,
        "wall_seconds": round(wall, 1), "torch_threads": torch.get_num_threads(),
    }
    save(model, tokenizer, summary, args.out)
    print(f"loss {losses[0]:.3f} -> {summary['loss_last_steps_mean']:.3f} (mean of the last {len(tail)} steps); "
          f"retention perplexity {ppl_before:,.1f} -> {ppl_after:.1f}; copies {100 * copied:.1f} % of held-out "
          f"digit strings; {wall / 60:.1f} min; saved {args.out}")


if __name__ == "__main__":
    main()
