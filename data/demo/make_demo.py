"""Build memplan's demo data and tokenizer, offline and deterministically.

Writes, next to this file:

* ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``: an instruction task with an exact answer, in the
  alpaca shape (``instruction``, ``input``, ``output``): rewrite a date such as ``15 March 2024`` in ISO
  form, ``2024-03-15``.  Every date appears in one split only.
* ``general.jsonl`` / ``retention.jsonl``: general English text (``{"text": ...}``) for pre-training
  demo-tiny, for replay during fine-tuning, and, held out from pre-training, for the retention check.
  The prose is the documentation that ships inside Python itself (see ``README.md`` for the licence).
* ``tokenizer/``: a byte-level BPE tokenizer trained with ``tokenizers`` on the general text and the
  training split, saved in the transformers layout with a chat template.

Run from anywhere: ``python data/demo/make_demo.py`` (a few seconds).  The same Python version gives
byte-identical files; another Python version ships other documentation text, hence other files.
"""

from __future__ import annotations

import argparse
import ast
import calendar
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240315

# Instruction task sizes: the trainer's demo evaluates exact-match accuracy on val while training.
N_TRAIN, N_VAL, N_TEST = 1000, 100, 200
FIRST_YEAR, LAST_YEAR = 1900, 2099

# General text: documents are cut into records of at most this many characters at paragraph breaks,
# and this share of records (not fewer than needed for a meaningful perplexity) is held out.
MAX_RECORD_CHARS = 1500
MIN_RECORD_CHARS = 80
RETENTION_SHARE = 0.07

VOCAB_SIZE = 4096
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Roles as single special tokens; the assistant's reply ends with eos so greedy decoding stops there.
# {% generation %} marks the reply for apply_chat_template(return_assistant_tokens_mask=True).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('chat roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


# ------------------------------------------------------------------------------------------------
# The instruction task: "day Month year" -> ISO date
# ------------------------------------------------------------------------------------------------

# {date} inside the instruction means the example has an empty input (alpaca's no-input form).
WITH_INPUT = [
    "Convert this date to ISO format (YYYY-MM-DD).",
    "Rewrite the date below as year-month-day with numbers.",
    "Write the following date in ISO 8601 form.",
    "Change the date format from day month-name year to YYYY-MM-DD.",
    "Give the date below the way a computer stores it: YYYY-MM-DD.",
    "Express this date as an ISO date.",
]
WITHOUT_INPUT = [
    "Write {date} as YYYY-MM-DD.",
    "What is {date} in ISO format?",
    "Convert the date {date} to the ISO form.",
]
NO_INPUT_SHARE = 0.2


def long_date(day: dt.date) -> str:
    """The question: day without a leading zero, English month name, four-digit year."""
    return f"{day.day} {calendar.month_name[day.month]} {day.year}"


def date_example(day: dt.date, rng: random.Random) -> dict:
    text = long_date(day)
    if rng.random() < NO_INPUT_SHARE:
        return {"instruction": rng.choice(WITHOUT_INPUT).format(date=text), "input": "", "output": day.isoformat()}
    return {"instruction": rng.choice(WITH_INPUT), "input": text, "output": day.isoformat()}


def date_splits(rng: random.Random) -> tuple[list[dict], list[dict], list[dict]]:
    """Distinct dates drawn without replacement, so no date is in two splits."""
    first, last = dt.date(FIRST_YEAR, 1, 1), dt.date(LAST_YEAR, 12, 31)
    offsets = rng.sample(range((last - first).days + 1), N_TRAIN + N_VAL + N_TEST)
    examples = [date_example(first + dt.timedelta(days=o), rng) for o in offsets]
    return examples[:N_TRAIN], examples[N_TRAIN:N_TRAIN + N_VAL], examples[N_TRAIN + N_VAL:]


# ------------------------------------------------------------------------------------------------
# General text: the documentation that ships with Python
# ------------------------------------------------------------------------------------------------

# Standard-library folders that are tests, tooling or GUI demos rather than documented modules.
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "ensurepip",
             "distutils", "__pycache__"}
MIN_DOCSTRING_CHARS = 300


def pydoc_topics() -> list[str]:
    """The language reference pages `help()` shows (pydoc_data.topics), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def stdlib_docstrings() -> list[str]:
    """Long module, class and function docstrings of the pure-Python standard library, read with
    `ast` (nothing is imported, so no module runs), in file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    return docs


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def records(text: str) -> list[str]:
    """Cut a document at paragraph breaks into pieces of at most MAX_RECORD_CHARS (a longer single
    paragraph is cut at line breaks, then hard)."""
    pieces, current = [], ""
    paragraphs = []
    for para in clean(text).split("\n\n"):
        while len(para) > MAX_RECORD_CHARS:
            cut = para.rfind("\n", 0, MAX_RECORD_CHARS)
            cut = cut if cut > 0 else MAX_RECORD_CHARS
            paragraphs.append(para[:cut])
            para = para[cut:].lstrip("\n")
        paragraphs.append(para)
    for para in paragraphs:
        if current and len(current) + 2 + len(para) > MAX_RECORD_CHARS:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return [p.strip() for p in pieces if len(p.strip()) >= MIN_RECORD_CHARS]


def general_split(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """All records, deduplicated, split into pre-training text and a held-out retention set."""
    texts = list(dict.fromkeys(r for doc in pydoc_topics() + stdlib_docstrings() for r in records(doc)))
    order = list(range(len(texts)))
    rng.shuffle(order)
    held = set(order[: round(RETENTION_SHARE * len(texts))])
    general = [{"text": t} for i, t in enumerate(texts) if i not in held]
    retention = [{"text": t} for i, t in enumerate(texts) if i in held]
    return general, retention


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str]):
    """Byte-level BPE (GPT-2 style) with single digits, so numbers are spelled digit by digit as in
    Llama's tokenizer; plain text is encoded with bos in front (add_special_tokens=True)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE, model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------
# Writing atomically
# ------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def save_tokenizer(tokenizer, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the tokenizer is shipped
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: next to this script)")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(SEED)
    train, val, test = date_splits(rng)
    general, retention = general_split(rng)
    for name, rows in [("train", train), ("val", val), ("test", test), ("general", general),
                       ("retention", retention)]:
        write_jsonl(out / f"{name}.jsonl", rows)
        size = (out / f"{name}.jsonl").stat().st_size
        print(f"{name + '.jsonl':16s} {len(rows):6d} records {size / 1024:8.1f} KiB")

    corpus = [r["text"] for r in general] + [f"{e['instruction']}\n{e['input']}\n{e['output']}" for e in train]
    tokenizer = train_tokenizer(corpus)
    save_tokenizer(tokenizer, out / "tokenizer")
    n_tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch([r["text"] for r in general]))
    n_chars = sum(len(r["text"]) for r in general)
    print(f"tokenizer/        vocab {len(tokenizer)}; general text {n_tokens:,} tokens "
          f"({n_chars / n_tokens:.2f} characters per token)")
    # The general text is the running Python's own documentation: record which Python made it.
    (out / "python_version.txt").write_text(platform.python_version() + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
