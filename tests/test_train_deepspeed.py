"""`memplan train` with sharding deepspeed: the launch (always accelerate launch with DIR/accelerate_config.yaml),
the checks of the DeepSpeed JSON against the plan, and the one-line refusal without DeepSpeed. DeepSpeed is
not in the test extra; the last test trains through it where it is installed (benchmarks/deepspeed_cpu_check.py
records such a run on the CPU)."""

import json
import subprocess
import sys

import pytest
import yaml

from test_train_support import SUBPROCESS_ENV, metrics, run_dir, tiny  # noqa: F401  (tiny is a fixture)

DS = dict(sharding="deepspeed", zero=2, precision="bf16-master")


def _with_launch_files(plan_path, **extra_sets):
    """Write accelerate_config.yaml and ds_config.json next to the plan, as `memplan recommend -o DIR` does."""
    from memplan.models import resolve_model
    from memplan.recommend.writers import accelerate_config, ds_config
    from memplan.train.settings import resolve_plan

    plan = resolve_plan(str(plan_path)).plan
    spec = resolve_model(plan.model)
    ds_path = plan_path.parent / "ds_config.json"
    ds_path.write_text(json.dumps(ds_config(plan, spec)))
    (plan_path.parent / "accelerate_config.yaml").write_text(
        yaml.safe_dump(accelerate_config(plan, spec, str(ds_path), "127.0.0.1")))
    return plan


def test_without_deepspeed_one_line_names_the_install(tmp_path, tiny, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec("deepspeed") -> None: not installed
    for gpus in (1, 2):
        plan = run_dir(tmp_path / str(gpus), tiny, gpus=gpus, **DS)
        _with_launch_files(plan)
        code, out, err = run_cli("train", str(plan))
        assert code == 2, err
        assert err.count("\n") == 1 and "pip install deepspeed" in err


def test_zero_stage_0_is_refused(tmp_path, tiny, run_cli):
    plan = run_dir(tmp_path, tiny, sharding="deepspeed", zero=0, precision="bf16-master")
    code, out, err = run_cli("train", str(plan))  # also: no launch files (and DeepSpeed, where not installed)
    lines = err.splitlines()
    assert code == 2 and all(line.startswith("memplan: error: ") for line in lines)
    zero = [line for line in lines if "ZeRO stages 1-3" in line]
    assert len(zero) == 1 and "Hint: --set zero=1" in zero[0]
    # with the launch files for stage 0, zero=1 would meet ds_config.json's stage 0: not offered
    _with_launch_files(plan)
    code, out, err = run_cli("train", str(plan))
    zero = [line for line in err.splitlines() if "ZeRO stages 1-3" in line]
    assert code == 2 and len(zero) == 1 and "--set zero=1" not in zero[0] and "--set sharding=ddp" in zero[0]


def test_the_launch_is_accelerate_with_the_plans_config(tmp_path, tiny, monkeypatch):
    from memplan.train.launch import command, needs_launcher
    from memplan.train.settings import resolve_plan

    path = run_dir(tmp_path, tiny, **DS)
    plan = _with_launch_files(path)
    assert needs_launcher(plan)  # one process too
    assert not needs_launcher(plan.model_copy(update={"sharding": "ddp", "precision": "bf16-master"}))
    cmd = command(resolve_plan(str(path)), ["train", str(path)])
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", str(path.parent / "accelerate_config.yaml")]
    assert cmd[-4:] == ["-m", "memplan", "train", str(path)]

    # --set that changes what the DeepSpeed JSON fixes: refused before any process starts
    from memplan.errors import UserError

    for sets, wanted in ((["micro_batch=2"], "train_micro_batch_size_per_gpu is 4 but the plan needs 2"),
                         (["grad_accum=4"], "gradient_accumulation_steps is 2 but the plan needs 4"),
                         (["max_grad_norm=0.5"], "gradient_clipping is 1.0 but the plan needs 0.5"),
                         (["zero=1"], "zero_optimization.stage is 2 but the plan needs 1"),
                         (["precision=fp32"], "bf16.enabled is True but the plan needs False"),
                         (["gpus=2"], "num_processes is 1, but the plan has 2")):
        with pytest.raises(UserError, match=wanted):
            command(resolve_plan(str(path), sets), ["train", str(path)])


def test_deepspeed_config_checks_and_auto_values():
    from memplan.plan import build_plan
    from memplan.train.deepspeed_setup import (BACKWARD_KWARGS, accelerator_kwargs, config_problems, fill_auto,
                                               expected_values)

    plan = build_plan(dict(model="demo-tiny", device="cpu", gpus=2, micro_batch=3, grad_accum=4, **DS,
                           hparams={"max_grad_norm": 0.7}))
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
           "zero_optimization": {"stage": 2}}
    assert config_problems(plan, fill_auto(plan, cfg), "ds.json") == []
    assert cfg["train_batch_size"] == 24 and cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 0.7
    assert expected_values(plan)["zero_optimization.offload_optimizer.device"] == "none"

    wrong = dict(cfg, gradient_accumulation_steps=1, optimizer={"type": "AdamW"})
    problems = config_problems(plan, wrong, "ds.json")
    assert any("gradient_accumulation_steps is 1" in p for p in problems)
    assert any("'optimizer' section" in p for p in problems)
    # a JSON without bf16 is fp32 for DeepSpeed: not the plan's bf16-master
    assert any("bf16.enabled" in p for p in config_problems(plan, {"zero_optimization": {"stage": 2}}, "ds.json"))

    # memplan's loss is already the mean over the optimizer step: the engine must not divide it again
    assert BACKWARD_KWARGS == {"scale_wrt_gas": False}
    kwargs = accelerator_kwargs(plan)
    assert kwargs["mixed_precision"] == "bf16" and kwargs["gradient_accumulation_steps"] == 4
    assert [h.backend for h in kwargs["kwargs_handlers"]] == ["gloo"]
    assert "kwargs_handlers" not in accelerator_kwargs(plan.model_copy(update={"device": "cuda"}))


def test_missing_or_foreign_launch_files(tmp_path, tiny):
    from memplan.errors import UserError
    from memplan.train.launch import command
    from memplan.train.settings import resolve_plan

    path = run_dir(tmp_path, tiny, **DS)
    with pytest.raises(UserError, match="accelerate_config.yaml, which does not exist. Hint: memplan recommend"):
        command(resolve_plan(str(path)), ["train", str(path)])
    _with_launch_files(path)
    config = path.parent / "accelerate_config.yaml"
    launch = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump(dict(launch, distributed_type="FSDP")))
    with pytest.raises(UserError, match="distributed_type is 'FSDP', but the plan's sharding is deepspeed"):
        command(resolve_plan(str(path)), ["train", str(path)])
    (path.parent / "ds_config.json").unlink()
    config.write_text(yaml.safe_dump(launch))
    with pytest.raises(UserError, match="ds_config.json does not exist"):
        command(resolve_plan(str(path)), ["train", str(path)])
    # corrupt files: one line each, never a traceback
    config.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping of accelerate settings, got list"):
        command(resolve_plan(str(path)), ["train", str(path)])
    config.write_text(yaml.safe_dump(launch))
    ds_json = path.parent / "ds_config.json"
    for content, wanted in ((b"\xff\xfe{", "ds_config.json: not JSON"), (b"[1, 2]", "expected a JSON object")):
        ds_json.write_bytes(content)
        with pytest.raises(UserError, match=wanted):
            command(resolve_plan(str(path)), ["train", str(path)])


def test_deepspeed_trains_like_memplans_own_bf16_master(tmp_path, tiny):
    """ZeRO-2 through DeepSpeed's engine vs memplan.master_weights: the same bf16-master regime, the same
    data and steps. Tolerance 2e-4 relative: DeepSpeed accumulates and clips fp32 gradients where memplan's
    loop accumulates bf16 ones (measured 3e-5)."""
    pytest.importorskip("deepspeed")
    runs = {}
    for name, fields in (("memplan", dict(precision="bf16-master")), ("deepspeed", DS)):
        plan = run_dir(tmp_path / name, tiny, hparams={"max_steps": 6, "eval_every": 3, "eval_samples": 2}, **fields)
        if name == "deepspeed":
            _with_launch_files(plan)
        done = subprocess.run([sys.executable, "-m", "memplan", "train", str(plan), "--quiet"], capture_output=True,
                              text=True, env=SUBPROCESS_ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = {(r["step"], k): r[k] for r in metrics(plan.parent) for k in ("loss", "eval_loss") if k in r}
    assert runs["memplan"].keys() == runs["deepspeed"].keys()
    for key, value in runs["memplan"].items():
        assert runs["deepspeed"][key] == pytest.approx(value, rel=2e-4), key
