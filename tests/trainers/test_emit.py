"""memplan.trainers.emit: each trainer's config written for a plan reads back (memplan.trainers.read_config) to the
plan it runs, field by field; where a trainer cannot express the plan, the nearest plan and every difference are
asserted here; and `recommend -o DIR --emit ...` end to end. Pure Python, no torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.errors import UserError
from memplan.plan import build_plan, merge
from memplan.trainers import read_config
from memplan.trainers.emit import Context, emit_all, lora_target_names, parse_emit

from support import run_torch_free

TRAINERS = ["trl", "axolotl", "llamafactory", "torchtune"]
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}

# The plans written: full / LoRA / QLoRA / LoRA on an 8-bit base, DDP / FSDP / DeepSpeed, with and without
# checkpointing (reentrant too), the expandable allocator, each precision regime the search picks.
PLANS = {
    "full-amp-bf16-ddp": {"model": "llama-3.1-8b", "method": "full", "precision": "amp-bf16",
                          "optimizer": "adamw-fused", "micro_batch": 2, "grad_accum": 8, "seq_len": 1024,
                          "grad_ckpt": True, "hparams": {"warmup_steps": 20, "lr": 1e-5, "epochs": 2.0}},
    "lora-bf16-fsdp": {"model": "llama-3.1-8b", "method": "lora", "precision": "bf16", "gpus": 4, "sharding": "fsdp",
                       "zero": 3, "grad_ckpt": False, "attn": "flash", "loss": "chunked", "allocator": "expandable",
                       "lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "targets": "q_proj,v_proj"},
                       "hparams": {"warmup_steps": 5, "lr_scheduler": "linear"}},
    "qlora-bf16-ddp": {"model": "qwen2.5-7b", "method": "qlora", "precision": "bf16", "gpus": 2,
                       "optimizer": "paged-adamw-8bit", "micro_batch": 4, "grad_accum": 2,
                       "hparams": {"warmup_steps": 10}, "data": {"packing": True}},
    "full-ds3-offload": {"model": "llama-3.1-8b", "method": "full", "precision": "bf16-master", "gpus": 8,
                         "sharding": "deepspeed", "zero": 3, "offload": "optimizer", "optimizer": "adamw",
                         "grad_ckpt": True, "hparams": {"warmup_steps": 30}},
    "full-fp32-fsdp2": {"model": "llama-3.2-1b", "method": "full", "precision": "fp32", "gpus": 2,
                        "sharding": "fsdp", "zero": 2, "attn": "eager", "grad_ckpt": False,
                        "hparams": {"warmup_steps": 0, "lr_scheduler": "constant"}},
    "lora-8bit-reentrant": {"model": "llama-3.1-8b", "method": "lora-8bit", "precision": "bf16", "grad_ckpt": True,
                            "ckpt_reentrant": True, "lora": {"rank": 16, "targets": "all-linear"},
                            "hparams": {"warmup_steps": 8}},
    "full-liger-fsdp": {"model": "llama-3.1-8b", "method": "full", "precision": "bf16", "gpus": 8,
                        "sharding": "fsdp", "zero": 3, "liger": "all", "micro_batch": 4, "seq_len": 4096,
                        "hparams": {"warmup_steps": 10}},
    "lora-liger-layers": {"model": "qwen2.5-7b", "method": "lora", "precision": "bf16",
                          "liger": "rope,rms_norm,swiglu", "hparams": {"warmup_steps": 6}},
    "lora-offload-activations": {"model": "llama-3.1-8b", "method": "lora", "precision": "bf16", "gpus": 2,
                                 "sharding": "fsdp", "zero": 3, "offload_activations": True, "micro_batch": 8,
                                 "hparams": {"warmup_steps": 4}},
    "lora-ds2-all-linear": {"model": "mistral-7b", "method": "lora", "precision": "bf16-master", "gpus": 4,
                            "sharding": "deepspeed", "zero": 2, "lora": {"targets": "all-linear"},
                            "hparams": {"warmup_steps": 12}},
}

# What each trainer cannot express of each plan: the nearest plan's changed fields (a check that says every plan
# fits). Plans and trainers not listed are written exactly.
NEAREST = {
    ("full-amp-bf16-ddp", "axolotl"): {"precision": "fp32"},
    ("full-amp-bf16-ddp", "torchtune"): {"precision": "fp32", "loss": "chunked"},
    ("lora-bf16-fsdp", "axolotl"): {"loss": "standard"},
    ("lora-bf16-fsdp", "llamafactory"): {"loss": "standard"},
    ("lora-bf16-fsdp", "torchtune"): {"attn": "sdpa", "hparams.lr_scheduler": "cosine"},
    ("qlora-bf16-ddp", "trl"): {"data.padding_free": True},
    ("qlora-bf16-ddp", "torchtune"): {"method": "lora", "sharding": "fsdp", "zero": 2, "loss": "chunked"},
    ("full-ds3-offload", "torchtune"): {"sharding": "fsdp", "offload": "optimizer+params", "precision": "fp32",
                                        "loss": "chunked"},
    ("full-fp32-fsdp2", "torchtune"): {"attn": "sdpa", "loss": "chunked", "hparams.lr_scheduler": "cosine"},
    ("lora-8bit-reentrant", "torchtune"): {"method": "lora", "ckpt_reentrant": False, "loss": "chunked"},
    ("lora-ds2-all-linear", "torchtune"): {"sharding": "fsdp", "precision": "bf16", "loss": "chunked"},
    ("lora-offload-activations", "axolotl"): {"offload_activations": False},
    ("lora-offload-activations", "llamafactory"): {"offload_activations": False},
    ("lora-offload-activations", "torchtune"): {"loss": "chunked"},
    ("full-liger-fsdp", "torchtune"): {"liger": [], "loss": "chunked"},
    ("lora-liger-layers", "llamafactory"): {"liger": ["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]},
    ("lora-liger-layers", "torchtune"): {"liger": [], "loss": "chunked"},
}

COMPARED = ["method", "precision", "optimizer", "sharding", "zero", "offload", "micro_batch", "grad_accum", "seq_len",
            "grad_ckpt", "ckpt_reentrant", "attn", "loss", "hparams.epochs", "hparams.lr_scheduler", "hparams.warmup_steps",
            "hparams.weight_decay", "data.packing", "data.padding_free", "liger", "offload_activations"]


def _get(plan, path):
    head, _, leaf = path.partition(".")
    return getattr(getattr(plan, head), leaf) if leaf else getattr(plan, head)


def _plan(name, tmp_path):
    data = json.loads(json.dumps(PLANS[name]))
    data.setdefault("data", {})["train"] = "train.jsonl"
    (tmp_path / "train.jsonl").write_text(json.dumps(CHAT) + "\n")
    return build_plan(data, source=name)


def _emit(plan, trainer, fits=True, fmt="chat"):
    ctx = Context(plan, resolve_model(plan.model), fmt, 100)
    return emit_all([trainer], plan, ctx, lambda p: (123 * 2**30, fits))[0]


def _write(emitted, directory: Path) -> Path:
    """The trainer's files, and the ds_config.json of a DeepSpeed plan that recommend writes next to them."""
    from memplan.recommend.writers import ds_config

    for name, text in emitted.files.items():
        (directory / name).write_text(text)
    if emitted.plan.sharding == "deepspeed":
        (directory / "ds_config.json").write_text(json.dumps(ds_config(emitted.plan, resolve_model(emitted.plan.model))))
    return directory / emitted.config


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("name", sorted(PLANS))
def test_emitted_config_reads_back_to_the_plan_it_runs(tmp_path, name, trainer):
    plan = _plan(name, tmp_path)
    e = _emit(plan, trainer)
    changed = {p: _get(e.plan, p) for p in [*COMPARED, "lora.targets"] if _get(e.plan, p) != _get(plan, p)}
    assert changed == NEAREST.get((name, trainer), {})
    assert bool(e.differences) == bool(changed) and len(e.differences) >= len(changed) - 1  # zero goes with sharding
    if (name, trainer) in NEAREST:
        assert e.total_bytes == 123 * 2**30 and e.fits is True
    else:
        assert e.total_bytes is None
    source = read_config(_write(e, tmp_path))
    assert source.format == trainer.replace("llamafactory", "llama-factory")
    assert source.unknown == []
    fields = {"gpus": e.plan.gpus, "nodes": e.plan.nodes} if trainer != "torchtune" else {}
    back = build_plan(merge(source.plan, fields), source="read back")
    for path in COMPARED:
        assert _get(back, path) == _get(e.plan, path), path
    assert back.gpus == e.plan.gpus
    assert back.hparams.lr == e.plan.hparams.effective_lr(e.plan.method)  # the method's default written out
    assert back.data.train == str(tmp_path / "train.jsonl")
    if e.plan.trains_adapters:
        spec = resolve_model(plan.model)
        assert (back.lora.rank, back.lora.alpha, back.lora.dropout) == (e.plan.lora.rank, e.plan.lora.alpha,
                                                                        e.plan.lora.dropout)
        assert sorted(lora_target_names(back, spec)) == sorted(lora_target_names(e.plan, spec))
    if trainer == "trl":  # TrlParser sets the config's env before anything loads
        assert back.allocator == plan.allocator


def test_the_nearest_plan_is_the_first_that_fits(tmp_path):
    """Full fine-tuning in amp-bf16 on axolotl / torchtune: fp32 (fp32 weights, as the plan) when it fits,
    else pure bf16; the difference says which and why."""
    plan = _plan("full-amp-bf16-ddp", tmp_path)
    for trainer in ("axolotl", "torchtune"):
        first = _emit(plan, trainer, fits=True)
        assert first.plan.precision == "fp32" and "fp32 keeps the fp32 weights" in " ".join(first.differences)
        neither = _emit(plan, trainer, fits=False)  # nothing fits: the first is written, said not to fit
        assert neither.plan.precision == "fp32" and neither.fits is False
    ctx = Context(plan, resolve_model(plan.model), "chat", 100)
    e = emit_all(["torchtune"], plan, ctx, lambda p: (1, p.precision == "bf16"))[0]
    assert e.plan.precision == "bf16" and "pure bf16 weights lose small updates" in " ".join(e.differences)
    assert "dtype: bf16" in e.files["torchtune.yaml"]


def test_precision_as_each_trainer_writes_it(tmp_path):
    plan = _plan("full-amp-bf16-ddp", tmp_path)
    trl = _emit(plan, "trl").files["trl_sft.yaml"]
    assert "dtype: float32\n" in trl and "bf16: true\n" in trl and "amp-bf16: dtype float32 weights + bf16: true" in trl
    lf = _emit(plan, "llamafactory").files["llamafactory.yaml"]
    assert "bf16: true\n" in lf and "pure_bf16" not in lf  # full fine-tuning upcasts to fp32 and autocasts
    pure = build_plan(merge(plan.model_dump(mode="json"), {"precision": "bf16"}))
    lf = _emit(pure, "llamafactory").files["llamafactory.yaml"]
    assert "pure_bf16: true\n" in lf and "bf16: false\n" in lf  # LLaMA-Factory refuses pure_bf16 with autocast
    assert "dtype: bfloat16\n" in _emit(pure, "trl").files["trl_sft.yaml"]
    ds = _plan("full-ds3-offload", tmp_path)
    for trainer, name in (("trl", "trl_sft.yaml"), ("axolotl", "axolotl.yaml"), ("llamafactory", "llamafactory.yaml")):
        text = _emit(ds, trainer).files[name]
        assert "deepspeed: ds_config.json\n" in text and "bf16: true\n" in text, trainer


def test_bf16_masters_outside_deepspeed_run_as_amp_bf16_in_the_hf_trainers(tmp_path):
    plan = build_plan(merge(_plan("full-fp32-fsdp2", tmp_path).model_dump(mode="json"), {"precision": "bf16-master"}))
    for trainer in ("trl", "llamafactory"):
        e = _emit(plan, trainer)
        assert e.plan.precision == "amp-bf16"
        assert "only under DeepSpeed's bf16 engine" in e.differences[0]


def test_launch_commands(tmp_path):
    plan = _plan("lora-bf16-fsdp", tmp_path)  # 4 GPUs, expandable segments
    prefix = "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
    launch = {t: _emit(plan, t).launch for t in TRAINERS}
    assert launch["trl"] == [prefix + "trl sft --config trl_sft.yaml --accelerate_config accelerate_config.yaml"]
    assert launch["axolotl"] == [prefix + "axolotl train axolotl.yaml --launcher accelerate -- --num_processes 4 "
                                          "--num_machines 1"]
    assert launch["llamafactory"] == [prefix + "FORCE_TORCHRUN=1 NNODES=1 NODE_RANK=0 NPROC_PER_NODE=4 "
                                               "llamafactory-cli train llamafactory.yaml"]
    assert launch["torchtune"][0] == "tune download meta-llama/Llama-3.1-8B --output-dir model"
    assert launch["torchtune"][1].startswith(prefix + "tune run --nproc_per_node 4 lora_finetune_distributed "
                                                      "--config torchtune.yaml checkpointer.checkpoint_files=")
    single = _plan("full-amp-bf16-ddp", tmp_path)
    assert _emit(single, "llamafactory").launch == ["llamafactory-cli train llamafactory.yaml"]
    assert _emit(single, "axolotl").launch == ["axolotl train axolotl.yaml"]
    assert "tune run full_finetune_single_device --config" in _emit(single, "torchtune").launch[1]


def test_data_shapes(tmp_path):
    plan = _plan("full-amp-bf16-ddp", tmp_path)
    lf = _emit(plan, "llamafactory", fmt="alpaca")
    assert json.loads(lf.files["dataset_info.json"])["memplan_train"] == {
        "file_name": "train.jsonl", "formatting": "alpaca",
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    text = _emit(plan, "llamafactory", fmt="text")
    assert "stage: pt\n" in text.files["llamafactory.yaml"] and "packing: false\n" in text.files["llamafactory.yaml"]
    assert "type: completion" in _emit(plan, "axolotl", fmt="text").files["axolotl.yaml"]
    assert "torchtune.datasets.alpaca_dataset" in _emit(plan, "torchtune", fmt="alpaca").files["torchtune.yaml"]
    trl = _emit(plan, "trl", fmt="alpaca")
    assert any("not alpaca's instruction/input/output" in n for n in trl.notes)


def test_torchtune_without_a_builder_writes_nothing_and_says_why(tmp_path):
    plan = build_plan({"model": "gpt2", "data": {"train": "train.jsonl"}})
    e = _emit(plan, "torchtune")
    assert e.files == {} and "has none for gpt2" in e.differences[0]


def test_torchtune_warmup_ratio_becomes_steps(tmp_path):
    plan = build_plan(merge(_plan("full-fp32-fsdp2", tmp_path).model_dump(mode="json"),
                            {"hparams.warmup_ratio": 0.05}))
    source = read_config(_write(_emit(plan, "torchtune"), tmp_path))  # 100 steps in the run
    assert source.plan["hparams"]["warmup_steps"] == 5


def test_parse_emit():
    assert parse_emit("trl, torchtune,trl") == ["trl", "torchtune"]
    with pytest.raises(UserError, match="--emit axolotol: not a trainer memplan writes; did you mean 'axolotl'"):
        parse_emit("trl,axolotol")


def test_recommend_emit_end_to_end(tmp_path, run_cli):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(200)))
    out = tmp_path / "run"
    code, stdout, err = run_cli("recommend", "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "--gpus", "4",
                                "--data", str(data), "--method", "full", "-o", str(out),
                                "--emit", "trl,axolotl,llamafactory,torchtune", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert [c["trainer"] for c in r["trainer_configs"]] == TRAINERS
    for name in ("trl_sft.yaml", "axolotl.yaml", "llamafactory.yaml", "dataset_info.json", "torchtune.yaml"):
        assert (out / name).is_file() and str(out / name) in r["files"]
    readme = (out / "README.md").read_text()
    assert f"cd {out}\ntrl sft --config trl_sft.yaml" in readme
    for c in r["trainer_configs"]:
        plan = read_config(out / c["config"])
        assert Path(plan.plan["data"]["train"]).resolve() == data.resolve()
        if not c["exact"]:
            assert c["differences"] and c["total_bytes"] > 0 and f"{c['config'].split('.')[0]}" in readme
    code, _, err = run_cli("recommend", "--model", "llama-3.1-8b", "--dataset-size", "100", "--emit", "trl")
    assert code == 2 and err == ("memplan: error: --emit trl: needs -o DIR, where the trainers' configs are "
                                 "written next to plan.yaml\n")
    code, _, err = run_cli("recommend", "--model", "llama-3.1-8b", "--dataset-size", "100", "-o", str(out),
                           "--emit", "deepspeed")
    assert code == 2 and len(err.splitlines()) == 1 and "allowed: trl, axolotl, llamafactory, torchtune" in err


def test_emitting_imports_neither_torch_nor_transformers(tmp_path):
    code = ("from memplan.plan import build_plan\nfrom memplan.catalog.resolve import resolve_model\n"
            "from memplan.trainers.emit import Context, emit_all\n"
            "p = build_plan({'model': 'llama-3.1-8b', 'method': 'lora'})\n"
            "es = emit_all(['trl', 'axolotl', 'llamafactory', 'torchtune'], p, Context(p, resolve_model(p.model), "
            "'chat', 10), lambda q: (0, True))\nprint(len(es))")
    assert run_torch_free(code, tmp_path).strip() == "4"


def test_axolotl_fsdp2_with_8bit_adamw_writes_torchaos(tmp_path):
    """axolotl refuses bitsandbytes' 8-bit AdamW under FSDP2 (check_fsdp2_w_8bit_optimizer, found by its own
    validator in benchmarks/trainer_configs_check.py): torchao's adamw_torch_8bit is written instead."""
    plan = build_plan(merge(_plan("full-fp32-fsdp2", tmp_path).model_dump(mode="json"), {"optimizer": "adamw-8bit"}))
    e = _emit(plan, "axolotl")
    assert "optimizer: adamw_torch_8bit\n" in e.files["axolotl.yaml"] and "torchao" in e.notes[0]
    source = read_config(_write(e, tmp_path))
    assert source.plan["optimizer"] == "adamw-8bit" and [n["key"] for n in source.not_modelled] == ["optimizer"]
    ddp = build_plan(merge(plan.model_dump(mode="json"), {"sharding": "ddp", "zero": 0, "gpus": 1}))
    assert "optimizer: adamw_bnb_8bit\n" in _emit(ddp, "axolotl").files["axolotl.yaml"]


def test_ddp_on_several_gpus_turns_find_unused_parameters_off(tmp_path):
    """The Trainer would search the autograd graph of a peft model every step (find_unused_parameters=True) and
    bucket its gradients otherwise than the estimate counts; one GPU and FSDP leave the key out."""
    import yaml

    ddp = _plan("qlora-bf16-ddp", tmp_path)  # 2 GPUs
    for trainer in ("trl", "axolotl", "llamafactory"):
        e = _emit(ddp, trainer)
        assert yaml.safe_load(e.files[e.config])["ddp_find_unused_parameters"] is False, trainer
    for name in ("full-amp-bf16-ddp", "lora-bf16-fsdp"):
        e = _emit(_plan(name, tmp_path), "trl")
        assert "ddp_find_unused_parameters" not in yaml.safe_load(e.files[e.config]), name


def test_fsdp_with_accumulation_writes_and_reads_sync_each_batch(tmp_path):
    """Under FSDP with accumulation the Trainer defers the reduce-scatter to the last micro-batch unless accelerate's
    sync_each_batch is set: TRL, LLaMA-Factory and axolotl files write the plan's sync_each_batch, and reading one
    gives it back; a file without the key is read as the Trainer runs it (sync_each_batch off: every layer's whole gradients
    held between micro-batches, which the estimate counts)."""
    import yaml

    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate

    plan = build_plan(merge(_plan("lora-bf16-fsdp", tmp_path).model_dump(mode="json"), {"grad_accum": 4}))
    key = "accelerator_config.gradient_accumulation_kwargs.sync_each_batch"
    for trainer in ("trl", "llamafactory", "axolotl"):
        for sync in (True, False):
            e = _emit(build_plan(merge(plan.model_dump(mode="json"), {"sync_each_batch": sync})), trainer)
            data = yaml.safe_load(e.files[e.config])
            assert data["accelerator_config"] == {"gradient_accumulation_kwargs": {"sync_each_batch": sync}}, trainer
            source = read_config(_write(e, tmp_path))
            assert source.plan["sync_each_batch"] is sync and source.taken["sync_each_batch"] == key, trainer
        del data["accelerator_config"]
        path = tmp_path / f"deferred-{trainer}.yaml"
        path.write_text(yaml.safe_dump(data))
        source = read_config(path)
        assert source.plan["sync_each_batch"] is False and "sync_each_batch" in source.assumed, trainer
    # TrainingArguments also takes the path of a JSON file (AcceleratorConfig.from_json_file)
    (tmp_path / "accelerator.json").write_text('{"gradient_accumulation_kwargs": {"sync_each_batch": true}}')
    path = tmp_path / "deferred-trl.yaml"
    path.write_text(yaml.safe_dump(dict(yaml.safe_load(path.read_text()), accelerator_config="accelerator.json")))
    source = read_config(path)
    assert source.plan["sync_each_batch"] is True
    assert source.taken["sync_each_batch"] == "accelerator_config (accelerator.json).gradient_accumulation_kwargs" \
                                              ".sync_each_batch"
    assert str(tmp_path / "accelerator.json") in source.files
    one_micro_batch = build_plan(merge(plan.model_dump(mode="json"), {"grad_accum": 1}))
    e = _emit(one_micro_batch, "trl")
    assert "accelerator_config" not in yaml.safe_load(e.files[e.config])
    # deferred, each GPU holds every LoRA adapter's whole gradient between micro-batches: a whole replica of the
    # sharded ones the optimizer steps on (no shard padded here), where each micro-batch's sync keeps only its shards
    deferred = build_plan(merge(plan.model_dump(mode="json"), {"sync_each_batch": False}))
    assert deferred.defers_gradient_reduction and not plan.defers_gradient_reduction
    e_sync, e_deferred = estimate(resolve_model(plan.model), plan), estimate(resolve_model(plan.model), deferred)
    sharded = e_sync.phases["optimizer"]["gradients"]
    assert e_sync.phases["forward"]["gradients"] == sharded
    assert e_deferred.phases["forward"]["gradients"] == sharded * plan.world_size
    assert e_deferred.peak_allocated > e_sync.peak_allocated and e_deferred.reserved > e_sync.reserved


def test_qlora_under_fsdp_stores_the_4bit_weights_so_that_fsdp_shards_them(tmp_path):
    """accelerate leaves uint8 4-bit weights out of FSDP2's sharding (every GPU would hold the whole base); stored in
    the compute dtype they are sharded, as the estimate counts them: memplan train and the TRL file store them so,
    and a TRL file under FSDP without it says the estimate does not count what it does."""
    import torch
    import yaml

    from memplan.runtime.hf import quantization_config

    qlora_ddp = _plan("qlora-bf16-ddp", tmp_path)
    qlora_fsdp = build_plan(merge(qlora_ddp.model_dump(mode="json"), {"sharding": "fsdp", "zero": 3}))
    assert quantization_config(qlora_fsdp, torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    on_cpu = build_plan(merge(qlora_fsdp.model_dump(mode="json"), {"device": "cpu", "optimizer": "adamw"}))
    for plan in (qlora_ddp, on_cpu):
        assert quantization_config(plan, torch.bfloat16).bnb_4bit_quant_storage == torch.uint8

    key = "bnb_4bit_quant_storage"
    e = _emit(qlora_fsdp, "trl")
    data = yaml.safe_load(e.files[e.config])
    assert data[key] == "bfloat16"
    source = read_config(_write(e, tmp_path))
    assert key in source.counted and key not in [n["key"] for n in source.not_modelled]
    del data[key]
    path = tmp_path / "uint8.yaml"
    path.write_text(yaml.safe_dump(data))
    assert key in [n["key"] for n in read_config(path).not_modelled]
    e = _emit(qlora_ddp, "trl")
    assert key not in yaml.safe_load(e.files[e.config])
