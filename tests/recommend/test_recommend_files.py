"""The files `memplan recommend -o DIR` writes: the round trip through `estimate --config`, accelerate's own
config loader, DeepSpeed's documented keys, the README's commands, atomic writes."""

import json
from pathlib import Path

import pytest
import yaml

from memplan.plan import build_plan, read_plan_yaml


def run_json(run_cli, *args):
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Three recommendations written once: DeepSpeed (full FT on 4 GPUs), multi-node (ZeRO-3 offloading the
    optimizer and parameters), and DDP (LoRA)."""
    from click.testing import CliRunner

    from memplan.cli import main

    base = tmp_path_factory.mktemp("rec")
    runs = {
        "deepspeed": ["--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4", "--dataset-size", "50000",
                      "--method", "full"],
        # nodes with the host RAM for ZeRO-3 offloading a 70B model's states, parameters and gradients
        "multinode": ["--model", "llama-2-70b", "--gpu", "a100-40gb", "--gpus", "8", "--nodes", "2",
                      "--dataset-size", "50000", "--method", "full", "--priority", "memory", "--host-memory", "2048GiB"],
        "ddp": ["--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4", "--dataset-size", "50000"],
    }
    out = {}
    for name, args in runs.items():
        d = base / name
        res = CliRunner().invoke(main, ["recommend", *args, "-o", str(d), "--json"])
        assert res.exit_code == 0, res.output
        out[name] = (d, json.loads(res.stdout), args)
    return out


def test_files_listed_and_present(written):
    d, rec, _ = written["deepspeed"]
    names = sorted(Path(f).name for f in rec["files"])
    assert names == ["README.md", "accelerate_config.yaml", "ds_config.json", "plan.yaml"]
    assert all(Path(f).is_file() for f in rec["files"])
    d2, rec2, _ = written["ddp"]
    assert not (d2 / "ds_config.json").exists() and rec2["plan"]["sharding"] == "ddp"


@pytest.mark.parametrize("name", ["deepspeed", "multinode", "ddp"])
def test_round_trip_estimate_config_reproduces_the_numbers(run_cli, written, name):
    d, rec, args = written[name]
    gpu = args[args.index("--gpu") + 1]
    est = run_json(run_cli, "estimate", "--config", str(d / "plan.yaml"), "--gpu", gpu)["results"][0]
    for key in ("peak_allocated_bytes", "reserved_bytes", "total_bytes", "host_bytes", "phase_peaks", "breakdown"):
        assert est[key] == rec["estimate"][key], key
    assert est["plan"] == rec["plan"]


def test_plan_yaml_is_the_flat_plan_with_hparams_and_outputs(written):
    d, rec, _ = written["deepspeed"]
    text = (d / "plan.yaml").read_text()
    assert text.startswith(f"# memplan train {d}/plan.yaml\n")
    plan = build_plan(read_plan_yaml(d / "plan.yaml"))
    assert plan.model_dump(mode="json") == rec["plan"]
    assert plan.output_dir == "output" and plan.hparams.warmup_steps and plan.hparams.lr_scheduler == "cosine"
    assert plan.data.samples == 50000


@pytest.mark.parametrize("name, dist_type", [("deepspeed", "DEEPSPEED"), ("multinode", "DEEPSPEED"), ("ddp", "MULTI_GPU")])
def test_accelerate_config_loads_with_accelerates_classes(written, name, dist_type):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    d, rec, _ = written[name]
    cfg = load_config_from_file(str(d / "accelerate_config.yaml"))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == dist_type
    plan = rec["plan"]
    assert cfg.num_processes == plan["gpus"] * plan["nodes"] and cfg.num_machines == plan["nodes"]
    assert cfg.machine_rank == 0
    # accelerate launch's own validation of the file (what `accelerate launch --config_file` runs first)
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(d / "accelerate_config.yaml"), "train.py"]))
    assert args.num_processes == cfg.num_processes
    if dist_type == "DEEPSPEED":
        assert args.use_deepspeed
        # accelerate refuses these twice (DeepSpeedPlugin._deepspeed_config_checks): they live in the JSON
        assert set(cfg.deepspeed_config) <= {"deepspeed_config_file", "zero3_init_flag"}
        assert cfg.mixed_precision is None
        # named relative to the plan directory, so that it can move (memplan train passes its absolute path)
        assert cfg.deepspeed_config["deepspeed_config_file"] == "ds_config.json"
    if plan["nodes"] > 1:
        assert cfg.main_process_ip and cfg.main_process_port == 29500


def test_accelerate_config_fsdp_and_cpu(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    from memplan.catalog.resolve import resolve_model
    from memplan.recommend.writers import accelerate_config

    spec = resolve_model("llama-2-7b")
    cases = [
        (dict(method="full", precision="amp-bf16", sharding="fsdp", zero=3, gpus=4), "FSDP", "bf16"),
        # one GPU: FSDP to offload, else nothing to shard (a plain process, no FSDP section)
        (dict(method="full", precision="bf16", sharding="fsdp", zero=3, offload="optimizer+params"), "FSDP", "no"),
        (dict(method="full", precision="bf16", sharding="fsdp", zero=3), "NO", "no"),
        (dict(method="full", precision="fp32", device="cpu"), "NO", "no"),
        (dict(method="full", precision="fp32", device="cpu", gpus=2), "MULTI_CPU", "no"),
        (dict(method="lora", precision="bf16", gpus=2), "MULTI_GPU", "no"),
    ]
    for fields, dist, mixed in cases:
        plan = build_plan(fields)
        path = tmp_path / f"{dist}.yaml"
        path.write_text(yaml.safe_dump(accelerate_config(plan, spec, "10.0.0.1")))
        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.distributed_type.value == dist and cfg.mixed_precision == mixed
        assert cfg.use_cpu == (plan.device == "cpu") and (cfg.fsdp_config != {}) == (dist == "FSDP")
        if dist == "FSDP":
            fsdp = cfg.fsdp_config
            assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
            assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
            import transformers.models.llama.modeling_llama as llama

            assert hasattr(llama, fsdp["fsdp_transformer_layer_cls_to_wrap"])


# DeepSpeed's documented configuration keys and their JSON types (https://www.deepspeed.ai/docs/config-json/:
# "Batch Size related parameters", "Optimizer / FP16 / BFLOAT16 options", "ZeRO Optimizations for FP16
# Training", "Logging"). DeepSpeed itself needs a CUDA build, so its keys are checked against this table.
DS_DOCUMENTED = {
    "train_batch_size": int, "train_micro_batch_size_per_gpu": int, "gradient_accumulation_steps": int,
    "gradient_clipping": float, "steps_per_print": int, "wall_clock_breakdown": bool,
    "bf16": {"enabled": bool},
    "fp16": {"enabled": bool, "loss_scale": float, "initial_scale_power": int, "loss_scale_window": int,
             "hysteresis": int, "min_loss_scale": float},
    "zero_optimization": {
        "stage": int, "allgather_partitions": bool, "allgather_bucket_size": int, "overlap_comm": bool,
        "reduce_scatter": bool, "reduce_bucket_size": int, "contiguous_gradients": bool,
        "offload_param": {"device": str, "nvme_path": str, "pin_memory": bool, "buffer_count": int,
                          "buffer_size": int, "max_in_cpu": int},
        "offload_optimizer": {"device": str, "nvme_path": str, "pin_memory": bool, "ratio": float,
                              "buffer_count": int, "fast_init": bool},
        "stage3_max_live_parameters": int, "stage3_max_reuse_distance": int, "stage3_prefetch_bucket_size": int,
        "stage3_param_persistence_threshold": int, "stage3_gather_16bit_weights_on_model_save": bool,
        "sub_group_size": int, "round_robin_gradients": bool,
    },
}


# "Optimizer Parameters": type and a params object passed to the optimizer
DS_DOCUMENTED["optimizer"] = {"type": str, "params": dict}


def _check_documented(obj: dict, schema: dict, where: str = "") -> None:
    for key, value in obj.items():
        assert key in schema, f"{where}{key} is not a documented DeepSpeed key"
        kind = schema[key]
        if value == "auto":
            continue  # filled before DeepSpeed reads it (checked after the filling below)
        if isinstance(kind, dict):
            assert isinstance(value, dict), f"{where}{key} must be an object"
            _check_documented(value, kind, f"{where}{key}.")
        elif kind is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}{key}"
        else:
            assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), f"{where}{key}"


def test_accelerate_config_names_the_precision_memplan_train_runs():
    """accelerate_config.yaml's mixed_precision and the Accelerator of `memplan train` come from one table: a
    bf16-master plan without DeepSpeed autocasts nothing (memplan's fp32 masters do the mixing), with DeepSpeed
    accelerate hands "bf16" to its engine, and the JSON's bf16 agrees."""
    from memplan.catalog.resolve import resolve_model
    from memplan.plan import PRECISIONS, mixed_precision
    from memplan.recommend.writers import accelerate_config, ds_config
    from memplan.train.deepspeed_setup import accelerator_kwargs

    spec = resolve_model("llama-2-7b")
    for precision in PRECISIONS:
        plan = build_plan(dict(model="llama-2-7b", precision=precision, gpus=2))
        assert accelerate_config(plan, spec, "10.0.0.1")["mixed_precision"] == mixed_precision(plan)
    ddp = build_plan(dict(model="llama-2-7b", precision="bf16-master", gpus=2))
    assert accelerate_config(ddp, spec, "10.0.0.1")["mixed_precision"] == "no"
    for precision, engine in (("bf16-master", "bf16"), ("fp32", "no")):
        plan = build_plan(dict(model="llama-2-7b", precision=precision, gpus=2, sharding="deepspeed", zero=2))
        assert accelerator_kwargs(plan)["mixed_precision"] == mixed_precision(plan) == engine
        assert ds_config(plan, spec)["bf16"]["enabled"] == (engine == "bf16")


@pytest.mark.parametrize("name", ["deepspeed", "multinode"])
def test_ds_config_uses_documented_keys_and_consistent_batch(written, name):
    from memplan.train.deepspeed_setup import fill_auto

    d, rec, _ = written[name]
    ds = json.loads((d / "ds_config.json").read_text())
    _check_documented(ds, DS_DOCUMENTED)
    ds = fill_auto(build_plan(rec["plan"]), ds)  # what memplan train hands DeepSpeed
    _check_documented(ds, DS_DOCUMENTED)
    plan = rec["plan"]
    world = plan["gpus"] * plan["nodes"]
    # DeepSpeed's documented constraint: train_batch_size = micro-batch x accumulation x GPUs
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    assert ds["train_micro_batch_size_per_gpu"] == plan["micro_batch"]
    z = ds["zero_optimization"]
    assert z["stage"] == plan["zero"]
    assert ("offload_optimizer" in z) == (plan["offload"] != "none")
    assert ("offload_param" in z) == (plan["offload"] == "optimizer+params")
    assert ds["bf16"]["enabled"] == (plan["precision"] == "bf16-master")


def test_readme_has_exact_launch_commands(written):
    d, _, _ = written["deepspeed"]
    text = (d / "README.md").read_text()
    assert f"memplan train {d}/plan.yaml" in text
    assert f"accelerate launch --config_file {d}/accelerate_config.yaml" in text
    assert f"memplan estimate --config {d}/plan.yaml" in text
    d2, _, _ = written["multinode"]
    multi = (d2 / "README.md").read_text()
    assert "machine_rank: K" in multi and "on machine 0" in multi


def test_data_paths_are_relative_to_the_output_dir(run_cli, tmp_path):
    data = tmp_path / "data" / "train.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(40)))
    out = tmp_path / "runs" / "demo"
    rec = run_json(run_cli, "recommend", "--model", "llama-3.2-1b", "--gpu", "h100", "--data", str(data), "-o", str(out))
    plan = read_plan_yaml(out / "plan.yaml")
    assert plan["data"]["train"] == "../../data/train.jsonl"
    assert (out / plan["data"]["train"]).resolve() == data.resolve()
    assert rec["plan"]["data"]["samples"] == 32  # 8 of the 40 held out for validation


def test_existing_output_dir_keeps_other_files_and_gets_replaced_files(run_cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-1").mkdir()
    (out / "plan.yaml").write_text("old")
    run_json(run_cli, "recommend", "--model", "llama-3.2-1b", "--gpu", "h100", "--dataset-size", "2000", "-o", str(out))
    assert (out / "checkpoint-1").is_dir() and (out / "plan.yaml").read_text() != "old"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cpu_plan_round_trip_and_accelerate_use_cpu(run_cli, tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    import memplan.catalog.gpus

    monkeypatch.setattr(memplan.catalog.gpus, "local_gpus", lambda: [])  # this machine's CPU, even on a GPU runner
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)))
    out = tmp_path / "run"
    rec = run_json(run_cli, "recommend", "--model", str(model), "--gpus", "1", "--dataset-size", "800",
                   "--seq-len", "128", "-o", str(out))
    assert rec["plan"]["device"] == "cpu" and rec["plan"]["model"] == str(model.resolve())
    est = run_json(run_cli, "estimate", "--config", str(out / "plan.yaml"))["results"][0]
    assert est["total_bytes"] == rec["estimate"]["total_bytes"]
    assert est["phase_peaks"] == rec["estimate"]["phase_peaks"]
    cfg = load_config_from_file(str(out / "accelerate_config.yaml"))
    assert cfg.use_cpu is True and cfg.distributed_type.value == "NO" and cfg.num_processes == 1


@pytest.mark.parametrize("flag, target", [("-o", "out"), ("--plot", "out/memory.png")])
def test_unwritable_output_is_one_line_and_exit_2(run_cli, tmp_path, flag, target):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code, _, err = run_cli("recommend", "--model", "llama-2-7b", "--gpu", "h100-80gb", "--dataset-size", "100",
                           flag, str(blocker / target))
    assert code == 2
    assert err.startswith("memplan: error:") and len(err.strip().splitlines()) == 1
    assert "cannot write there" in err


DS_RUN = ["--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4", "--dataset-size", "50000", "--method", "full"]


def test_plan_directory_can_move_and_still_launch(run_cli, tmp_path, monkeypatch):
    """Written on one machine, moved to another path: memplan train's launch, and accelerate launch by hand,
    still find ds_config.json (accelerate_config.yaml named it by the absolute path it was written at)."""
    import re
    import shlex
    import shutil

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    from memplan.train.launch import command
    from memplan.train.settings import resolve_plan

    def accelerate_args(argv):
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        return args

    laptop = tmp_path / "laptop" / "run"
    run_json(run_cli, "recommend", *DS_RUN, "-o", str(laptop))
    # the README's by-hand command, as written
    # (after the allocator setting the plan runs with, where it has one: PYTORCH_CUDA_ALLOC_CONF=...)
    launch = re.compile(r"(?:[A-Z_]+=\S+ )*accelerate launch ")
    (by_hand,) = [line for line in (laptop / "README.md").read_text().splitlines() if launch.match(line)]
    argv = shlex.split(by_hand)
    assert Path(accelerate_args(argv[argv.index("accelerate") + 2:]).deepspeed_config_file) == \
        laptop / "ds_config.json"

    cluster = tmp_path / "cluster" / "jobs" / "run"
    cluster.parent.mkdir(parents=True)
    shutil.move(laptop, cluster)
    plan = cluster / "plan.yaml"
    cmd = command(resolve_plan(str(plan)), ["train", str(plan)])
    assert cmd[3:7] == ["--config_file", str(cluster / "accelerate_config.yaml"),
                        "--deepspeed_config_file", str(cluster / "ds_config.json")]
    # what accelerate launch makes of that command line: the flag wins over the file's name, and the
    # launched processes open that path (ACCELERATE_DEEPSPEED_CONFIG_FILE -> HfDeepSpeedConfig)
    args = accelerate_args(cmd[3:])
    assert args.use_deepspeed and args.deepspeed_config_file == str(cluster / "ds_config.json")
    assert HfDeepSpeedConfig(args.deepspeed_config_file).config["zero_optimization"]["stage"] == 1
    # by hand without the flag, accelerate opens the name from the current directory: in DIR it works
    monkeypatch.chdir(cluster)
    assert HfDeepSpeedConfig(accelerate_args(["--config_file", "accelerate_config.yaml", "t.py"])
                             .deepspeed_config_file).config["zero_optimization"]["stage"] == 1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="existing deepspeed config"):
        HfDeepSpeedConfig(accelerate_args(["--config_file", str(cluster / "accelerate_config.yaml"), "t.py"])
                          .deepspeed_config_file)


def test_plan_yaml_holds_one_warmup_and_an_edit_of_it_counts(written, tmp_path):
    """plan.yaml held warmup_ratio and warmup_steps, the steps winning: editing the ratio changed nothing."""
    from memplan.errors import UserError
    from memplan.train.loop import warmup_steps
    from memplan.train.settings import resolve_plan

    d, rec, _ = written["deepspeed"]
    text = (d / "plan.yaml").read_text()
    hp = yaml.safe_load(text)["hparams"]
    assert "warmup_ratio" not in hp and hp["warmup_steps"] == rec["plan"]["hparams"]["warmup_steps"] > 0
    assert f"  warmup_steps: {hp['warmup_steps']:d}  # one of warmup_steps / warmup_ratio" in text

    # a user asking for a 20 % warmup in the file: it takes effect, or the file is refused; never ignored
    edited = tmp_path / "plan.yaml"
    if "warmup_ratio:" in text:
        edited.write_text("\n".join(line.split(":")[0] + ": 0.2" if line.strip().startswith("warmup_ratio:")
                                    else line for line in text.splitlines()))
    else:
        edited.write_text(text.replace("hparams:\n", "hparams:\n  warmup_ratio: 0.2\n"))
    try:
        plan = resolve_plan(str(edited)).plan
    except UserError as err:
        assert "warmup_ratio (0.2) and warmup_steps" in str(err) and "both set" in str(err)
    else:
        assert warmup_steps(plan, 1000) == 200
    # on the command line the given one replaces the file's
    plan = resolve_plan(str(d / "plan.yaml"), ["warmup_ratio=0.2"]).plan
    assert warmup_steps(plan, 1000) == 200
    assert warmup_steps(resolve_plan(str(d / "plan.yaml"), ["warmup_steps=7"]).plan, 1000) == 7


def test_full_ft_plan_yaml_has_no_lora_block(written):
    d, rec, _ = written["deepspeed"]
    assert rec["plan"]["method"] == "full" and "lora" not in yaml.safe_load((d / "plan.yaml").read_text())
    d2, rec2, _ = written["ddp"]
    assert rec2["plan"]["method"] in ("lora", "qlora")
    lora_text = (d2 / "plan.yaml").read_text()
    assert yaml.safe_load(lora_text)["lora"] == rec2["plan"]["lora"]
    assert "\nlora:  # adapter settings: used by method lora and qlora\n" in lora_text


def test_without_data_the_output_the_readme_and_plan_yaml_say_to_set_it(run_cli, tmp_path):
    from memplan.train.settings import resolve_plan

    out = tmp_path / "run"
    code, printed, err = run_cli("recommend", *DS_RUN, "-o", str(out))
    assert code == 0, err
    how = f"memplan train {out}/plan.yaml --set train=FILE.jsonl"
    assert how in printed and "data.train is not set" in printed
    readme = (out / "README.md").read_text()
    assert "## Before training: set the data" in readme and how in readme
    text = (out / "plan.yaml").read_text()
    assert "  train: null  # must be set before memplan train: --set train=FILE.jsonl" in text
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "a"}\n')
    plan = resolve_plan(str(out / "plan.yaml"), [f"train={data}"]).plan
    assert plan.data.train == str(data)

    # with --data the plan names it: nothing to say
    with_data = tmp_path / "with"
    code, printed, err = run_cli("recommend", "--model", "llama-3.2-1b", "--gpu", "h100", "--data", str(data),
                                 "-o", str(with_data))
    assert code == 0, err
    assert "--set train=" not in printed and "--set train=" not in (with_data / "README.md").read_text()
    assert "must be set" not in (with_data / "plan.yaml").read_text()


def _hf_trainer_filled_keys() -> set[str]:
    """The DeepSpeed keys transformers' HF Trainer integration replaces when they are "auto", read from the
    installed transformers (integrations/deepspeed.py, HfTrainerDeepSpeedConfig)."""
    import re

    import transformers.integrations.deepspeed as hf_ds

    return set(re.findall(r'fill_(?:match|only)\(\s*"([^"]+)"', Path(hf_ds.__file__).read_text()))


def _auto_paths(cfg: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= _auto_paths(value, f"{prefix}{key}.")
        elif value == "auto":
            out.add(prefix + key)
    return out


def test_ds_config_leaves_auto_what_hf_trainer_fills_and_memplan_fills_it(written):
    from memplan.train.deepspeed_setup import AUTO_KEYS, config_problems, fill_auto

    hf = _hf_trainer_filled_keys()
    assert {"train_micro_batch_size_per_gpu", "optimizer.params.lr", "gradient_clipping"} <= hf  # parsed right
    for name in ("deepspeed", "multinode"):
        d, rec, _ = written[name]
        ds = json.loads((d / "ds_config.json").read_text())
        autos = _auto_paths(ds)
        assert autos == set(AUTO_KEYS) and autos <= hf
        assert "scheduler" not in ds  # HF Trainer then runs its own schedule, the one memplan train runs
        plan = build_plan(rec["plan"])
        filled = fill_auto(plan, ds)
        assert not _auto_paths(filled) and config_problems(plan, filled, "ds_config.json") == []
        assert filled["train_batch_size"] == plan.effective_batch
        # torch's AdamW as the plan names it, or under ZeRO-Offload DeepSpeed's CPU Adam
        switches = {} if plan.offload != "none" else {"torch_adam": True, **{
            "adamw": {"foreach": True}, "adamw-fused": {"fused": True}, "adamw-forloop": {"foreach": False}}[plan.optimizer]}
        assert filled["optimizer"]["params"] == {
            "lr": plan.hparams.effective_lr(plan.method), "betas": [0.9, 0.999], "eps": 1e-8,
            "weight_decay": plan.hparams.weight_decay, **switches}
    assert {build_plan(written[n][1]["plan"]).offload for n in ("deepspeed", "multinode")} == {"none", "optimizer+params"}


@pytest.mark.parametrize("fields, section", [
    # ZeRO-Offload: DeepSpeed builds its CPU Adam for "AdamW" (no torch_adam)
    (dict(offload="optimizer", zero=2), {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                                       "weight_decay": "auto"}}),
    (dict(offload="optimizer+params", zero=3, optimizer="adamw-fused"), {"type": "AdamW", "params": {
        "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}),
    (dict(optimizer="adamw-forloop"), {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                                   "weight_decay": "auto", "torch_adam": True,
                                                                   "foreach": False}}),
    (dict(optimizer="adamw-8bit"), None),  # bitsandbytes: not DeepSpeed's to build, the trainer builds it
])
def test_ds_config_optimizer_section_follows_the_plan(fields, section):
    from memplan.catalog.resolve import resolve_model
    from memplan.recommend.writers import ds_config
    from memplan.train.deepspeed_setup import config_problems, fill_auto

    plan = build_plan(dict(model="llama-2-7b", method="full", precision="bf16-master", sharding="deepspeed",
                           gpus=2, **{"zero": 1, **fields}))
    ds = ds_config(plan, resolve_model("llama-2-7b"))
    assert ds.get("optimizer") == section
    assert config_problems(plan, fill_auto(plan, ds), "ds_config.json") == []


def test_readme_gives_the_trainer_arguments_of_the_plan(written, tmp_path):
    """The README's HF Trainer arguments parse as transformers' TrainingArguments and give the plan's step."""
    import shlex

    from transformers import HfArgumentParser, TrainingArguments

    d, rec, _ = written["deepspeed"]
    (line,) = [x for x in (d / "README.md").read_text().splitlines() if x.startswith("--per_device_train_batch_size")]
    argv = shlex.split(line)
    at = argv.index("--deepspeed")
    assert argv[at + 1] == f"{d}/ds_config.json"
    del argv[at:at + 2]  # TrainingArguments(deepspeed=...) needs DeepSpeed installed
    # --use_cpu: TrainingArguments refuses bf16 on a machine without a GPU unless told it trains on the CPU
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        argv + ["--output_dir", str(tmp_path), "--use_cpu", "true"])
    plan = build_plan(rec["plan"])
    h = plan.hparams
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (plan.micro_batch, plan.grad_accum)
    assert (args.learning_rate, args.weight_decay, args.max_grad_norm) == (h.effective_lr(plan.method),
                                                                           h.weight_decay, h.max_grad_norm)
    assert args.get_warmup_steps(10_000) == h.warmup_steps and args.lr_scheduler_type.value == h.lr_scheduler
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)  # the plan's AdamW
    assert args.bf16 == (plan.precision == "bf16-master") and args.num_train_epochs == h.epochs


def test_warmup_ratio_given_to_recommend_is_the_one_written(run_cli, tmp_path):
    out = tmp_path / "run"
    rec = run_json(run_cli, "recommend", "--model", "llama-3.2-1b", "--gpu", "h100", "--dataset-size", "2000",
                   "--warmup-ratio", "0.08", "-o", str(out))
    hp = yaml.safe_load((out / "plan.yaml").read_text())["hparams"]
    assert hp["warmup_ratio"] == 0.08 and "warmup_steps" not in hp
    assert rec["plan"]["hparams"]["warmup_ratio"] == 0.08 and rec["plan"]["hparams"]["warmup_steps"] is None
