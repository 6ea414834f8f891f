"""memplan train's parts without a training run: --set parsing, data reading and masking, batching."""

import json

import pytest

from memplan.errors import UserError
from memplan.train import data as D
from memplan.train.settings import parse_sets, resolve_key, resolve_plan

from helpers import build_tiny_model, task_records, write_jsonl, write_plan


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from memplan.runtime.model import load_tokenizer

    return load_tokenizer(build_tiny_model(tmp_path_factory.mktemp("tok")), False)


def test_set_keys_shorthands_and_values():
    assert resolve_key("lr") == "hparams.lr"
    assert resolve_key("rank") == "lora.rank"
    assert resolve_key("micro-batch") == "micro_batch"
    assert resolve_key("data.train") == "data.train"
    sets = parse_sets(["lr=1e-5", "rank=32", "grad_ckpt=false", "targets=q_proj,v_proj", "max_steps=7"])
    assert sets == {"hparams.lr": 1e-5, "lora.rank": 32, "grad_ckpt": False,
                    "lora.targets": "q_proj,v_proj", "hparams.max_steps": 7}
    with pytest.raises(UserError, match="not a plan field.*Did you mean"):
        resolve_key("lrr")
    with pytest.raises(UserError, match="expected key=value"):
        parse_sets(["lr"])


def test_plan_paths_relative_to_file_and_cwd(tmp_path, monkeypatch):
    plan = write_plan(tmp_path / "p", tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    r = resolve_plan(str(plan), ["validation=elsewhere/v.jsonl", "lora.rank=8"])
    assert r.plan.data.train == str((tmp_path / "p" / "train.jsonl").resolve())
    assert r.plan.data.validation == str((tmp_path / "elsewhere" / "v.jsonl").resolve())
    assert r.plan.lora.rank == 8
    assert r.output_dir == tmp_path / "p"
    with pytest.raises(UserError, match="micro_batch"):
        resolve_plan(str(plan), ["micro_batch=0"])


def test_jsonl_formats_and_errors(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", task_records(3))
    assert [r.answer for r in D.read_jsonl(alpaca)] == [t["output"] for t in task_records(3)]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "HI"}]}])
    assert D.read_jsonl(chat)[0].messages[1] == {"role": "assistant", "content": "HI"}
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    assert D.read_jsonl(text)[0].text == "plain words"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(task_records(1)[0]) + "\n\n{\"instruction\": \"x\", \"output\": \n")
    with pytest.raises(UserError, match=r"bad.jsonl:3: malformed JSON"):
        D.read_jsonl(bad)
    bad.write_text(json.dumps({"instruction": "x", "output": 5}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: 'output' must be a string"):
        D.read_jsonl(bad)
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: cannot tell the format"):
        D.read_jsonl(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match="at least one assistant"):
        D.read_jsonl(bad)


def test_labels_only_on_the_answer(tokenizer):
    record = D._parse(task_records(1)[0], "alpaca", "x:1")
    ex = D.tokenize(record, tokenizer, 256)
    labelled = [t for t in ex.labels if t != D.IGNORE]
    # the labelled tokens are exactly the answer and the end-of-sequence token
    assert tokenizer.decode(labelled, skip_special_tokens=True) == record.answer
    assert labelled[-1] == tokenizer.eos_token_id
    assert ex.input_ids[: len(D.prompt_ids(record, tokenizer))] == D.prompt_ids(record, tokenizer)
    assert all(x == D.IGNORE for x in ex.labels[: len(D.prompt_ids(record, tokenizer))])
    short = D.tokenize(record, tokenizer, 5)  # cut inside the prompt: nothing to learn
    assert len(short.input_ids) == 5 and D.trainable_tokens(short) == 0


def test_packing_restarts_positions(tokenizer):
    records = [D._parse(r, "alpaca", "x") for r in task_records(6)]
    examples, _ = D.tokenize_all(records, tokenizer, 200)
    packed = D.pack(examples, 200)
    assert len(packed) < len(examples)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    first = packed[0]
    starts = [i for i, p in enumerate(first.position_ids) if p == 0]
    assert len(starts) >= 2 and all(first.labels[i] == D.IGNORE for i in starts)
    batch = D.collate(packed[:2], tokenizer.pad_token_id, packed=True)
    assert "position_ids" in batch and "attention_mask" not in batch


def test_stream_is_a_function_of_the_position():
    examples = [D.Example([i, i], [i, i]) for i in range(10)]
    one = D.Stream(examples, micro_batch=2, world=1, rank=0, seed=3)
    r0 = D.Stream(examples, micro_batch=1, world=2, rank=0, seed=3)
    r1 = D.Stream(examples, micro_batch=1, world=2, rank=1, seed=3)
    for k in (0, 4, 5, 11):  # across the epoch boundary (5 micro-batches per epoch)
        assert one.micro_batch_at(k) == r0.micro_batch_at(k) + r1.micro_batch_at(k)
    epoch0 = [e.input_ids[0] for k in range(5) for e in one.micro_batch_at(k)]
    assert sorted(epoch0) == list(range(10))
    assert D.replay_count(80, 0.2) == 20 and D.replay_count(80, 0.0) == 0


def test_live_tensor_bytes_counts_allocations():
    import torch

    from memplan.runtime.meter import LiveBytes

    base = torch.zeros(1000)
    mode = LiveBytes()
    mode.register([base])
    with mode:
        a = torch.ones(2000)
        b = a * 2
        del a, b
        c = torch.ones(500)
    assert mode.peak == 4000 + 8000 + 8000
    assert mode.live == 4000 + 2000
    del c


def test_exact_match_batches_left_padded_prompts(tokenizer):
    import contextlib

    import torch

    from memplan.train.evaluate import exact_match

    records = [D._parse(r, "alpaca", "x") for r in task_records(5, seed=9)]
    answers = {tuple(D.prompt_ids(r, tokenizer)): r.answer for r in records}
    answers[tuple(D.prompt_ids(records[2], tokenizer))] = "something else"  # one wrong completion
    seen = []

    class Greedy(torch.nn.Module):
        """Completes each known prompt with its answer, the end-of-sequence token, then padding."""

        def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kw):
            rows = []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                assert mask == sorted(mask)  # left padding
                prompt = tuple(i for i, m in zip(ids, mask) if m)
                seen.append(prompt)
                new = tokenizer(answers[prompt], add_special_tokens=False)["input_ids"] + [eos_token_id]
                rows.append(ids + (new + [pad_token_id] * max_new_tokens)[:max_new_tokens])
            return torch.tensor(rows)

    score = exact_match(Greedy(), records, tokenizer, "cpu", contextlib.nullcontext, limit=10, batch_size=2)
    assert score == 4 / 5
    assert sorted(seen) == sorted(answers)
    assert exact_match(Greedy(), records, tokenizer, "cpu", contextlib.nullcontext, limit=2) == 1.0


def test_chat_records_use_the_tokenizers_template(tmp_path):
    from memplan.runtime.model import load_tokenizer

    tok = load_tokenizer(build_tiny_model(tmp_path, chat_template=True), False)
    record = D._parse({"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "apple"},
                                    {"role": "assistant", "content": "APPLE"},
                                    {"role": "user", "content": "river"},
                                    {"role": "assistant", "content": "RIVER"}]}, "chat", "c:1")
    ex = D.tokenize(record, tok, 512)
    assert tok.decode(ex.input_ids).startswith("<|system|>Be brief.<|user|>apple<|assistant|>APPLE</s>")
    spans, current = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != D.IGNORE:
            current.append(tid)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [tok.decode(s) for s in spans if s] == ["APPLE</s>", "RIVER</s>"]  # both assistant turns, nothing else


def test_a_cuda_run_reports_its_reserved_peak_against_the_estimate():
    """On CUDA, memplan train's memory report sets torch.cuda.max_memory_reserved beside the estimate's reserved
    figure at the shape the steps ran (the allocation stream replayed: a run is the fresh process it predicts)."""
    from types import SimpleNamespace

    from memplan.catalog.presets import models_dir
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.plan import Plan
    from memplan.report.train import memory_line
    from memplan.train.loop import memory_report

    plan = Plan(model="qwen2.5-0.5b", method="lora", precision="bf16", seq_len=1024)
    shaped = estimate(resolve_model("qwen2.5-0.5b"), plan.model_copy(update={"seq_len": 900}))
    meter = SimpleNamespace(peak_bytes=shaped.peak_allocated, reserved_bytes=int(shaped.reserved * 1.05), cuda=True,
                            measured_steps=3, max_tokens_per_row=900)
    mem = memory_report(plan, models_dir() / "qwen2.5-0.5b", meter)
    assert mem["estimate_reserved_bytes"] == shaped.reserved and mem["reserved_basis"] == "replayed"
    assert mem["reserved_gap"] == pytest.approx(0.05, abs=1e-6)
    assert "reserved" in memory_line(mem) and "+5.0 %" in memory_line(mem)
    cpu = SimpleNamespace(peak_bytes=shaped.peak_allocated, reserved_bytes=None, cuda=False, measured_steps=2,
                          max_tokens_per_row=900)
    assert "estimate_reserved_bytes" not in memory_report(plan, models_dir() / "qwen2.5-0.5b", cpu)
