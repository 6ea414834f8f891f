"""`memplan train` checks that a plan can run here before it imports anything heavy, and reports every problem
at once (one line each, exit code 2), with hints that never lead into another error; --dry-run too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memplan.train import preflight

from helpers import run_dir
from support import REPO

HEAVY = ("torch", "transformers", "peft", "accelerate", "deepspeed", "bitsandbytes")


@pytest.fixture
def bare_machine(monkeypatch):
    """A machine without CUDA, DeepSpeed or flash-attn (whatever this one has)."""
    monkeypatch.setattr(preflight.Machine, "cuda", property(lambda self: False))
    has = preflight.Machine.has
    monkeypatch.setattr(preflight.Machine, "has",
                        staticmethod(lambda p: False if p in ("deepspeed", "flash_attn") else has(p)))


def _gpu_plan(tmp_path, **fields) -> Path:
    """A plan as `memplan recommend` writes it for two GPUs: DeepSpeed ZeRO-3, bf16-master, a preset model
    without weights, and a data file that is not there."""
    plan = dict(model="llama-2-7b", method="full", precision="bf16-master", optimizer="adamw-fused", device="cuda",
                sharding="deepspeed", zero=3, gpus=2, micro_batch=1, grad_accum=16, seq_len=2048,
                data={"train": "missing.jsonl"}, **fields)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def _errors(err: str) -> list[str]:
    lines = err.splitlines()
    assert lines and all(line.startswith("memplan: error: ") for line in lines), err
    return [line.removeprefix("memplan: error: ") for line in lines]


def _set_hints(line: str) -> list[list[str]]:
    """The `--set k=v ...` alternatives of a line's hint, each as a list of `k=v`."""
    hint = line.partition(". Hint: ")[2]
    out = []
    for alt in hint.split(", or "):
        words = alt.split()
        if words and words[0] == "--set":
            out.append([w for w in words if w != "--set"])
    return out


def _problem(line: str) -> str:
    return line.partition(". Hint: ")[0]


def _assert_hints_hold(run_cli, plan: Path, lines: list[str]) -> int:
    """Every --set hint removes its own problem and adds none; returns how many hints there were."""
    n = 0
    before = {_problem(line) for line in lines}
    for line in lines:
        for sets in _set_hints(line):
            n += 1
            code, _, err = run_cli("train", str(plan), *[a for s in sets for a in ("--set", s)])
            after = {_problem(x) for x in _errors(err)} if code else set()
            assert after <= before - {_problem(line)}, (line, sets, after - before)
    return n


def test_fsdp_offloading_on_one_gpu_runs_under_accelerate_with_its_fsdp_config(tmp_path):
    """A plan `memplan recommend` makes for one GPU: FSDP with CPU offload. accelerate applies FSDP from its launch
    config, so memplan train launches it (one process) and needs that config, as for several GPUs; without offload
    one GPU has nothing to shard and runs as a plain process."""
    from memplan.plan import build_plan
    from memplan.recommend.writers import distributed_type
    from memplan.train.launch import needs_launcher

    fields = dict(model="llama-2-7b", method="full", precision="bf16", device="cuda", sharding="fsdp", zero=3, gpus=1)
    offloaded, alone = build_plan(dict(fields, offload="optimizer+params")), build_plan(fields)
    assert needs_launcher(offloaded) and distributed_type(offloaded) == "FSDP"
    assert not needs_launcher(alone) and distributed_type(alone) == "NO"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(offloaded.model_dump(mode="json")))
    problems = preflight._launch_problems(offloaded, path)
    assert [p.text for p in problems] == [f"1 GPUs need {tmp_path / 'accelerate_config.yaml'} (the launch settings)"]
    assert preflight._launch_problems(alone, path) == []


def test_every_problem_at_once_with_hints_that_hold(tmp_path, run_cli, bare_machine):
    plan = _gpu_plan(tmp_path)
    code, out, err = run_cli("train", str(plan))
    lines = _errors(err)
    assert code == 2 and out == ""
    assert len(lines) == 5, lines
    assert "DeepSpeed, which is not installed. Hint: pip install deepspeed" in lines[0]
    assert "accelerate_config.yaml, which does not exist" in lines[1]
    assert "torch sees no CUDA device" in lines[2]
    assert "preset without shipped weights" in lines[3]
    assert "cannot read data file" in lines[4] and "missing.jsonl" in lines[4]
    # FSDP under bf16-master runs on the CPU only, and ZeRO-3 DeepSpeed needs CUDA: neither is suggested
    assert "sharding=fsdp" not in err and "device=cpu" not in err

    # a plan with hints that hold: DeepSpeed ZeRO-2 on one GPU with flash-attention, demo-tiny, real data
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    plan = tmp_path / "plan2.yaml"
    plan.write_text(yaml.safe_dump(dict(model="demo-tiny", method="full", precision="bf16-master", device="cuda",
                                        sharding="deepspeed", zero=2, gpus=1, micro_batch=1, seq_len=64,
                                        attn="flash", data={"train": str(data)})))
    code, _, err = run_cli("train", str(plan))
    lines = _errors(err)
    assert code == 2 and len(lines) == 4, lines  # DeepSpeed, launch files, CUDA, flash-attn
    assert _assert_hints_hold(run_cli, plan, lines) >= 2


def test_dry_run_exits_2_and_still_prints_the_plan_and_estimate(tmp_path, run_cli, bare_machine):
    plan = _gpu_plan(tmp_path)
    code, out, err = run_cli("train", str(plan), "--dry-run")
    assert code == 2 and len(_errors(err)) == 5
    assert "sharding: deepspeed" in out and "peak allocated" in out and "cannot run here: 5 problem(s)" in out
    code, out, err = run_cli("train", str(plan), "--dry-run", "--json")
    data = json.loads(out)
    assert code == 2 and data["runs_here"] is False and len(data["problems"]) == 5
    assert data["estimate"]["results"][0]["peak_allocated_bytes"] > 0


def test_dry_run_of_a_plan_that_runs_exits_0(tmp_path, tiny, run_cli):
    code, out, err = run_cli("train", str(run_dir(tmp_path, tiny)), "--dry-run")
    assert code == 0 and err == "" and "cannot run here" not in out


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)


def test_a_missing_data_file_is_reported_before_any_heavy_import(tmp_path, tiny):
    plan = run_dir(tmp_path, tiny, data={"train": "no-such.jsonl", "validation": None})
    code = (f"import sys\nfrom memplan.cli import main\n"
            f"try:\n    main(['train', {str(plan)!r}])\nexcept SystemExit as e:\n    code = e.code\n"
            f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    done = _python(code)
    assert done.stdout.splitlines()[-1] == "2 []", (done.stdout, done.stderr)
    assert _errors(done.stderr) == [f"cannot read data file {plan.parent / 'no-such.jsonl'}: No such file or directory"]
