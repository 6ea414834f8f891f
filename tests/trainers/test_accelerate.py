"""memplan.trainers.accelerate: accelerate launch configs (TRL's and LLaMA-Factory's published ones, kept verbatim
under configs/accelerate) read alone and beside a trainer's config, TRL's named configs, the combinations
accelerate and transformers refuse, and the accelerate_config.yaml recommend writes read back with the trainer's
config it writes. Pure Python, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_emit import PLANS, _emit, _plan, _write

from memplan.catalog.paths import data_dir
from memplan.catalog.resolve import resolve_model
from memplan.errors import UserError
from memplan.plan import build_plan, merge
from memplan.trainers import read_config

CONFIGS = Path(__file__).parent / "configs" / "accelerate"
TRL = "trl/examples/accelerate_configs/"
LF = "llamafactory/examples/accelerate/"
FSDP3 = {"sharding": "fsdp", "zero": 3, "offload": "none", "precision": "amp-bf16"}

# Each published file alone: the plan fields it sets (the training script's weights are assumed fp32, so
# accelerate's mixed_precision bf16 is amp-bf16; DeepSpeed's bf16 engine is bf16-master).
EXPECTED = {
    TRL + "deepspeed_zero1.yaml": {"gpus": 8, "nodes": 1, "sharding": "deepspeed", "zero": 1, "offload": "none",
                                   "grad_accum": 1, "precision": "bf16-master"},
    TRL + "deepspeed_zero2.yaml": {"gpus": 8, "nodes": 1, "sharding": "deepspeed", "zero": 2, "offload": "none",
                                   "precision": "bf16-master"},
    TRL + "deepspeed_zero3.yaml": {"gpus": 8, "nodes": 1, "sharding": "deepspeed", "zero": 3, "offload": "none",
                                   "precision": "bf16-master"},
    TRL + "fsdp1.yaml": {"gpus": 8, "nodes": 1, **FSDP3},
    TRL + "fsdp2.yaml": {"gpus": 8, "nodes": 1, **FSDP3},
    TRL + "multi_gpu.yaml": {"gpus": 8, "nodes": 1, "sharding": "ddp", "precision": "amp-bf16"},
    TRL + "single_gpu.yaml": {"gpus": 1, "nodes": 1, "sharding": "ddp", "precision": "amp-bf16"},
    LF + "fsdp_config.yaml": {"gpus": 2, "nodes": 1, **FSDP3},
    LF + "fsdp_config_offload.yaml": {"gpus": 2, "nodes": 1, **FSDP3, "offload": "optimizer+params"},
    LF + "fsdp_config_multiple_nodes.yaml": {"gpus": 8, "nodes": 2, **FSDP3},
    LF + "fsdp2_config.yaml": {"gpus": 2, "nodes": 1, **FSDP3},
    LF + "fsdp2_config_qwen35.yaml": {"gpus": 8, "nodes": 1, **FSDP3},
    LF + "fsdp2_config_qwen35_moe.yaml": {"gpus": 8, "nodes": 1, **FSDP3},
}

# What changes memory and is not counted (a prefetch or loading option that is off is counted as memplan counts).
V1 = ["fsdp_config.backward_prefetch", "fsdp_config.cpu_ram_efficient_loading"]
NOT_MODELLED = {TRL + "deepspeed_zero3.yaml": ["deepspeed_config.zero3_save_16bit_model"],
                TRL + "fsdp1.yaml": [*V1, "fsdp_config.forward_prefetch"],
                TRL + "fsdp2.yaml": ["fsdp_config.cpu_ram_efficient_loading"],
                LF + "fsdp_config.yaml": V1, LF + "fsdp_config_offload.yaml": V1,
                LF + "fsdp_config_multiple_nodes.yaml": V1,
                **{LF + f"fsdp2_config{s}.yaml": ["fsdp_config.cpu_ram_efficient_loading"]
                   for s in ("", "_qwen35", "_qwen35_moe")}}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_published_accelerate_config_maps_to_these_plan_fields(name):
    source = read_config(CONFIGS / name)
    assert source.format == "accelerate"
    assert source.plan == EXPECTED[name]
    assert [n["key"] for n in source.not_modelled] == NOT_MODELLED.get(name, [])
    assert source.unknown == []
    assert set(source.plan) == set(source.taken) | set(source.assumed)


def test_sources_are_recorded():
    text = (CONFIGS / "SOURCE.md").read_text()
    assert "f2cd57710ae345ea6428ae95363267fcf38a3dc8" in text and "Apache-2.0" in text
    for name in EXPECTED:
        assert Path(name).name in text, name
    assert "Apache-2.0" in (data_dir() / "trl_accelerate_configs" / "SOURCE.md").read_text()


@pytest.mark.parametrize("named, published", [("zero1", "deepspeed_zero1"), ("zero2", "deepspeed_zero2"),
                                              ("zero3", "deepspeed_zero3"), ("fsdp1", "fsdp1"), ("fsdp2", "fsdp2"),
                                              ("multi_gpu", "multi_gpu"), ("single_gpu", "single_gpu")])
def test_trl_named_configs_are_its_published_ones(tmp_path, named, published):
    """`accelerate_config: zero3` in a TRL config (TRL hands it to accelerate launch) reads TRL's zero3.yaml."""
    shipped = data_dir() / "trl_accelerate_configs" / f"{named}.yaml"
    assert read_config(shipped).plan == read_config(CONFIGS / TRL / f"{published}.yaml").plan
    sft = tmp_path / "sft.yaml"
    sft.write_text(f"model_name_or_path: llama-3.1-8b\naccelerate_config: {named}\n")
    source = read_config(sft)
    assert source.launcher == str(shipped)
    assert {k: source.plan[k] for k in ("gpus", "sharding")} == {k: EXPECTED[TRL + published + ".yaml"][k]
                                                                 for k in ("gpus", "sharding")}


def _sft(tmp_path, text="") -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text("model_name_or_path: llama-3.1-8b\nper_device_train_batch_size: 2\n" + text)
    return path


def test_trl_config_launched_with_fsdp_offload(tmp_path):
    source = read_config(_sft(tmp_path), CONFIGS / LF / "fsdp_config_offload.yaml")
    plan = source.plan
    assert (plan["sharding"], plan["zero"], plan["offload"], plan["gpus"], plan["nodes"], plan["micro_batch"],
            plan["precision"]) == ("fsdp", 3, "optimizer+params", 2, 1, 2, "amp-bf16")
    assert source.taken["gpus"] == "fsdp_config_offload.yaml: num_processes"
    assert source.taken["sharding"].startswith("fsdp_config_offload.yaml: distributed_type: FSDP")
    assert source.launcher.endswith("fsdp_config_offload.yaml") and source.launcher in source.files
    assert source.to_json()["accelerate_config"] == source.launcher
    assert source.unknown == []


def test_trl_config_launched_with_zero3_and_its_bf16(tmp_path):
    plan = read_config(_sft(tmp_path), "zero3").plan
    assert (plan["sharding"], plan["zero"], plan["gpus"], plan["precision"]) == ("deepspeed", 3, 8, "bf16-master")
    # bf16: false beside accelerate's bf16: the DDP autocast is accelerate's; under DeepSpeed transformers refuses
    off = _sft(tmp_path, "bf16: false\n")
    assert read_config(off, CONFIGS / TRL / "multi_gpu.yaml").plan["precision"] == "amp-bf16"
    with pytest.raises(UserError, match="mixed_precision bf16 turns on DeepSpeed's bf16 engine"):
        read_config(off, "zero2")


def test_trainer_fsdp_stands_and_takes_accelerates_offload(tmp_path):
    """Both FSDP: the trainer's fsdp_config is the plugin; accelerate's offload fills what it leaves out."""
    sft = _sft(tmp_path, "fsdp: shard_grad_op\n")
    plan = read_config(sft, CONFIGS / LF / "fsdp_config_offload.yaml").plan
    assert (plan["zero"], plan["offload"], plan["gpus"]) == (2, "optimizer+params", 2)


@pytest.mark.parametrize("trainer, accel, message", [
    ("fsdp: full_shard\n", TRL + "deepspeed_zero2.yaml", "disagree: the trainer's config sets fsdp"),
    ("deepspeed: ds.json\n", LF + "fsdp_config.yaml", "disagree: the trainer's config sets deepspeed"),
    ("deepspeed: ds.json\n", TRL + "deepspeed_zero3.yaml", "sets zero_stage, offload_optimizer_device"),
])
def test_conflicts_are_one_line(tmp_path, trainer, accel, message):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match=message) as err:
        read_config(_sft(tmp_path, trainer), CONFIGS / accel)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("compute_environment: LOCAL_MACHINE\nnum_processes: 2\n", "no distributed_type"),
    ("distributed_type: XLA\n", "distributed_type XLA is not one memplan reads"),
    ("distributed_type: MULTI_GPU\nnum_processes: 3\nnum_machines: 2\n", "not a whole number of processes"),
    ("distributed_type: FSDP\nmixed_precision: fp12\n", "mixed_precision fp12 is not one of"),
    ("compute_environment: AMAZON_SAGEMAKER\ndistributed_type: DATA_PARALLEL\n", "LOCAL_MACHINE"),
])
def test_bad_accelerate_configs_exit_2_with_one_line(tmp_path, run_cli, text, message):
    bad = tmp_path / "accel.yaml"
    bad.write_text(text)
    for args in (["--config", str(bad), "-m", "llama-3.1-8b"],
                 ["--config", str(_sft(tmp_path)), "--accelerate-config", str(bad)]):
        code, out, err = run_cli("estimate", *args)
        assert code == 2 and out == "", err
        assert message in err and err.count("\n") == 1 and err.startswith("memplan: error: ")


def test_accelerate_config_beside_the_wrong_file_exits_2(tmp_path, run_cli):
    accel = str(CONFIGS / TRL / "multi_gpu.yaml")
    for args, message in ((["--config", str(_sft(tmp_path)), "--accelerate-config", str(_sft(tmp_path))],
                           "not an accelerate config"),
                          (["--config", accel, "--accelerate-config", accel], "is an accelerate config itself"),
                          (["-m", "llama-3.1-8b", "--accelerate-config", accel], "goes with --config"),
                          (["--config", str(_sft(tmp_path)), "--accelerate-config", "zero4"], "zero3")):
        code, out, err = run_cli("estimate", *args)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_estimate_names_both_files_and_the_api_takes_it(tmp_path, run_cli):
    import memplan

    accel = CONFIGS / LF / "fsdp_config_multiple_nodes.yaml"
    code, out, err = run_cli("estimate", "--config", str(_sft(tmp_path)), "--accelerate-config", str(accel),
                             "--gpu", "h100-80gb")
    assert code in (0, 1), err
    assert f"launched with the accelerate config {accel}" in out
    assert "gpus=8 <- fsdp_config_multiple_nodes.yaml: num_processes / num_machines" in " ".join(out.split())
    out = memplan.estimate(plan=_sft(tmp_path), accelerate_config=accel, gpu="h100-80gb").to_json()
    plan = out["results"][0]["plan"]
    assert (plan["gpus"], plan["nodes"], plan["sharding"]) == (8, 2, "fsdp")
    assert out["config_source"]["accelerate_config"] == str(accel)


@pytest.mark.parametrize("trainer", ["trl", "axolotl", "llamafactory"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_recommends_accelerate_config_reads_back_with_its_trainer_config(tmp_path, name, trainer):
    """recommend -o writes accelerate_config.yaml beside each trainer's config: the two read together give
    the plan's sharding, ZeRO stage, offload, GPUs and nodes."""
    from memplan.recommend.writers import accelerate_config

    plan = _plan(name, tmp_path)
    e = _emit(plan, trainer)
    config = _write(e, tmp_path)
    accel = tmp_path / "accelerate_config.yaml"
    accel.write_text(json.dumps(accelerate_config(e.plan, resolve_model(e.plan.model), "127.0.0.1")))
    source = read_config(config, accel)
    back = build_plan(merge(source.plan, {}), source="read back")
    for field in ("sharding", "zero", "offload", "gpus", "nodes", "precision"):
        assert getattr(back, field) == getattr(e.plan, field), field
    assert source.unknown == []


def test_recommend_profile_and_html_take_it(tmp_path, run_cli):
    """recommend starts from the launch's GPUs and nodes; profile's plan and estimate --html read both files."""
    from memplan.profile.command import _plan
    from memplan.trainers import recommend_inputs

    sft, accel = _sft(tmp_path), CONFIGS / LF / "fsdp_config_multiple_nodes.yaml"
    inputs = recommend_inputs(read_config(sft, accel), None)
    assert (inputs["gpus"], inputs["nodes"], inputs["effective_batch"]) == (8, 2, 32)  # 2 x 1 x 8 x 2
    code, out, err = run_cli("recommend", "--config", str(sft), "--accelerate-config", str(accel), "--gpu",
                             "h100-80gb", "--dataset-size", "10000", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert (r["plan"]["gpus"], r["plan"]["nodes"]) == (8, 2)
    assert r["config_source"]["accelerate_config"] == str(accel)
    plan, source = _plan(None, str(sft), None, {}, str(accel))
    assert (plan.gpus, plan.nodes, plan.sharding) == (8, 2, "fsdp") and source.launcher == str(accel)
    page = tmp_path / "page.html"
    code, _, err = run_cli("estimate", "--config", str(sft), "--accelerate-config", str(accel), "--gpu", "h100-80gb",
                           "--html", str(page))
    assert code in (0, 1), err
    assert f"--accelerate-config {accel}" in page.read_text()


def test_deepspeed_config_file_beside_the_accelerate_config(tmp_path):
    """deepspeed_config_file is read with memplan.trainers.deepspeed, found beside the accelerate config; its
    "auto" bf16 follows the trainer's bf16 (alone: accelerate's mixed_precision); ZeRO settings or a
    mixed_precision beside it are refused, as accelerate refuses them."""
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "ds.json").write_text(json.dumps({
        "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    accel = tmp_path / "launch" / "accel.yaml"
    accel.write_text("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config:\n"
                     "  deepspeed_config_file: ds.json\n  zero3_init_flag: true\n")
    alone = read_config(accel)
    assert {k: alone.plan[k] for k in ("sharding", "zero", "offload", "gpus", "precision")} == {
        "sharding": "deepspeed", "zero": 3, "offload": "optimizer", "gpus": 4, "precision": "fp32"}
    assert alone.files == [str(tmp_path / "launch" / "ds.json")] and alone.unknown == []
    source = read_config(_sft(tmp_path), accel)
    assert (source.plan["zero"], source.plan["precision"], source.plan["micro_batch"]) == (3, "bf16-master", 2)
    assert source.taken["zero"] == "accel.yaml: deepspeed_config.deepspeed_config_file (ds.json): zero_optimization.stage"
    accel.write_text(accel.read_text() + "  zero_stage: 2\nmixed_precision: bf16\n")
    with pytest.raises(UserError, match="deepspeed_config_file with zero_stage, mixed_precision beside it"):
        read_config(accel)
