"""Counting a JSONL training set: examples, and token lengths with the model's own tokenizer when one is
on disk (else an approximation), to size the sequence length from the distribution."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from memplan.errors import UserError

#: The sequence length is the 95th percentile of the token lengths, rounded up to this multiple
#: (tensor-core tiles and the allocator like multiples of 64; the longest 5 % are truncated).
SEQ_PERCENTILE = 95
SEQ_MULTIPLE = 64

#: Without a tokenizer: ~4 characters of English text per token (OpenAI, "What are tokens and how to
#: count them?": "1 token ~= 4 chars in English"; Llama/GPT-2 BPE vocabularies behave alike on prose).
CHARS_PER_TOKEN = 4.0

#: Above this many examples, token lengths are measured on a uniform random sample of this size
#: (seeded): the 95th percentile of 50,000 draws is within about +-0.2 percentile points of the whole.
MAX_TOKENIZED = 50_000

# Files a model directory holds when it ships a tokenizer (transformers' save_pretrained layout).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class DataStats:
    path: str
    examples: int
    format: str
    measured: int  # examples whose length was measured
    p50: int
    p95: int
    max: int
    tokenizer: str  # where lengths came from: a tokenizer path, or the approximation
    lengths: list[int] = field(default_factory=list, repr=False)  # sorted

    def truncated_fraction(self, seq_len: int) -> float:
        """Share of the measured examples longer than seq_len."""
        return sum(1 for n in self.lengths if n > seq_len) / len(self.lengths) if self.lengths else 0.0

    @property
    def seq_len(self) -> int:
        return max(SEQ_MULTIPLE, math.ceil(self.p95 / SEQ_MULTIPLE) * SEQ_MULTIPLE)

    def to_json(self) -> dict:
        return {"path": self.path, "examples": self.examples, "format": self.format, "measured": self.measured,
                "tokens_p50": self.p50, "tokens_p95": self.p95, "tokens_max": self.max, "tokenizer": self.tokenizer,
                "seq_len": self.seq_len}


def example_format(row: dict) -> str:
    if isinstance(row.get("messages"), list):
        return "chat"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if isinstance(row.get("text"), str):
        return "text"
    return ""


def example_text(row: dict, fmt: str) -> str:
    """The example's text as a prompt template lays it out: alpaca fields and chat turns on their own
    lines (chat-template markers, a few tokens per turn, are not counted; the rounding up absorbs them)."""
    if fmt == "chat":
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in row["messages"] if isinstance(m, dict))
    if fmt == "alpaca":
        parts = [row.get("instruction"), row.get("input"), row.get("output")]
        return "\n\n".join(str(p) for p in parts if p)
    return row["text"]


def read_examples(path: Path) -> tuple[list[str], str]:
    """Every example's text and the file's format; a malformed line is an error naming file and line."""
    try:
        fh = open(path, encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read --data {path}: {err.strerror}") from None
    texts: list[str] = []
    formats: set[str] = set()
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg}); expected one JSON object per line") from None
            fmt = example_format(row) if isinstance(row, dict) else ""
            if not fmt:
                raise UserError(f"{path}:{lineno}: an example needs 'messages' (chat), 'instruction'/'output' "
                                "(alpaca) or 'text'")
            formats.add(fmt)
            texts.append(example_text(row, fmt))
    if not texts:
        raise UserError(f"--data {path} holds no examples")
    return texts, formats.pop() if len(formats) == 1 else "mixed"


def find_tokenizer_dir(model_ref: str, spec_name: str) -> Optional[Path]:
    """The model's local directory when it holds tokenizer files: a path given as --model, or a preset's
    directory (data/models/<id>/)."""
    from memplan.models import models_dir, preset_ids

    candidates = []
    ref = Path(model_ref).expanduser()
    candidates.append(ref.parent if ref.is_file() else ref)
    if spec_name in preset_ids():
        candidates.append(models_dir() / spec_name)
    for folder in candidates:
        if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def _tokenizer_counter(folder: Path) -> Callable[[list[str]], list[int]]:
    """Token counts with special tokens (BOS/EOS) as training adds them: the `tokenizers` library reads
    tokenizer.json directly (fast); other layouts go through transformers' AutoTokenizer, offline."""
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return lambda texts: [len(e.ids) for e in tok.encode_batch(texts)]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return lambda texts: [len(ids) for ids in tok(texts)["input_ids"]]


def _percentile(sorted_values: list[int], pct: float) -> int:
    """Nearest-rank percentile (the smallest value with at least pct % of the data at or below it)."""
    k = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def measure(path: str, model_ref: str, spec_name: str, show_progress: bool = False) -> DataStats:
    texts, fmt = read_examples(Path(path))
    sample = texts
    if len(texts) > MAX_TOKENIZED:
        sample = random.Random(0).sample(texts, MAX_TOKENIZED)
    folder = find_tokenizer_dir(model_ref, spec_name)
    if folder is not None:
        count = _tokenizer_counter(folder)
        source = f"tokenizer {folder}"
    else:
        count = lambda batch: [math.ceil(len(t) / CHARS_PER_TOKEN) for t in batch]  # noqa: E731
        source = f"approximation: {CHARS_PER_TOKEN:g} characters per token (no tokenizer files with the model)"
    lengths: list[int] = []
    chunks = range(0, len(sample), 2048)
    if show_progress and len(sample) > 20_000:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="tokenizing", unit="chunk", leave=False)
    for i in chunks:
        lengths += count(sample[i:i + 2048])
    lengths.sort()
    return DataStats(path=str(path), examples=len(texts), format=fmt, measured=len(lengths),
                     p50=_percentile(lengths, 50), p95=_percentile(lengths, SEQ_PERCENTILE), max=lengths[-1],
                     tokenizer=source, lengths=lengths)
