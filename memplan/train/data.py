"""Training data: JSONL records -> token ids with the prompt masked out of the loss.

Shapes (one JSON object per line; `format: auto` detects the shape from a file's first record):
  alpaca  {"instruction": ..., "input": ... (optional), "output": ...}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  text    {"text": ...}
alpaca and chat records are rendered with the tokenizer's chat template (memplan's documented default
template when the tokenizer has none, see `memplan.runtime.model.DEFAULT_CHAT_TEMPLATE`); the loss is on
the assistant turns only (labels -100 elsewhere). Text records are trained on every token.
Sequences are cut to the plan's seq_len. With packing, examples are concatenated into sequences of
seq_len tokens whose position ids restart at each example, so attention stays inside an example.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memplan.errors import UserError
from memplan.files import parse_json, read_text

IGNORE = -100


@dataclass
class Record:
    """One parsed line: the conversation (alpaca and chat) or the text."""

    where: str  # file:line, for messages
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    @property
    def answer(self) -> str | None:
        """The exact answer the model should give: the last assistant turn."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return None
        return self.messages[-1]["content"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))


# ---------------------------------------------------------------- reading JSONL


def _detect(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _string(obj: dict, key: str, where: str, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in obj else f"a {type(value).__name__}"
        raise UserError(f"{where}: '{key}' must be a string ({got})")
    return value


def _parse(obj: Any, fmt: str, where: str) -> Record:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if fmt == "text":
        return Record(where, text=_string(obj, "text", where))
    if fmt == "alpaca":
        instruction = _string(obj, "instruction", where)
        extra = _string(obj, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return Record(where, messages=[{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": _string(obj, "output", where)}])
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise UserError(f"{where}: messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: a chat record needs at least one assistant message (the loss is on them)")
    return Record(where, messages=out)


def read_jsonl(path: str | Path, fmt: str = "auto") -> list[Record]:
    """All records of a JSONL file; the first bad line raises one UserError naming file:line."""
    path = Path(path)
    # JSON Lines end at "\n" only: str.splitlines would also cut at U+2028 and others, which JSON strings may hold
    lines = read_text(path, "data file").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        obj = parse_json(line, where, line=False)
        if fmt == "auto":
            fmt = _detect(obj) if isinstance(obj, dict) else None
            if fmt is None:
                raise UserError(f"{where}: cannot tell the format: expected keys instruction/output (alpaca), "
                                "messages (chat) or text")
        records.append(_parse(obj, fmt, where))
    if not records:
        raise UserError(f"{path}: no records (one JSON object per line expected)")
    return records


# ---------------------------------------------------------------- tokenizing


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    # Chat templates write the special tokens (bos) themselves.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(record: Record, tokenizer, seq_len: int) -> Example:
    """Token ids and labels; labels are -100 on everything but the assistant turns (chat/alpaca)."""
    if record.text is not None:
        ids = tokenizer(record.text)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:seq_len]
        return Example(ids, list(ids))
    ids = _ids(tokenizer, _render(tokenizer, record.messages, False))
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(record.messages):
        if m["role"] != "assistant":
            continue
        # The assistant turn is what the full conversation up to it adds to its prompt.
        start = len(_ids(tokenizer, _render(tokenizer, record.messages[:i], True)))
        end = len(_ids(tokenizer, _render(tokenizer, record.messages[: i + 1], False)))
        labels[start:end] = ids[start:end]
    return Example(ids[:seq_len], labels[:seq_len])


def prompt_ids(record: Record, tokenizer) -> list[int]:
    """The prompt that should make the model produce `record.answer` (everything before it)."""
    return _ids(tokenizer, _render(tokenizer, record.messages[:-1], True))


def trainable_tokens(example: Example) -> int:
    """Labels the loss sees after the causal shift (token t predicts label t+1)."""
    return sum(1 for x in example.labels[1:] if x != IGNORE)


def tokenize_all(records: list[Record], tokenizer, seq_len: int) -> tuple[list[Example], int]:
    """Examples with at least one trained token, and how many were dropped (the answer was cut off)."""
    out, dropped = [], 0
    for r in records:
        ex = tokenize(r, tokenizer, seq_len)
        if trainable_tokens(ex) == 0:
            dropped += 1
            continue
        out.append(ex)
    return out, dropped


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Greedy packing in the given order: each sequence holds whole examples up to seq_len tokens.
    Position ids restart at every example (transformers then keeps attention inside each one), and the
    first label of each example is masked so no example predicts across a boundary."""
    out: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > seq_len:
            out.append(Example(ids, labels, pos))
            ids, labels, pos = [], [], []
        ids += ex.input_ids
        labels += [IGNORE] + ex.labels[1:]
        pos += list(range(len(ex.input_ids)))
    if ids:
        out.append(Example(ids, labels, pos))
    return out


# ---------------------------------------------------------------- splits and mixing


#: The held-out split when there is no validation file: ceil(val_ratio x n) examples, raised to
#: MIN_HELD_OUT where that keeps at least 1 - MAX_HELD_OUT_SHARE of the data for training (a 5 % split
#: alone reaches 20 examples only from 381; it held out 1 of 20, and early stopping acted on that one).
MIN_HELD_OUT = 20
MAX_HELD_OUT_SHARE = 0.2
#: Early stopping, and keeping the best evaluation's weights, need this many validation examples; with
#: fewer the validation loss is logged only and the last step's weights are kept. Measured by
#: benchmarks/early_stopping_validation_size.py (demo-tiny overfitting 32 and 64 examples, early stopping
#: replayed on random validation subsets): the weights kept on 20 examples were more than 10 % worse than
#: those kept on all 200 in 14-15 % of subsets, and no worse than the last step's in 85-98 %; on one example
#: 62-64 % and 38-80 %, on ten 30-31 % and 69-94 %.
MIN_EARLY_STOPPING_EXAMPLES = 20


def held_out_count(n: int, ratio: float) -> int:
    """Records the validation split holds out of n (0 without a ratio or with fewer than 2 records)."""
    if ratio <= 0 or n < 2:
        return 0
    wanted = max(math.ceil(ratio * n), min(MIN_HELD_OUT, math.floor(MAX_HELD_OUT_SHARE * n)))
    return min(n - 1, wanted)


def split_validation(records: list[Record], ratio: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out held_out_count(n, ratio) records, chosen by the random seed."""
    n_val = held_out_count(len(records), ratio)
    if n_val == 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def replay_count(n_task: int, ratio: float) -> int:
    """Replay examples so that they are `ratio` of the mixed training set: n / (n_task + n) = ratio."""
    return round(n_task * ratio / (1 - ratio)) if ratio > 0 else 0


def mix_replay(task: list[Example], replay: list[Example], ratio: float, seed: int) -> list[Example]:
    """Task examples plus replay examples drawn (without replacement while they last) by the random seed."""
    n = replay_count(len(task), ratio)
    if n == 0 or not replay:
        return list(task)
    rng = random.Random(seed + 1)
    picked: list[Example] = []
    while len(picked) < n:
        picked += rng.sample(replay, min(len(replay), n - len(picked)))
    return list(task) + picked


# ---------------------------------------------------------------- batches


class Stream:
    """The run's micro-batches as one deterministic sequence over epochs.

    Epoch e visits the examples in a permutation drawn from a generator seeded with (seed, e), in global
    micro-batches of micro_batch x world examples (an incomplete last one is dropped); process r takes
    its slice [r*micro_batch, (r+1)*micro_batch). Micro-batch k of the run is a function of k alone, so a
    resumed run continues at k = optimizer step x grad_accum with exactly the data it would have seen.
    """

    def __init__(self, examples: list[Example], micro_batch: int, world: int, rank: int, seed: int) -> None:
        self.examples = examples
        self.micro_batch = micro_batch
        self.world = world
        self.rank = rank
        self.seed = seed
        self.per_epoch = len(examples) // (micro_batch * world)
        if self.per_epoch == 0:
            raise UserError(f"{len(examples)} training examples cannot fill one batch of micro_batch {micro_batch} "
                            f"x {world} process(es). Hint: add data or lower micro_batch")
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._orders[epoch]

    def micro_batch_at(self, k: int) -> list[Example]:
        epoch, i = divmod(k, self.per_epoch)
        size = self.micro_batch * self.world
        start = i * size + self.rank * self.micro_batch
        order = self._order(epoch)
        return [self.examples[j] for j in order[start:start + self.micro_batch]]

    def epoch_of(self, k: int) -> float:
        return k / self.per_epoch


def collate(examples: list[Example], pad_id: int, packed: bool, padding_free: bool = False) -> dict[str, Any]:
    """Right-padded tensors. Unpacked batches get an attention mask; packed ones position ids instead.
    `padding_free`: the examples concatenated into one row, with their position ids (each restarting) and the
    first label of each masked, so that no example predicts across a boundary (as TRL's padding-free collator)."""
    import torch

    if padding_free and len(examples) > 1:
        ids = [t for e in examples for t in e.input_ids]
        labels = [t for e in examples for t in [IGNORE] + e.labels[1:]]
        pos = [t for e in examples for t in e.position_ids]
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                "position_ids": torch.tensor([pos])}

    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    pos = torch.zeros((len(examples), n), dtype=torch.long)
    for row, e in enumerate(examples):
        m = len(e.input_ids)
        ids[row, :m] = torch.tensor(e.input_ids)
        labels[row, :m] = torch.tensor(e.labels)
        mask[row, :m] = 1
        pos[row, :m] = torch.tensor(e.position_ids)
    batch = {"input_ids": ids, "labels": labels}
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    return batch


def batches(examples: list[Example], size: int) -> Iterator[list[Example]]:
    for i in range(0, len(examples), size):
        yield examples[i:i + size]


# ---------------------------------------------------------------- the run's data


@dataclass
class RunData:
    train: list[Example]
    validation: list[Example]
    validation_records: list[Record]  # for exact-match accuracy
    retention: list[Example]
    n_task: int
    n_replay: int
    dropped: int
    packed: bool

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.train)


@dataclass
class RunRecords:
    """The plan's records, every line checked: training (after the validation split and data.samples),
    validation, replay and retention."""

    train: list[Record]
    validation: list[Record]
    replay: list[Record]
    retention: list[Record]


def read_run_records(plan) -> tuple[RunRecords | None, list[str]]:
    """Every data file of the plan, each read to the end; returns the records (None when a file has a
    problem) and one line per problem: a file's first bad line, a missing file, a missing setting."""
    d = plan.data
    problems: list[str] = []

    def read(path: str | None, fmt: str) -> list[Record]:
        if not path:
            return []
        try:
            return read_jsonl(path, fmt)
        except UserError as err:
            problems.append(str(err))
            return []

    if not d.train:
        problems.append("the plan has no training data: set data.train to a JSONL file (--set train=PATH)")
    records = read(d.train, d.format)
    if d.validation:
        val_records = read(d.validation, d.format)
    else:
        records, val_records = split_validation(records, d.val_ratio, plan.hparams.seed)
    if d.samples is not None:
        records = records[: d.samples]
    replay_records = read(d.replay, "auto")
    if d.replay_ratio > 0 and not d.replay:
        problems.append("data.replay_ratio > 0 needs data.replay (a general-text JSONL)")
    retention_records = read(d.retention, "auto")
    if problems:
        return None, problems
    return RunRecords(records, val_records, replay_records, retention_records), []


def load_run_data(plan, tokenizer, records: RunRecords | None = None) -> RunData:
    """Tokenize the plan's records (read and checked here when not given) before any training starts."""
    d = plan.data
    if records is None:
        records, problems = read_run_records(plan)
        if problems:
            raise UserError(problems[0])
    records, val_records, replay_records, retention_records = \
        records.train, records.validation, records.replay, records.retention
    train, dropped = tokenize_all(records, tokenizer, plan.seq_len)
    if not train:
        raise UserError(f"{d.train}: no example keeps a response token within seq_len {plan.seq_len}. "
                        "Hint: raise seq_len")
    validation, _ = tokenize_all(val_records, tokenizer, plan.seq_len)
    replay, _ = tokenize_all(replay_records, tokenizer, plan.seq_len)
    retention, _ = tokenize_all(retention_records, tokenizer, plan.seq_len)
    mixed = mix_replay(train, replay, d.replay_ratio, plan.hparams.seed)
    n_replay = len(mixed) - len(train)
    if d.packing:
        order = list(range(len(mixed)))
        random.Random(plan.hparams.seed).shuffle(order)
        mixed = pack([mixed[i] for i in order], plan.seq_len)
    scored = [r for r in val_records if r.answer is not None]
    return RunData(train=mixed, validation=validation, validation_records=scored, retention=retention,
                   n_task=len(train), n_replay=n_replay,
                   dropped=dropped, packed=d.packing)
