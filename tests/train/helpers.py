"""Shared pieces of the `memplan train` tests: a tiny Llama with a BPE tokenizer trained here, an
exact-answer task (upper-casing words) in alpaca shape, general text, and plan files."""

import json
import os
import random
from pathlib import Path

import yaml

WORDS = ("apple river stone cloud green music paper light table window garden silver orange planet "
         "rabbit yellow forest bridge candle summer winter spring autumn mountain ocean desert").split()


def general_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + "." for _ in range(n)]


def task_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
        out.append({"instruction": "Write in upper case.", "input": words, "output": words.upper()})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tiny_model(root: Path, chat_template: bool = False, width: int = 32, name: str = "tiny-llama") -> Path:
    """A 2-layer Llama (~0.1 M parameters at width 32) and a byte-level BPE tokenizer, saved with
    save_pretrained. 4 heads, 2 KV heads, MLP twice the width."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = general_sentences(300) + [f"{r['instruction']} {r['input']} {r['output']}" for r in task_records(300)]
    corpus += ["### User:", "### Assistant:"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = root / name
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def write_plan(directory: Path, model_path: Path, **fields) -> Path:
    """A flat plan.yaml for a tiny CPU run; `fields` override it (nested dicts for lora/hparams/data)."""
    plan = {
        "model": str(model_path),
        "method": "full",
        "precision": "fp32",
        "device": "cpu",
        "micro_batch": 4,
        "grad_accum": 2,
        "seq_len": 64,
        "grad_ckpt": False,
        "hparams": {"lr": 3e-3, "max_steps": 12, "warmup_steps": 2, "eval_every": 6, "log_every": 1,
                    "eval_samples": 4, "save_total_limit": 2, "seed": 7},
        "data": {"train": "train.jsonl", "validation": "val.jsonl"},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(plan.get(key), dict):
            plan[key] = {**plan[key], **value}
        else:
            plan[key] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "plan.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def run_dir(tmp_path: Path, tiny, **fields) -> Path:
    """A run directory holding copies of the data files and a plan.yaml."""
    model, data = tiny
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    for f in data.iterdir():
        (run / f.name).write_text(f.read_text())
    return write_plan(run, model, **fields)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# Tiny models train fastest on one thread, and the test machine's cores are shared: every training run
# in these tests uses one intra-op thread (subprocesses through this environment).
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def train_here(plan: Path, *args: str) -> None:
    """`memplan train PLAN --quiet ARGS` in this process, on one intra-op thread as SUBPROCESS_ENV gives a
    subprocess: the same arithmetic, without a new interpreter importing torch, transformers and peft again. For
    the one-process runs the multi-process ones are compared with (those need their own processes)."""
    import torch
    from click.testing import CliRunner

    from memplan.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(main, ["train", str(plan), "--quiet", *args])
    finally:
        torch.set_num_threads(threads)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.stderr[-3000:]
