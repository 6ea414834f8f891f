"""The Plan: defaults, one clear error per bad field or combination, YAML round trip, overrides."""

import pytest

from memplan.errors import UserError
from memplan.plan import Plan, build_plan, merge, plan_to_yaml, read_plan_yaml


def test_defaults_are_the_documented_ones():
    p = Plan()
    assert (p.method, p.precision, p.optimizer, p.sharding, p.zero, p.offload) == (
        "full", "amp-bf16", "adamw", "ddp", 0, "none")
    assert (p.micro_batch, p.seq_len, p.grad_accum, p.grad_ckpt, p.attn, p.loss) == (1, 2048, 1, True, "sdpa", "standard")
    assert (p.lora.rank, p.lora.alpha, p.lora.dropout, p.lora.targets) == (16, 32.0, 0.05, "all-linear")
    assert p.world_size == 1 and p.effective_batch == 1


@pytest.mark.parametrize("fields, reason, hint", [
    (dict(method="qlora", precision="fp32"), "QLoRA computes in 16-bit", "--precision bf16"),
    (dict(grad_ckpt=False, ckpt_reentrant=True), "without gradient checkpointing nothing is recomputed",
     "--grad-ckpt"),
    (dict(sharding="ddp", zero=2), "ZeRO stage 2 needs a sharding backend", "--sharding deepspeed"),
    (dict(offload="optimizer"), "DDP cannot offload", "--sharding deepspeed"),
    (dict(sharding="fsdp", zero=1), "no optimizer-only sharding", "--zero 2"),
    (dict(sharding="fsdp", zero=3, offload="optimizer"), "optimizer-only offload is DeepSpeed's", "optimizer+params"),
    (dict(sharding="fsdp", zero=3, gpus=2, method="lora-8bit"), "cannot shard LLM.int8's 8-bit base", "qlora"),
    (dict(sharding="deepspeed", zero=2, precision="amp-bf16"), "not a DeepSpeed regime", "bf16-master"),
    (dict(sharding="deepspeed", zero=2, precision="bf16-master", offload="optimizer+params"), "only in ZeRO-3", "--zero 3"),
    (dict(attn="flash", precision="fp32"), "fp16/bf16 only", "--attn sdpa"),
    (dict(device="cpu", sharding="deepspeed", zero=3, precision="bf16-master"), "ZeRO-3 needs CUDA", "gloo"),
    (dict(device="cpu", precision="amp-fp16"), "GPU regime", "amp-bf16"),
    (dict(device="cpu", optimizer="paged-adamw-8bit"), "page GPU memory", "adamw-8bit"),
    (dict(device="cpu", attn="flash", precision="bf16"), "CUDA kernel", "--attn sdpa"),
    (dict(device="cpu", sharding="fsdp", zero=3, offload="optimizer+params"), "nothing to offload", "--offload none"),
])
def test_bad_combinations_give_reason_and_hint(fields, reason, hint):
    with pytest.raises(UserError) as err:
        build_plan(fields)
    msg = str(err.value)
    assert reason in msg and "Hint:" in msg and hint in msg
    assert "\n" not in msg


@pytest.mark.parametrize("fields, needle", [
    (dict(micro_batch=0), "micro_batch"),
    (dict(seq_len=-5), "seq_len"),
    (dict(gpus=0), "gpus"),
    (dict(method="prefix"), "full"),
    (dict(lora={"rank": 0}), "lora.rank"),
    (dict(bogus=1), "unknown key 'bogus'"),
])
def test_bad_fields_name_the_field(fields, needle):
    with pytest.raises(UserError) as err:
        build_plan(fields, source="plan.yaml")
    assert needle in str(err.value) and str(err.value).startswith("plan.yaml")


def test_supported_combinations_validate():
    build_plan(dict(sharding="deepspeed", zero=3, precision="bf16-master", offload="optimizer+params"))
    build_plan(dict(sharding="fsdp", zero=3, offload="optimizer+params"))
    build_plan(dict(sharding="fsdp", zero=3, gpus=2, method="qlora", precision="bf16", offload="optimizer+params"))
    build_plan(dict(method="qlora", precision="bf16", optimizer="paged-adamw-8bit"))


def test_yaml_round_trip_and_flag_overrides(tmp_path):
    plan = build_plan(dict(model="llama-2-7b", method="lora", lora={"rank": 8, "targets": "q_proj,v_proj"}))
    path = tmp_path / "plan.yaml"
    path.write_text(plan_to_yaml(plan, header="# memplan estimate --config plan.yaml\n"))
    data = read_plan_yaml(path)
    assert build_plan(data) == plan
    assert build_plan(data).lora.targets == ["q_proj", "v_proj"]
    merged = build_plan(merge(data, {"lora.rank": 32, "micro_batch": 4}))
    assert merged.lora.rank == 32 and merged.micro_batch == 4 and merged.lora.targets == ["q_proj", "v_proj"]


def test_recommend_style_yaml_with_plan_section(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("plan:\n  model: qwen2.5-0.5b\n  method: qlora\n  precision: bf16\ndata:\n  train: x.jsonl\n")
    assert build_plan(read_plan_yaml(path)).method == "qlora"


@pytest.mark.parametrize("text, needle", [
    ("method: [unclosed", "malformed YAML"),
    ("- just\n- a list\n", "YAML mapping"),
])
def test_malformed_yaml_is_one_line(tmp_path, text, needle):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_plan_yaml(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_training_sections_have_defaults_and_validate(tmp_path):
    p = Plan()
    assert p.device == "cuda" and p.output_dir is None
    assert (p.hparams.eval_every, p.hparams.early_stopping_patience, p.hparams.save_total_limit) == (50, 3, 2)
    assert (p.data.train, p.data.format, p.data.domain_shift, p.data.replay_ratio) == (None, "auto", "low", 0.0)
    with pytest.raises(UserError, match="replay_ratio"):
        build_plan({"data": {"replay_ratio": 1.5}})
    with pytest.raises(UserError, match="data.format"):
        build_plan({"data": {"format": "csv"}})
    full = build_plan({"device": "cpu", "data": {"train": "train.jsonl", "samples": 800},
                       "hparams": {"max_steps": 30, "seed": 7}, "output_dir": "out"})
    path = tmp_path / "plan.yaml"
    path.write_text(plan_to_yaml(full))
    assert build_plan(read_plan_yaml(path)) == full


def test_warmup_has_one_source_of_truth(tmp_path):
    """warmup_ratio and warmup_steps together were accepted and the steps silently won; now a plan holds one."""
    with pytest.raises(UserError) as err:
        build_plan({"hparams": {"warmup_ratio": 0.1, "warmup_steps": 5}}, source="plan.yaml")
    assert str(err.value).startswith("plan.yaml: hparams: warmup_ratio (0.1) and warmup_steps (5) are both set")
    assert "Hint:" in str(err.value)
    assert (Plan().hparams.warmup_ratio, Plan().hparams.warmup_steps) == (0.05, None)  # neither: the default ratio
    steps = build_plan({"hparams": {"warmup_steps": 5}})
    assert steps.hparams.warmup_ratio is None
    text = plan_to_yaml(steps)
    assert "warmup_steps: 5" in text and "warmup_ratio" not in text
    assert build_plan(read_yaml_text(tmp_path, text)) == steps  # the written file reads back as the same plan
    # an override of one replaces the other from the file (--set warmup_ratio=0.2 on a plan with warmup_steps)
    merged = build_plan(merge({"hparams": {"warmup_steps": 5}}, {"hparams.warmup_ratio": 0.2}))
    assert (merged.hparams.warmup_ratio, merged.hparams.warmup_steps) == (0.2, None)
    with pytest.raises(UserError, match="both set"):
        build_plan(merge({}, {"hparams.warmup_ratio": 0.2, "hparams.warmup_steps": 3}))


def read_yaml_text(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return read_plan_yaml(path)


def test_lora_block_is_written_for_adapters_only_and_ignored_by_full():
    full = build_plan({"method": "full"})
    assert "lora" not in read_yaml_text_dict(plan_to_yaml(full))
    lora = build_plan({"method": "lora", "lora": {"rank": 8}})
    assert read_yaml_text_dict(plan_to_yaml(lora))["lora"]["rank"] == 8
    # a lora block with method full (say `--set method=full` on a LoRA plan) is ignored, and said so
    switched = build_plan({"method": "full", "lora": {"rank": 8}})
    text = plan_to_yaml(switched)
    assert "lora" not in read_yaml_text_dict(text)
    assert "# lora: rank 8, alpha 32, dropout 0.05, targets all-linear: ignored, method is full" in text


def read_yaml_text_dict(text):
    import yaml

    return yaml.safe_load(text)
