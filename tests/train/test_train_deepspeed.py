"""`memplan train` with sharding deepspeed: the launch (always accelerate launch with DIR/accelerate_config.yaml),
the checks of the DeepSpeed JSON against the plan, and the one-line refusal without DeepSpeed. DeepSpeed is
not in the test extra; the last test trains through it where it is installed (benchmarks/deepspeed_cpu_check.py
records such a run on the CPU)."""

import json
import subprocess
import sys

import pytest
import yaml

from helpers import SUBPROCESS_ENV, metrics, run_dir
from support import REPO

DS = dict(sharding="deepspeed", zero=2, precision="bf16-master")
PROBE = REPO / "benchmarks" / "deepspeed_offload_probe.py"


def _with_launch_files(plan_path, **extra_sets):
    """Write accelerate_config.yaml and ds_config.json next to the plan, as `memplan recommend -o DIR` does."""
    from memplan.catalog.resolve import resolve_model
    from memplan.recommend.writers import accelerate_config, ds_config
    from memplan.train.settings import resolve_plan

    plan = resolve_plan(str(plan_path)).plan
    spec = resolve_model(plan.model)
    (plan_path.parent / "ds_config.json").write_text(json.dumps(ds_config(plan, spec)))
    (plan_path.parent / "accelerate_config.yaml").write_text(
        yaml.safe_dump(accelerate_config(plan, spec, "127.0.0.1")))
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
    assert cmd[1:7] == ["-m", "accelerate.commands.launch", "--config_file", str(path.parent / "accelerate_config.yaml"),
                        "--deepspeed_config_file", str(path.parent / "ds_config.json")]
    assert cmd[-4:] == ["-m", "memplan", "train", str(path)]

    # --set of what the JSON leaves "auto" follows the plan; of what it fixes: refused before any process starts
    from memplan.errors import UserError

    for sets in (["micro_batch=2"], ["grad_accum=4"], ["max_grad_norm=0.5"], ["lr=1e-3"], ["weight_decay=0.1"]):
        assert command(resolve_plan(str(path), sets), ["train", str(path)])[-4:] == cmd[-4:]
    for sets, wanted in ((["zero=1"], "zero_optimization.stage is 2 but the plan needs 1"),
                         (["precision=fp32"], "bf16.enabled is True but the plan needs False"),
                         (["gpus=2"], "num_processes is 1, but the plan has 2")):
        with pytest.raises(UserError, match=wanted):
            command(resolve_plan(str(path), sets), ["train", str(path)])
    # a JSON edited to fixed numbers must still agree with the plan
    ds_json = path.parent / "ds_config.json"
    fixed = dict(json.loads(ds_json.read_text()), train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2,
                 gradient_clipping=1.0)
    ds_json.write_text(json.dumps(fixed))
    for sets, wanted in ((["micro_batch=2"], "train_micro_batch_size_per_gpu is 4 but the plan needs 2"),
                         (["grad_accum=4"], "gradient_accumulation_steps is 2 but the plan needs 4"),
                         (["max_grad_norm=0.5"], "gradient_clipping is 1.0 but the plan needs 0.5")):
        with pytest.raises(UserError, match=wanted):
            command(resolve_plan(str(path), sets), ["train", str(path)])


def test_deepspeed_config_checks_and_auto_values():
    from memplan.plan import build_plan
    from memplan.train.deepspeed_setup import (
        BACKWARD_KWARGS,
        accelerator_kwargs,
        config_problems,
        expected_values,
        fill_auto,
    )

    plan = build_plan(dict(model="demo-tiny", device="cpu", gpus=2, micro_batch=3, grad_accum=4, **DS,
                           hparams={"max_grad_norm": 0.7}))
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
           "zero_optimization": {"stage": 2}}
    assert config_problems(plan, fill_auto(plan, cfg), "ds.json") == []
    assert cfg["train_batch_size"] == 24 and cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 0.7
    assert expected_values(plan)["zero_optimization.offload_optimizer.device"] == "none"

    wrong = dict(cfg, gradient_accumulation_steps=1, scheduler={"type": "WarmupLR"})
    problems = config_problems(plan, wrong, "ds.json")
    assert any("gradient_accumulation_steps is 1" in p for p in problems)
    assert any("'scheduler' section, but memplan train runs the plan's schedule (cosine" in p for p in problems)
    # a JSON without bf16 is fp32 for DeepSpeed: not the plan's bf16-master
    assert any("bf16.enabled" in p for p in config_problems(plan, {"zero_optimization": {"stage": 2}}, "ds.json"))

    # the sizes the estimate counted: the plan's own, by DeepSpeed's name or alias, and ZeRO-3's constant defaults
    zero3 = build_plan(dict(model="demo-tiny", gpus=2, **dict(DS, zero=3), deepspeed={"stage3_max_live_parameters": 100}))
    ok = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "max_live_parameters": 100}}
    assert not [p for p in config_problems(zero3, fill_auto(zero3, ok), "ds.json") if "zero_optimization" in p]
    missing = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    assert [p for p in config_problems(zero3, missing, "ds.json") if "zero_optimization" in p] == [
        "ds.json: zero_optimization.stage3_max_live_parameters is 1000000000 but the plan needs 100"]  # the default
    bucket = zero3.model_copy(update={"deepspeed": type(zero3.deepspeed)(reduce_bucket_size=1000)})
    assert [p for p in config_problems(bucket, missing, "ds.json") if "zero_optimization" in p] == [
        "ds.json: zero_optimization.reduce_bucket_size is not set (DeepSpeed's default) but the plan needs 1000"]
    unset = zero3.model_copy(update={"deepspeed": type(zero3.deepspeed)()})
    other = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "sub_group_size": 0}}
    assert [p for p in config_problems(unset, other, "ds.json") if "zero_optimization" in p] == [
        "ds.json: zero_optimization.sub_group_size is 0 but the plan needs 1000000000"]

    # a stage-3 size on a ZeRO-2 plan changes nothing, and a file without it is the plan's
    zero2 = build_plan(dict(model="demo-tiny", gpus=2, **DS, deepspeed={"stage3_max_live_parameters": 100}))
    assert not [p for p in config_problems(zero2, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
                                           "ds.json") if "zero_optimization" in p]

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
    for content, wanted in ((b"\xff\xfe{", "ds_config.json: not UTF-8 text"), (b"[1, 2]", "expected a JSON object")):
        ds_json.write_bytes(content)
        with pytest.raises(UserError, match=wanted):
            command(resolve_plan(str(path)), ["train", str(path)])


def _fake_accelerator(cfg: dict):
    """What deepspeed_setup.configure reads of accelerate's Accelerator in a launched DeepSpeed process."""
    from types import SimpleNamespace

    return SimpleNamespace(distributed_type=SimpleNamespace(name="DEEPSPEED"),
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=cfg)))


def test_the_json_optimizer_section_is_checked_then_left_to_memplan():
    """ds_config.json describes the plan's AdamW for other trainers; memplan train checks it against the plan,
    fills its "auto" values and passes the optimizer itself (accelerate refuses one given both ways)."""
    from memplan.catalog.resolve import resolve_model
    from memplan.errors import UserError
    from memplan.plan import build_plan
    from memplan.recommend.writers import ds_config
    from memplan.train.deepspeed_setup import config_problems, configure, fill_auto

    plan = build_plan(dict(model="demo-tiny", device="cpu", gpus=2, micro_batch=3, grad_accum=4, optimizer="adamw-fused",
                           hparams={"lr": 3e-4, "weight_decay": 0.1}, **DS))
    written = ds_config(plan, resolve_model("demo-tiny"))
    cfg = json.loads(json.dumps(written))
    assert configure(_fake_accelerator(cfg), plan) is cfg
    assert "optimizer" not in cfg and cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 1.0
    filled = fill_auto(plan, json.loads(json.dumps(written)))
    assert filled["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                                               "weight_decay": 0.1, "torch_adam": True, "fused": True}}

    def problems(**section_params):
        cfg = json.loads(json.dumps(written))
        cfg["optimizer"]["params"].update(section_params)
        return config_problems(plan, fill_auto(plan, cfg), "ds.json")

    assert problems() == [] and problems(lr="auto") == []
    assert problems(lr=1e-3) == ["ds.json: optimizer.params.lr is 0.001 but the plan needs 0.0003"]
    assert problems(betas=[0.9, 0.95]) == ["ds.json: optimizer.params.betas is [0.9, 0.95] but the plan needs [0.9, 0.999]"]
    assert problems(fused=False, foreach=True) == [
        "ds.json: optimizer.params: foreach True (the plan needs None), fused False (the plan needs True); the plan's "
        "optimizer is torch's AdamW (adamw-fused)"]
    assert problems(torch_adam=False) and "torch_adam False (the plan needs True)" in problems(torch_adam=False)[0]
    # DeepSpeed names its optimizers case-insensitively; "Adam" is AdamW unless adam_w_mode is false
    assert not [p for p in config_problems(plan, fill_auto(plan, dict(written, optimizer=dict(
        written["optimizer"], type="adam"))), "ds.json")]
    wrong = config_problems(plan, fill_auto(plan, dict(written, optimizer={"type": "Lamb", "params": {}})), "ds.json")
    assert wrong == ["ds.json: optimizer.type is 'Lamb' but the plan's optimizer is adamw-fused (AdamW)"]
    sgd = plan.model_copy(update={"optimizer": "sgd"})
    assert "optimizer" not in ds_config(sgd, resolve_model("demo-tiny"))
    assert "memplan train itself" in config_problems(sgd, fill_auto(sgd, dict(written)), "ds.json")[0]

    # under ZeRO-Offload the section is DeepSpeed's CPU Adam, and torch's AdamW there is refused
    offload = build_plan(dict(model="demo-tiny", precision="bf16-master", sharding="deepspeed", zero=2,
                              offload="optimizer"))
    section = ds_config(offload, resolve_model("demo-tiny"))
    assert "torch_adam" not in section["optimizer"]["params"]
    assert config_problems(offload, fill_auto(offload, section), "ds.json") == []
    section["optimizer"]["params"]["torch_adam"] = True
    assert "the plan's optimizer is DeepSpeed's CPU Adam (ZeRO-Offload)" in config_problems(offload, section, "ds.json")[0]
    with pytest.raises(UserError, match="optimizer.params: torch_adam True"):
        configure(_fake_accelerator(section), offload)


def test_offload_needs_cpu_adam_buildable_before_launch(tmp_path, tiny, monkeypatch):
    """DeepSpeed compiles its CPU Adam on first use: without ninja or a compiler every process would fail
    with a traceback, so the launch says it once."""
    import shutil

    from memplan.errors import UserError
    from memplan.train import deepspeed_setup
    from memplan.train.launch import command
    from memplan.train.settings import resolve_plan

    path = run_dir(tmp_path, tiny, **DS)
    _with_launch_files(path)
    # A DeepSpeed installation as setup.py leaves it: the ops it built are listed in a version file, read
    # without importing deepspeed (and torch).
    fake = tmp_path / "site" / "deepspeed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('memplan must not import deepspeed to check it')\n")
    installed = fake / "git_version_info_installed.py"
    installed.write_text("version='0.19.8'\ninstalled_ops={'cpu_adam': False, 'fused_adam': False}\n")
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    monkeypatch.syspath_prepend(str(fake.parent))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    command(resolve_plan(str(path)), ["train", str(path)])  # no offload: nothing to compile
    with pytest.raises(UserError, match="DeepSpeed's CPU Adam, whose op DeepSpeed compiles on first use, and ninja "
                                        "and a C.. compiler .c... cannot be found. Hint: install them"):
        deepspeed_setup.check_cpu_adam()
    installed.write_text("version='0.19.8'\ninstalled_ops={'cpu_adam': True}\n")  # DS_BUILD_CPU_ADAM=1
    deepspeed_setup.check_cpu_adam()


def test_deepspeed_trains_like_memplans_own_bf16_master(tmp_path, tiny):
    """ZeRO-2 through DeepSpeed's engine vs memplan.runtime.optim: the same bf16-master regime, the same
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


def test_hf_trainer_fills_the_written_json_as_memplan_does():
    """The reuse the "auto" values are for: transformers' own filling (HfTrainerDeepSpeedConfig, what HF
    Trainer, axolotl and LLaMA-Factory run) from the README's training arguments gives the JSON memplan train
    gives DeepSpeed, with no mismatch."""
    pytest.importorskip("deepspeed")
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan
    from memplan.recommend.writers import ds_config, trainer_arguments
    from memplan.train.deepspeed_setup import fill_auto

    for fields in (dict(zero=2, optimizer="adamw-fused"), dict(zero=3, offload="optimizer+params")):
        plan = build_plan(dict(model="llama-2-7b", precision="bf16-master", sharding="deepspeed", micro_batch=2,
                               grad_accum=8, hparams={"lr": 3e-5, "weight_decay": 0.01, "max_grad_norm": 0.5},
                               **fields))
        written = ds_config(plan, resolve_model("llama-2-7b"))
        args = TrainingArguments(output_dir="unused", use_cpu=True, **trainer_arguments(plan))
        hf = HfTrainerDeepSpeedConfig(json.loads(json.dumps(written)))
        hf.trainer_config_process(args)
        hf.trainer_config_finalize(args, model=None, num_training_steps=100)  # raises on any mismatch
        assert hf.mismatches == []
        assert hf.config == fill_auto(plan, json.loads(json.dumps(written)))


def test_offload_steps_deepspeeds_cpu_adam_on_the_cpu(tmp_path):
    """A CUDA plan with ZeRO-Offload, run as far as DeepSpeed goes on the CPU (its CPU accelerator: ZeRO-2
    with offload_optimizer, gloo): memplan's path (the plan's torch AdamW, which accelerate hands to
    DeepSpeed as DeepSpeedCPUAdam) and the JSON's optimizer section (what HF Trainer lets DeepSpeed build)
    both step DeepSpeed's CPU Adam with the plan's hyperparameters, and its losses follow torch's AdamW
    without offload. DeepSpeed compiles the CPU Adam op on the first run (minutes)."""
    pytest.importorskip("deepspeed")
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import build_plan
    from memplan.recommend.writers import ds_config
    from memplan.train.launch import _free_port as free_port

    base = dict(model="demo-tiny", precision="bf16-master", sharding="deepspeed", zero=2, micro_batch=4,
                optimizer="adamw-fused", hparams={"lr": 1e-2, "weight_decay": 0.01})
    runs = {}
    for name, offload, mode in (("torch", "none", "memplan"), ("offload", "optimizer", "memplan"),
                                ("offload-json", "optimizer", "section"), ("torch-json", "none", "section")):
        fields = dict(base, offload=offload)
        plan = build_plan(fields)
        cfg = tmp_path / f"{name}.json"
        written = ds_config(plan, resolve_model("demo-tiny"))
        written["zero_optimization"].get("offload_optimizer", {})["pin_memory"] = False  # no CUDA to pin for
        cfg.write_text(json.dumps(written))
        done = subprocess.run([sys.executable, str(PROBE), json.dumps(fields), mode, str(free_port()), str(cfg)],
                              capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("offload", "offload-json"):
        r = runs[name]
        assert r["optimizer"] == "DeepSpeedCPUAdam" and r["cpu_offload"] is True
        assert (r["lr"], r["betas"], r["eps"], r["weight_decay"]) == (1e-2, [0.9, 0.999], 1e-8, 0.01)
    # DeepSpeed's CPU Adam steps as torch's AdamW does (measured: the same losses to the last digit)
    assert runs["offload"]["losses"] == pytest.approx(runs["torch"]["losses"], rel=1e-6)
    assert runs["offload-json"]["losses"] == pytest.approx(runs["torch-json"]["losses"], rel=1e-6)
    for name in ("torch", "torch-json"):
        assert runs[name]["optimizer"] == "AdamW" and runs[name]["fused"] is True  # the plan's adamw-fused
        assert runs[name]["cpu_offload"] is False
    # the same torch AdamW, except that memplan exempts biases from weight decay (as HF Trainer does with its
    # own optimizer) while DeepSpeed's optimizer from the section decays every parameter
    assert runs["torch-json"]["losses"] == pytest.approx(runs["torch"]["losses"], rel=1e-3)
    assert runs["torch"]["losses"][-1] < runs["torch"]["losses"][0]
