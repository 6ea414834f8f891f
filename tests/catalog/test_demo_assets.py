"""The shipped demo assets: the date-format dataset, the general text, the tokenizer and demo-tiny.

demo-tiny is loaded as `memplan train` loads it (transformers, offline, from the preset directory),
its parameter count is checked against memplan's analytic count, and its perplexity on the held-out
retention text is measured here, not read from a file.
"""

from __future__ import annotations

import calendar
import datetime as dt
import importlib.util
import json
import math
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from memplan.catalog.presets import models_dir, preset_info
from memplan.catalog.resolve import resolve_model

from support import REPO

DEMO = REPO / "data" / "demo"
MODEL = models_dir() / "demo-tiny"
LONG_DATE = re.compile(r"\b(\d{1,2}) (" + "|".join(calendar.month_name[1:]) + r") (\d{4})\b")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, local_files_only=True).eval()


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _date_of(example: dict) -> dt.date:
    """The date an example asks about ("14 January 1984"): its input, or inside the instruction when
    input is empty."""
    found = LONG_DATE.findall(example["input"] or example["instruction"])
    assert len(found) == 1, example
    day, month, year = found[0]
    return dt.date(int(year), list(calendar.month_name).index(month), int(day))


@pytest.mark.parametrize("split, minimum", [("train", 500), ("val", 50), ("test", 100)])
def test_instruction_split_parses_and_answers_are_right(split, minimum):
    rows = _jsonl(DEMO / f"{split}.jsonl")
    assert len(rows) >= minimum
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values())
        assert row["output"] == _date_of(row).isoformat()
    assert any(not r["input"] for r in rows) and any(r["input"] for r in rows)  # both alpaca forms
    assert len({r["instruction"] for r in rows if r["input"]}) > 1  # varied phrasing


def test_splits_are_disjoint():
    dates = {split: [_date_of(r) for r in _jsonl(DEMO / f"{split}.jsonl")] for split in ("train", "val", "test")}
    assert all(len(v) == len(set(v)) for v in dates.values())
    assert not set(dates["val"]) & set(dates["train"])
    assert not set(dates["test"]) & (set(dates["train"]) | set(dates["val"]))


def test_general_text_and_retention_are_disjoint_and_small():
    general = _jsonl(DEMO / "general.jsonl")
    retention = _jsonl(DEMO / "retention.jsonl")
    assert all(set(r) == {"text"} and r["text"].strip() for r in general + retention)
    assert len(general) >= 1000 and len(retention) >= 100
    assert not {r["text"] for r in general} & {r["text"] for r in retention}
    assert (DEMO / "retention.jsonl").stat().st_size < 400_000
    shipped = sum(p.stat().st_size for p in DEMO.glob("*.jsonl"))
    assert shipped < 4_000_000


@pytest.mark.slow
def test_make_demo_is_reproducible(tmp_path):
    """The script regenerates the shipped files; the general text (and the tokenizer trained on it)
    is Python's own documentation, so it is byte-identical under the Python version that made it."""
    subprocess.run([sys.executable, str(DEMO / "make_demo.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
    made_by = (DEMO / "python_version.txt").read_text().strip()
    if platform.python_version() == made_by:
        for name in ("general.jsonl", "retention.jsonl", "tokenizer/tokenizer.json"):
            assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name
    else:
        assert len(_jsonl(tmp_path / "general.jsonl")) >= 1000


# ---------------------------------------------------------------------------------------------
# Tokenizer and chat template
# ---------------------------------------------------------------------------------------------


def test_tokenizer_loads_with_special_tokens(tokenizer):
    assert (DEMO / "tokenizer" / "tokenizer.json").read_bytes() == (MODEL / "tokenizer.json").read_bytes()
    assert len(tokenizer) <= 4096
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert None not in ids and len(ids) == 3
    # plain text gets <s> in front, as in pre-training; digits are single tokens
    ids = tokenizer("in 2024")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids)[-4:] == ["2", "0", "2", "4"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "in 2024"


def test_chat_template_renders_and_masks_the_reply(tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Convert this date to ISO format (YYYY-MM-DD).\n\n14 January 1984"},
        {"role": "assistant", "content": "1984-01-14"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<s><|system|>\nAnswer briefly.\n<|user|>\nConvert this date to ISO format (YYYY-MM-DD)."
                    "\n\n14 January 1984\n<|assistant|>\n1984-01-14</s>")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>\n")

    enc = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    reply = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(reply) == "1984-01-14</s>"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and sum(mask) == len(ids) - len(prompt_ids)

    with pytest.raises(Exception, match="roles must be system, user or assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# ---------------------------------------------------------------------------------------------
# demo-tiny
# ---------------------------------------------------------------------------------------------


def test_demo_tiny_preset_entry():
    info = preset_info("demo-tiny")
    assert info["family"] == "llama" and "demo" in info["aliases"]
    assert (REPO / info["source"]).is_file()
    assert resolve_model("demo").name == "demo-tiny"


def test_shipped_weights_match_the_analytic_count(model, tokenizer):
    spec = resolve_model("demo-tiny")
    weights = MODEL / "model.safetensors"
    with safe_open(weights, framework="pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == spec.params_total == sum(p.numel() for p in model.parameters())
    assert 2_000_000 < spec.params_total < 10_000_000
    assert spec.vocab_size == len(tokenizer) and spec.tie_word_embeddings
    assert weights.stat().st_size < 20 * 2**20


def _retention_perplexity(model, tokenizer, seq_len: int = 256) -> float:
    ids: list[int] = []
    for row in _jsonl(DEMO / "retention.jsonl"):
        ids += tokenizer(row["text"])["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(ids)
    full = len(ids) // seq_len * seq_len
    batches = list(ids[:full].view(-1, seq_len).split(16)) + [ids[full:][None]]  # 16 blocks per forward
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            loss = model(input_ids=batch, labels=batch).loss  # mean over each row's len - 1 predictions
            nll += loss.item() * batch.numel() - loss.item() * len(batch)
            count += batch.numel() - len(batch)
    return math.exp(nll / count)


def test_pretrained_model_models_held_out_text(model, tokenizer):
    """An untrained model is near-uniform over the vocabulary (perplexity ~ vocab size); the
    pre-trained one must be far below, and agree with what the pre-training script reported."""
    ppl = _retention_perplexity(model, tokenizer)
    summary = json.loads((MODEL / "pretrain_summary.json").read_text())
    assert ppl < len(tokenizer) / 10
    assert ppl == pytest.approx(summary["retention_perplexity_after"], rel=1e-3)
    assert summary["retention_perplexity_before"] > len(tokenizer) / 2


def _pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_demo_tiny", DEMO / "pretrain_demo_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrained_model_copies_from_its_context(model, tokenizer):
    """The repetition exercises gave demo-tiny in-context copying: it predicts most tokens of held-out
    digit strings written a second time (an untrained or text-only model predicts ~1 in 6), as the
    pre-training script reported."""
    copied = _pretrain_script().copy_accuracy(model, tokenizer)
    summary = json.loads((MODEL / "pretrain_summary.json").read_text())
    assert copied > 0.8
    assert copied == pytest.approx(summary["copy_accuracy"], abs=1e-9)


ARCHITECTURE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "hidden_act",
                     "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "rope_parameters",
                     "bos_token_id", "eos_token_id", "pad_token_id")


@pytest.mark.slow
def test_pretrain_script_runs(tmp_path, tokenizer):
    """Two steps of the committed pre-training script write a loadable model with the same shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path / "demo-tiny"
    command = [sys.executable, str(DEMO / "pretrain_demo_tiny.py"), "--steps", "2", "--retention-blocks", "2",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "retention perplexity" in result.stdout
    # The architecture must match the shipped model's; which transformers release wrote the file does not.
    written, shipped = (AutoConfig.from_pretrained(d, local_files_only=True) for d in (out, MODEL))
    for key in ARCHITECTURE_KEYS:
        assert getattr(written, key) == getattr(shipped, key), key
    reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert sum(p.numel() for p in reloaded.parameters()) == resolve_model("demo-tiny").params_total
    assert json.loads((out / "pretrain_summary.json").read_text())["steps"] == 2
