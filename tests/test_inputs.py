"""Hostile and careless inputs: every one is refused in one line (exit 2) naming what was wrong, never a
traceback; numbers are finite and bounded; nothing a plan can hold overflows memplan's arithmetic; profile
refuses a step that cannot fit before it allocates anything."""

from __future__ import annotations

import json

import pytest
import yaml

from memplan.errors import UserError
from memplan.files import MAX_DEPTH, parse_json, parse_yaml, read_text
from memplan.plan import MAX_NUMBER, DataSettings, Hyperparameters, LoraSettings, Plan, build_plan

PLAN = {"model": "demo-tiny", "method": "lora", "device": "cpu", "precision": "fp32", "seq_len": 64,
        "data": {"train": "train.jsonl"}}


def one_line(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    assert err.startswith("memplan: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


def write_plan(tmp_path, text: str | bytes, name: str = "plan.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# ---------------------------------------------------------------- files: text, JSON, YAML, depth


def test_a_plan_that_is_not_utf8_is_one_line_in_every_command(tmp_path, run_cli):
    plan = write_plan(tmp_path, yaml.safe_dump(PLAN).encode() + b"# caf\xe9 in Latin-1\n")
    for args in (["estimate", "--config", plan], ["profile", "--config", plan], ["train", plan, "--dry-run"]):
        one_line(*run_cli(*args)[::2], "cannot read plan file", "not UTF-8 text (byte 0xe9 at offset")


def test_a_binary_model_file_is_one_line(tmp_path, run_cli):
    model = tmp_path / "model.bin"
    model.write_bytes(bytes(range(256)) * 4)
    for args in (["estimate", "--model", str(model)], ["profile", "--model", str(model), "--backend", "trace"]):
        one_line(*run_cli(*args)[::2], "cannot read model config", "not UTF-8 text")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    one_line(*run_cli("estimate", "--model", str(tmp_path / "m"))[::2], "config.json: not UTF-8 text")


def test_a_byte_order_mark_is_read_as_text(tmp_path, run_cli):
    plan = write_plan(tmp_path, b"\xef\xbb\xbf" + yaml.safe_dump(PLAN).encode())
    code, out, err = run_cli("estimate", "--config", plan, "--json")
    assert code == 0, err
    assert json.loads(out)["results"][0]["plan"]["method"] == "lora"


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path, run_cli):
    deep = "[" * 100_000 + "]" * 100_000
    config = tmp_path / "config.json"
    config.write_text(deep)
    one_line(*run_cli("estimate", "--model", str(config))[::2], "nested more than 100 levels")
    plan = write_plan(tmp_path, "model: demo-tiny\nlora:\n  targets: " + deep + "\n")
    one_line(*run_cli("estimate", "--config", plan)[::2], "plan.yaml: nested more than 100 levels")
    # under Python's recursion limit, but past MAX_DEPTH: refused too, whatever reads it later
    with pytest.raises(UserError, match=f"nested {MAX_DEPTH + 1} levels deep; at most {MAX_DEPTH}"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "x.json")
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x.json") is not None


def test_deep_nesting_in_data_is_one_line_naming_file_and_line(tmp_path, run_cli):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ' + "[" * 5000 + "]" * 5000 + "}\n")
    code, _, err = run_cli("recommend", "--model", "demo-tiny", "--data", str(data))
    one_line(code, err, f"{data}:2: nested more than 100 levels")


def test_yaml_aliases_cannot_hang_or_loop_the_reader():
    # ten levels of ten aliases each: 10^10 lists if walked naively, one each when shared lists count once
    doc = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 11))
    assert parse_yaml(doc, "plan.yaml")["a10"][0][0][0][0][0][0][0][0][0][0] == ["x"]
    with pytest.raises(UserError, match="contains itself"):
        parse_yaml("model: &a [*a]\n", "plan.yaml")


def test_huge_numbers_in_files_are_one_line(tmp_path, run_cli):
    plan = write_plan(tmp_path, "model: demo-tiny\nmicro_batch: 1" + "0" * 5000 + "\n")
    one_line(*run_cli("estimate", "--config", plan)[::2], "malformed YAML", "4300 digits")
    with pytest.raises(UserError, match="malformed JSON"):
        parse_json('{"vocab_size": 1' + "0" * 5000 + "}", "config.json")


def test_read_text_says_what_and_why(tmp_path):
    with pytest.raises(UserError, match=r"cannot read data file .*missing.jsonl: No such file"):
        read_text(tmp_path / "missing.jsonl", "data file")
    with pytest.raises(UserError, match="cannot read data file .*: Is a directory"):
        read_text(tmp_path, "data file")


def test_a_json_lines_record_may_hold_a_line_separator(tmp_path):
    """JSON strings may hold U+2028 raw; only "\\n" ends a JSON Lines record."""
    from memplan.train.data import read_jsonl

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r.text for r in read_jsonl(path)] == ["one\u2028two"]


# ---------------------------------------------------------------- the plan: strict types, finite, bounded


@pytest.mark.parametrize("text, words", [
    ("output_dir: 5", ["output_dir: must be a valid string (got 5)", "quote it"]),
    ("data: {train: 7}", ["data.train: must be a valid string (got 7)"]),
    ("micro_batch: true", ["micro_batch: must be a valid integer (got True)"]),
    ("grad_ckpt: 1", ["grad_ckpt: must be a valid boolean (got 1)"]),
    ("hparams: {lr: .inf}", ["hparams.lr: must be a finite number (got inf)"]),
    ("hparams: {lr: .nan}", ["hparams.lr: must be a finite number"]),
    ("hparams: {seed: -1}", ["hparams.seed: must be greater than or equal to 0"]),
    ("seq_len: 1e400", ["seq_len: must be a valid integer"]),
    (f"seq_len: {MAX_NUMBER + 1}", ["seq_len: must be at most 2,147,483,647 (got 2147483648)"]),
    ("hparams: {epochs: 1e300}", ["hparams.epochs: must be at most 2,147,483,647"]),
    ("model: [a, b]", ["model: must be a valid string"]),
])
def test_plan_values_are_taken_as_written(tmp_path, run_cli, text, words):
    plan = write_plan(tmp_path, "model: demo-tiny\nmethod: lora\ndevice: cpu\n" + text + "\n")
    for args in (["estimate", "--config", plan], ["train", plan, "--dry-run"]):
        code, _, err = run_cli(*args)
        one_line(code, err, "plan.yaml: ", *words)


def test_an_exponent_without_a_dot_is_a_number(tmp_path, run_cli):
    """YAML 1.1 reads `2e-5` as text; a float field takes it as the number it spells (an int field does not)."""
    plan = write_plan(tmp_path, "model: demo-tiny\nmethod: lora\nhparams: {lr: 2e-5, epochs: 1E1}\nlora: {alpha: 3e1}\n")
    code, _, err = run_cli("train", plan, "--dry-run", "--json")
    assert "hparams.lr" not in err and "lora.alpha" not in err and "epochs" not in err, err
    p = build_plan({"hparams": {"lr": "2e-5", "epochs": "1E1"}, "lora": {"alpha": "3e1"}})
    assert (p.hparams.lr, p.hparams.epochs, p.lora.alpha) == (2e-5, 10.0, 30.0)
    with pytest.raises(UserError, match="seq_len: must be a valid integer"):
        build_plan({"seq_len": "2e3"})


def test_every_number_a_plan_holds_is_bounded():
    """Each int and float field of every plan section refuses MAX_NUMBER + 1 (a field added later too)."""
    sections = {"": Plan, "lora.": LoraSettings, "hparams.": Hyperparameters, "data.": DataSettings}
    checked = 0
    for prefix, model in sections.items():
        for name, info in model.model_fields.items():
            kinds = {info.annotation, *getattr(info.annotation, "__args__", ())}
            if not kinds & {int, float} or bool in kinds:
                continue
            checked += 1
            value = {"lora": {}, "hparams": {}, "data": {}}
            target = value[prefix.rstrip(".")] if prefix else value
            target[name] = MAX_NUMBER + 1
            with pytest.raises(UserError, match=f"{prefix}{name}: must be (at most 2,147,483,647|less than)"):
                build_plan(value, source="plan.yaml")
    assert checked >= 20


def test_set_values_are_named_as_typed(tmp_path, run_cli):
    plan = write_plan(tmp_path, yaml.safe_dump(PLAN))
    code, _, err = run_cli("train", plan, "--dry-run", "--set", "micro_batch=true", "--set", "lr=.inf",
                           "--set", "train=7", "--set", "rank=1e400")
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        "memplan: error: --set rank=1e400: must be a valid integer",
        "memplan: error: --set micro_batch=true: must be a valid integer",
        "memplan: error: --set lr=.inf: must be a finite number",
        "memplan: error: --set train=7: must be a valid string. Hint: quote it ('5'): YAML reads unquoted numbers, "
        "true/false and dates as such",
    ]


# ---------------------------------------------------------------- numeric options


@pytest.mark.parametrize("args, words", [
    (["estimate", "--model", "demo-tiny", "--batch-size", "1" + "0" * 400], ["--batch-size: 1000", "is more than 2,147,483,647"]),
    (["estimate", "--model", "demo-tiny", "--method", "lora", "--lora-alpha", "nan"], ["--lora-alpha: nan is not a finite number"]),
    (["recommend", "--model", "demo-tiny", "--dataset-size", "1000", "--epochs", "inf"], ["--epochs: inf is not a finite number"]),
    (["recommend", "--model", "demo-tiny", "--dataset-size", "1" + "0" * 400], ["--dataset-size: 1000", "is more than"]),
    (["recommend", "--model", "demo-tiny", "--dataset-size", "1000", "--max-hours", "1e999"], ["--max-hours: 1e999 is not a finite"]),
    (["estimate", "--model", "demo-tiny", "--gpu-memory", "1e400GiB"], ["memory size '1e400GiB' is not a finite number of bytes"]),
    (["profile", "--model", "demo-tiny", "--steps", "0"], ["--steps: 0 is less than 1"]),
])
def test_numeric_options_are_finite_and_bounded(run_cli, args, words):
    code, _, err = run_cli(*args)
    one_line(code, err, *words)


def test_recommend_refuses_a_step_count_no_plan_can_hold(run_cli):
    # (2,000 examples: two billion would not fit the host RAM, memplan train tokenizing every one of them)
    code, _, err = run_cli("recommend", "--model", "demo-tiny", "--dataset-size", "2000", "--epochs", "2000000000")
    one_line(code, err, "2e+09 epochs of 2,000 examples", "more than the 2,147,483,647 a plan can count",
             "Hint: fewer --epochs")


# ---------------------------------------------------------------- profile: room to run, checked first


@pytest.fixture
def nothing_measured(monkeypatch):
    import memplan.profile.launch

    def refuse(*a, **k):
        raise AssertionError("a step ran")

    monkeypatch.setattr(memplan.profile.launch, "measure_plan", refuse)
    monkeypatch.setattr(memplan.profile.launch, "probe_in_subprocess", refuse)


@pytest.mark.usefixtures("nothing_measured")
def test_profile_refuses_a_step_larger_than_this_machine_before_allocating(run_cli):
    # 10^9 tokens: tens of TiB by the estimate, on any machine
    args = ["profile", "--model", "demo-tiny", "--backend", "cpu", "--seq-len", "1000000000"]
    code, out, err = run_cli(*args, "--device", "cpu")
    assert code == 1 and out.count("\n") == 1, (out, err)
    assert out.startswith("does not fit: by the estimate the cpu backend needs ") and "nothing was run" in out
    code, out, _ = run_cli(*args, "--device", "cpu", "--json")
    result = json.loads(out)
    assert code == 1 and result["profile"]["ran"] is False and result["results"][0]["measured"] is None
    assert result["profile"]["verdict"].startswith("does not fit")
    # a GPU plan that the cpu backend cannot hold here: not the plan's answer, a measurement that cannot run
    one_line(*run_cli(*args)[::2], "cpu backend needs", "Hint: --backend trace")


def test_profile_on_a_gpu_compares_with_its_memory(monkeypatch):
    from memplan.catalog import gpus
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.profile.command import room_here

    spec = resolve_model("demo-tiny")
    small, large = (build_plan({"model": "demo-tiny", "seq_len": s}) for s in (64, 10**9))
    monkeypatch.setattr(gpus, "local_gpus", lambda: [gpus.custom_gpu(80 * 2**30)])
    assert room_here(estimate(spec, small, kernels="cuda"), small, "cuda") is None
    code, line = room_here(estimate(spec, large, kernels="cuda"), large, "cuda")
    assert code == 1 and line.startswith("does not fit: by the estimate each GPU holds") and "nothing was run" in line
    code, line = room_here(estimate(spec, small, kernels="cuda"), small, "cuda", memory_limit=2**20)
    assert code == 1 and "the allocator's cap" in line
    assert room_here(estimate(spec, large, kernels="cpu"), large, "trace") is None  # fake tensors hold nothing


def test_find_max_batch_does_not_probe_what_cannot_fit_here(run_cli, monkeypatch):
    import memplan.profile.launch
    import memplan.recommend.hardware
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.profile.run import Measured
    from memplan.runtime.meter import StepMeasure

    spec = resolve_model("demo-tiny")
    fields = {"model": "demo-tiny", "device": "cpu", "precision": "fp32", "seq_len": 64}
    need = {b: estimate(spec, build_plan(dict(fields, micro_batch=b)), kernels="cpu").peak_allocated for b in (8, 9)}
    from memplan.recommend.hardware import PROCESS_BASELINE_BYTES

    monkeypatch.setattr(memplan.recommend.hardware, "available_memory_bytes",
                        lambda: (need[8] + need[9]) // 2 + PROCESS_BASELINE_BYTES)
    probed = []

    def probe(req):  # every probe that runs fits: only this machine's RAM limits the batch
        probed.append(req.plan["micro_batch"])
        return [Measured(backend="cpu", steps=[StepMeasure(peaks={"forward": 1, "backward": 1, "optimizer": 1})],
                         after_load=1)]

    monkeypatch.setattr(memplan.profile.launch, "probe_in_subprocess", probe)
    monkeypatch.setattr(memplan.profile.launch, "measure_plan", lambda req: probe(req))
    code, out, err = run_cli("profile", "--model", "demo-tiny", "--device", "cpu", "--precision", "fp32",
                             "--seq-len", "64", "--backend", "cpu", "--find-max-batch", "--gpu-memory", "1000GiB",
                             "--json")
    assert code == 0, err
    found = json.loads(out)["max_batch"]
    assert found["value"] == 8
    assert max(probed) == 8
    skipped = [p for p in found["probes"] if "not_run" in p]
    assert skipped and all(p["micro_batch"] > 8 and not p["fits"] for p in skipped)
