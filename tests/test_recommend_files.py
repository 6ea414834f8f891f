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
    """Three recommendations written once: DeepSpeed (full FT on 4 GPUs), multi-node, and DDP (LoRA)."""
    from click.testing import CliRunner

    from memplan.cli import main

    base = tmp_path_factory.mktemp("rec")
    runs = {
        "deepspeed": ["--model", "llama-2-7b", "--gpu", "a100-80gb", "--gpus", "4", "--dataset-size", "50000",
                      "--method", "full"],
        "multinode": ["--model", "llama-2-7b", "--gpu", "a100-40gb", "--gpus", "8", "--nodes", "2",
                      "--dataset-size", "50000", "--method", "full", "--priority", "memory"],
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
        assert Path(cfg.deepspeed_config["deepspeed_config_file"]) == (d / "ds_config.json").resolve()
    if plan["nodes"] > 1:
        assert cfg.main_process_ip and cfg.main_process_port == 29500


def test_accelerate_config_fsdp_and_cpu(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    from memplan.models import resolve_model
    from memplan.recommend.writers import accelerate_config

    spec = resolve_model("llama-2-7b")
    cases = [
        (dict(method="full", precision="amp-bf16", sharding="fsdp", zero=3, gpus=4), "FSDP", "bf16"),
        (dict(method="full", precision="fp32", device="cpu"), "NO", "no"),
        (dict(method="full", precision="fp32", device="cpu", gpus=2), "MULTI_CPU", "no"),
        (dict(method="lora", precision="bf16", gpus=2), "MULTI_GPU", "no"),
    ]
    for fields, dist, mixed in cases:
        plan = build_plan(fields)
        path = tmp_path / f"{dist}.yaml"
        path.write_text(yaml.safe_dump(accelerate_config(plan, spec, None, "10.0.0.1")))
        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.distributed_type.value == dist and cfg.mixed_precision == mixed
        assert cfg.use_cpu == (plan.device == "cpu")
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


def _check_documented(obj: dict, schema: dict, where: str = "") -> None:
    for key, value in obj.items():
        assert key in schema, f"{where}{key} is not a documented DeepSpeed key"
        kind = schema[key]
        if isinstance(kind, dict):
            assert isinstance(value, dict), f"{where}{key} must be an object"
            _check_documented(value, kind, f"{where}{key}.")
        elif kind is float:
            assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}{key}"
        else:
            assert isinstance(value, kind) and (kind is bool or not isinstance(value, bool)), f"{where}{key}"


@pytest.mark.parametrize("name", ["deepspeed", "multinode"])
def test_ds_config_uses_documented_keys_and_consistent_batch(written, name):
    d, rec, _ = written[name]
    ds = json.loads((d / "ds_config.json").read_text())
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
    import memplan.gpus
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.setattr(memplan.gpus, "local_gpus", lambda: [])  # this machine's CPU, even on a GPU runner
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
