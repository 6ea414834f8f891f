"""Counting a JSONL training set: examples, and token lengths with the model's own tokenizer when one is
on disk (else an approximation), to size the sequence length from the distribution. Records are read and
rendered the way `memplan train` reads and renders them (memplan.train.data, memplan.runtime.model)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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

    def expected_padded_length(self, k: int, cap: int) -> float:
        """Tokens per sequence in a batch of k examples as `memplan train` runs it: padded to the batch's
        longest example (memplan.train.data.collate), cut at `cap`. The expected maximum of k draws from
        the measured lengths L_(1) <= ... <= L_(n): sum_i min(L_(i), cap) x [(i/n)^k - ((i-1)/n)^k]."""
        n = len(self.lengths)
        if not n:
            return float(cap)
        return sum(min(x, cap) * ((i / n) ** k - ((i - 1) / n) ** k) for i, x in enumerate(self.lengths, 1))

    @property
    def seq_len(self) -> int:
        return max(SEQ_MULTIPLE, math.ceil(self.p95 / SEQ_MULTIPLE) * SEQ_MULTIPLE)

    def to_json(self) -> dict:
        return {"path": self.path, "examples": self.examples, "format": self.format, "measured": self.measured,
                "tokens_p50": self.p50, "tokens_p95": self.p95, "tokens_max": self.max, "tokenizer": self.tokenizer,
                "seq_len": self.seq_len}


def _file_format(path: Path) -> str:
    """The JSONL shape, from the first record (the trainer's `format: auto` reads it the same way)."""
    with open(path, encoding="utf-8-sig") as fh:  # as memplan.files.read_text reads it
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return "unknown"
                if not isinstance(row, dict):
                    return "unknown"
                if "messages" in row:
                    return "chat"
                return "alpaca" if ("instruction" in row or "output" in row) else "text"
    return "unknown"


def find_tokenizer_dir(model_ref: str, spec_name: str) -> Path | None:
    """The model's local directory when it holds tokenizer files: a path given as --model, or a preset's
    directory (data/models/<id>/)."""
    from memplan.catalog.presets import models_dir, preset_ids

    candidates = []
    ref = Path(model_ref).expanduser()
    candidates.append(ref.parent if ref.is_file() else ref)
    if spec_name in preset_ids():
        candidates.append(models_dir() / spec_name)
    for folder in candidates:
        if folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    return None


def _tokenizer_counter(folder: Path) -> Callable[[list], list[int]]:
    """Token counts exactly as `memplan train` tokenizes (memplan.train.data): conversations (alpaca and
    chat) rendered with the tokenizer's chat template (memplan's default template when it has none) and
    tokenized without extra special tokens; text records with the tokenizer's special tokens plus eos."""
    from memplan.runtime.model import load_tokenizer

    tok = load_tokenizer(folder, trust_remote_code=False)
    eos = 1 if tok.eos_token_id is not None else 0

    def count(records: list) -> list[int]:
        chats = [r for r in records if r.messages is not None]
        rendered = [tok.apply_chat_template(r.messages, tokenize=False) for r in chats]
        chat_ids = tok(rendered, add_special_tokens=False)["input_ids"] if chats else []
        chat_lengths = iter(len(ids) for ids in chat_ids)
        texts = [r.text for r in records if r.messages is None]
        text_lengths = iter(len(ids) + eos for ids in tok(texts)["input_ids"]) if texts else iter(())
        return [next(chat_lengths) if r.messages is not None else next(text_lengths) for r in records]

    return count


def _approximate(record) -> int:
    """~CHARS_PER_TOKEN characters per token of the example's text (a conversation's turns with their
    role headers, as memplan's default chat template lays them out)."""
    if record.messages is None:
        return math.ceil(len(record.text) / CHARS_PER_TOKEN)
    text = "\n\n".join(f"### {m['role'].capitalize()}:\n{m['content']}" for m in record.messages)
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _percentile(sorted_values: list[int], pct: float) -> int:
    """Nearest-rank percentile (the smallest value with at least pct % of the data at or below it)."""
    k = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def measure_data(path: str, model_ref: str, spec_name: str, show_progress: bool = False) -> DataStats:
    from memplan.train.data import read_jsonl  # the trainer's own reader: the same records, the same errors

    records = read_jsonl(path)
    fmt = _file_format(Path(path))
    sample = records
    if len(records) > MAX_TOKENIZED:
        sample = random.Random(0).sample(records, MAX_TOKENIZED)
    from memplan.extras import installed

    folder = find_tokenizer_dir(model_ref, spec_name)
    if folder is not None and installed("transformers"):
        count = _tokenizer_counter(folder)
        source = f"tokenizer {folder}"
    else:
        count = lambda batch: [_approximate(r) for r in batch]  # noqa: E731
        why = ("no tokenizer files with the model" if folder is None else
               f"transformers is not installed to read the tokenizer in {folder}: pip install 'memplan[torch]'")
        source = f"approximation: {CHARS_PER_TOKEN:g} characters per token ({why})"
    lengths: list[int] = []
    chunks = range(0, len(sample), 2048)
    if show_progress and len(sample) > 20_000:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="tokenizing", unit="chunk", leave=False)
    for i in chunks:
        lengths += count(sample[i:i + 2048])
    lengths.sort()
    return DataStats(path=str(path), examples=len(records), format=fmt, measured=len(lengths),
                     p50=_percentile(lengths, 50), p95=_percentile(lengths, SEQ_PERCENTILE), max=lengths[-1],
                     tokenizer=source, lengths=lengths)
