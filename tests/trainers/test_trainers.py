"""memplan.trainers: the example configs the trainers publish (tests/trainers/configs, verbatim, sources in each
SOURCE.md) read as plans, field by field, with what changes memory but is not modelled; and `estimate --config` /
`recommend --config` on them end to end. No torch, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.errors import UserError
from memplan.estimator import estimate
from memplan.plan import build_plan, merge
from memplan.trainers import read_config, recommend_inputs

from support import REPO, run_torch_free

CONFIGS = Path(__file__).parent / "configs"

# Each file's plan fields, exactly, and the keys listed as "not modelled (changes memory)".
EXPECTED = {
    'axolotl/examples/alst/llama3-8b-deepspeed-alst.yaml': (
        'axolotl',
        {'model': 'meta-llama/Llama-3.1-8B',
         'method': 'full',
         'seq_len': 500000,
         'data': {'packing': True},
         'micro_batch': 1,
         'grad_accum': 1,
         'hparams': {'epochs': 1.0, 'weight_decay': 0.0, 'lr': 2e-05, 'lr_scheduler': 'cosine', 'warmup_steps': 100},
         'optimizer': 'adamw-8bit',
         'attn': 'flash',
         'grad_ckpt': True,
         'sharding': 'deepspeed',
         'zero': 3,
         'offload': 'optimizer+params',
         'precision': 'bf16-master',
         'gpus': 1,
         # a sub-group per parameter, no prefetch, each parameter released after its use (DeepSpeed's aliases)
         'deepspeed': {'sub_group_size': 0, 'stage3_max_live_parameters': 0, 'stage3_max_reuse_distance': 0}},
        ['optimizer',
         'deepspeed (zero3_bf16_cpuoffload_all.json): zero_optimization.gather_16bit_weights_on_model_save',
         'plugins',
         'activation_offloading',
         'context_parallel_size',
         'tiled_mlp'],
    ),
    'axolotl/examples/llama-3/fft-8b-liger-fsdp.yaml': (
        'axolotl',
        {'model': 'NousResearch/Meta-Llama-3.1-8B',
         'method': 'full',
         'seq_len': 4096,
         'data': {'packing': True},
         'micro_batch': 2,
         'grad_accum': 4,
         'hparams': {'epochs': 1.0, 'weight_decay': 0.0, 'lr': 2e-05, 'lr_scheduler': 'cosine', 'warmup_ratio': 0.1},
         'optimizer': 'adamw-fused',
         'attn': 'flash',
         'grad_ckpt': True,
         'sharding': 'fsdp',
         'zero': 3,
         'offload': 'optimizer+params',
         'precision': 'bf16',
         'liger': ['rope', 'rms_norm', 'swiglu', 'fused_linear_cross_entropy'],
         'gpus': 1,
         'sync_each_batch': False},
        ['fsdp_config.limit_all_gathers',
         'fsdp_config.cpu_ram_efficient_loading',
         'fsdp_config.backward_prefetch'],
    ),
    'axolotl/examples/llama-3/lora-1b.yml': (
        'axolotl',
        {'model': 'NousResearch/Llama-3.2-1B',
         'method': 'lora',
         'lora': {'rank': 16,
                  'alpha': 32.0,
                  'dropout': 0.05,
                  'targets': ['gate_proj', 'down_proj', 'up_proj', 'q_proj', 'v_proj', 'k_proj', 'o_proj']},
         'seq_len': 2048,
         'data': {'packing': True},
         'micro_batch': 2,
         'grad_accum': 2,
         'hparams': {'epochs': 1.0, 'weight_decay': 0.0, 'lr': 0.0002, 'lr_scheduler': 'cosine', 'warmup_ratio': 0.1},
         'optimizer': 'adamw-8bit',
         'attn': 'flash',
         'grad_ckpt': True,
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        [],
    ),
    'axolotl/examples/llama-3/lora-8b.yml': (
        'axolotl',
        {'model': 'NousResearch/Meta-Llama-3-8B',
         'method': 'lora-8bit',
         'lora': {'rank': 32, 'alpha': 16.0, 'dropout': 0.05, 'targets': 'all-linear'},
         'seq_len': 4096,
         'data': {'packing': True},
         'micro_batch': 2,
         'grad_accum': 4,
         'hparams': {'epochs': 4.0, 'weight_decay': 0.0, 'lr': 0.0002, 'lr_scheduler': 'cosine', 'warmup_ratio': 0.1},
         'optimizer': 'adamw-8bit',
         'attn': 'flash',
         'grad_ckpt': True,
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        ['lora_modules_to_save'],
    ),
    'axolotl/examples/llama-3/qlora-1b.yml': (
        'axolotl',
        {'model': 'NousResearch/Llama-3.2-1B',
         'method': 'qlora',
         'lora': {'rank': 32,
                  'alpha': 16.0,
                  'dropout': 0.05,
                  'targets': ['gate_proj', 'down_proj', 'up_proj', 'q_proj', 'v_proj', 'k_proj', 'o_proj']},
         'seq_len': 2048,
         'data': {'packing': True},
         'micro_batch': 2,
         'grad_accum': 4,
         'hparams': {'epochs': 1.0, 'weight_decay': 0.0, 'lr': 0.0002, 'lr_scheduler': 'cosine', 'warmup_ratio': 0.1},
         'optimizer': 'adamw-8bit',
         'attn': 'flash',
         'grad_ckpt': True,
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        [],
    ),
    'llamafactory/examples/train_full/qwen3_full_sft.yaml': (
        'llama-factory',
        {'model': 'Qwen/Qwen3-4B-Instruct-2507',
         'method': 'full',
         'micro_batch': 1,
         'grad_accum': 2,
         'hparams': {'lr': 1e-05,
                     'epochs': 3.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.1,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'ckpt_reentrant': True,
         'seq_len': 2048,
         'attn': 'sdpa',
         'sharding': 'deepspeed',
         'zero': 3,
         'offload': 'none',
         'precision': 'bf16-master',
         'gpus': 1},
        ['deepspeed (ds_z3_config.json): zero_optimization.stage3_gather_16bit_weights_on_model_save'],
    ),
    'llamafactory/examples/train_lora/qwen3_lora_sft.yaml': (
        'llama-factory',
        {'model': 'Qwen/Qwen3-4B-Instruct-2507',
         'method': 'lora',
         'lora': {'rank': 8, 'alpha': 16.0, 'dropout': 0.0, 'targets': 'all-linear'},
         'micro_batch': 1,
         'grad_accum': 8,
         'hparams': {'lr': 0.0001,
                     'epochs': 3.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.1,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'ckpt_reentrant': True,
         'seq_len': 2048,
         'attn': 'sdpa',
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        [],
    ),
    'llamafactory/examples/train_lora/qwen3_lora_sft_ds3.yaml': (
        'llama-factory',
        {'model': 'Qwen/Qwen3-4B-Instruct-2507',
         'method': 'lora',
         'lora': {'rank': 8, 'alpha': 16.0, 'dropout': 0.0, 'targets': 'all-linear'},
         'micro_batch': 1,
         'grad_accum': 2,
         'hparams': {'lr': 0.0001,
                     'epochs': 3.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.1,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'ckpt_reentrant': True,
         'seq_len': 2048,
         'attn': 'sdpa',
         'sharding': 'deepspeed',
         'zero': 3,
         'offload': 'none',
         'precision': 'bf16-master',
         'gpus': 1},
        ['deepspeed (ds_z3_config.json): zero_optimization.stage3_gather_16bit_weights_on_model_save'],
    ),
    'llamafactory/examples/train_qlora/qwen3_lora_sft_otfq.yaml': (
        'llama-factory',
        {'model': 'Qwen/Qwen3-4B-Instruct-2507',
         'method': 'qlora',
         'lora': {'rank': 8, 'alpha': 16.0, 'dropout': 0.0, 'targets': 'all-linear'},
         'micro_batch': 1,
         'grad_accum': 8,
         'hparams': {'lr': 0.0001,
                     'epochs': 3.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.1,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'ckpt_reentrant': True,
         'seq_len': 2048,
         'attn': 'sdpa',
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        [],
    ),
    'torchtune/recipes/configs/llama3_1/70B_lora.yaml': (
        'torchtune',
        {'model': 'llama-3.1-70b',
         'method': 'lora',
         'lora': {'rank': 16,
                  'alpha': 32.0,
                  'dropout': 0.0,
                  'targets': ['q_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj']},
         'sharding': 'fsdp',
         'zero': 3,
         'offload': 'none',
         'gpus': 8,
         'micro_batch': 2,
         'grad_accum': 1,
         'hparams': {'epochs': 1.0, 'lr': 0.0003, 'weight_decay': 0.01, 'warmup_steps': 100, 'lr_scheduler': 'cosine'},
         'optimizer': 'adamw-fused',
         'loss': 'chunked',
         'precision': 'bf16',
         'device': 'cuda',
         'grad_ckpt': True,
         'seq_len': 2048,
         'attn': 'sdpa'},
        [],
    ),
    'torchtune/recipes/configs/llama3_1/8B_full.yaml': (
        'torchtune',
        {'model': 'llama-3.1-8b',
         'method': 'full',
         'sharding': 'fsdp',
         'zero': 3,
         'offload': 'none',
         'gpus': 4,
         'micro_batch': 2,
         'grad_accum': 1,
         'hparams': {'epochs': 1.0, 'lr': 2e-05},
         'optimizer': 'adamw-fused',
         'loss': 'chunked',
         'precision': 'bf16',
         'device': 'cuda',
         'grad_ckpt': True,
         'seq_len': 2048,
         'attn': 'sdpa'},
        ['custom_sharded_layers'],
    ),
    'torchtune/recipes/configs/llama3_1/8B_full_single_device.yaml': (
        'torchtune',
        {'model': 'llama-3.1-8b',
         'method': 'full',
         'sharding': 'ddp',
         'gpus': 1,
         'micro_batch': 2,
         'grad_accum': 1,
         'hparams': {'epochs': 1.0, 'lr': 2e-05},
         'optimizer': 'paged-adamw-8bit',
         'loss': 'chunked',
         'precision': 'bf16',
         'device': 'cuda',
         'grad_ckpt': True,
         'seq_len': 2048,
         'attn': 'sdpa'},
        ['optimizer_in_bwd'],
    ),
    'torchtune/recipes/configs/llama3_1/8B_lora_single_device.yaml': (
        'torchtune',
        {'model': 'llama-3.1-8b',
         'method': 'lora',
         'lora': {'rank': 8,
                  'alpha': 16.0,
                  'dropout': 0.0,
                  'targets': ['q_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj']},
         'sharding': 'ddp',
         'gpus': 1,
         'micro_batch': 2,
         'grad_accum': 8,
         'hparams': {'epochs': 1.0, 'lr': 0.0003, 'weight_decay': 0.01, 'warmup_steps': 100, 'lr_scheduler': 'cosine'},
         'optimizer': 'adamw-fused',
         'loss': 'chunked',
         'precision': 'bf16',
         'device': 'cuda',
         'grad_ckpt': True,
         'seq_len': 2048,
         'attn': 'sdpa'},
        [],
    ),
    'torchtune/recipes/configs/llama3_1/8B_qlora_single_device.yaml': (
        'torchtune',
        {'model': 'llama-3.1-8b',
         'method': 'qlora',
         'lora': {'rank': 8,
                  'alpha': 16.0,
                  'dropout': 0.0,
                  'targets': ['q_proj', 'v_proj', 'o_proj', 'gate_proj', 'down_proj', 'up_proj']},
         'sharding': 'ddp',
         'gpus': 1,
         'micro_batch': 2,
         'grad_accum': 8,
         'hparams': {'epochs': 1.0, 'lr': 0.0003, 'weight_decay': 0.01, 'warmup_steps': 100, 'lr_scheduler': 'cosine'},
         'optimizer': 'adamw-fused',
         'loss': 'chunked',
         'precision': 'bf16',
         'device': 'cuda',
         'grad_ckpt': True,
         'seq_len': 2048,
         'attn': 'sdpa'},
        [],
    ),
    'trl/alignment-handbook/recipes/smollm3/sft/sft.yaml': (
        'trl',
        {'model': 'HuggingFaceTB/SmolLM3-3B-checkpoints',
         'method': 'full',
         'seq_len': 65536,
         'data': {'packing': True, 'padding_free': True},
         'loss': 'standard',
         'micro_batch': 1,
         'grad_accum': 2,
         'hparams': {'lr': 2e-05,
                     'epochs': 5.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.03,
                     'weight_decay': 0.0,
                     'max_grad_norm': 0.2,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'ckpt_reentrant': True,
         'attn': 'flash',
         'sharding': 'ddp',
         'precision': 'bf16',
         'liger': ['rope', 'rms_norm', 'swiglu', 'fused_linear_cross_entropy'],
         'gpus': 1},
        [],
    ),
    'trl/alignment-handbook/recipes/zephyr-7b-beta/sft/config_full.yaml': (
        'trl',
        {'model': 'mistralai/Mistral-7B-v0.1',
         'method': 'full',
         'seq_len': 2048,
         'loss': 'chunked',
         'micro_batch': 16,
         'grad_accum': 1,
         'hparams': {'lr': 2e-05,
                     'epochs': 1.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.1,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'attn': 'flash',
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        ['per_device_eval_batch_size'],
    ),
    'trl/alignment-handbook/recipes/zephyr-7b-beta/sft/config_qlora.yaml': (
        'trl',
        {'model': 'mistralai/Mistral-7B-v0.1',
         'method': 'qlora',
         'lora': {'rank': 16,
                  'alpha': 16.0,
                  'dropout': 0.05,
                  'targets': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']},
         'seq_len': 2048,
         'loss': 'chunked',
         'micro_batch': 4,
         'grad_accum': 2,
         'hparams': {'lr': 0.0002,
                     'epochs': 1.0,
                     'lr_scheduler': 'cosine',
                     'warmup_ratio': 0.1,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'attn': 'flash',
         'sharding': 'ddp',
         'precision': 'bf16',
         'gpus': 1},
        ['per_device_eval_batch_size'],
    ),
    'trl/examples/cli_configs/example_config.yaml': (
        'trl',
        {'model': 'Qwen/Qwen2.5-0.5B',
         'method': 'full',
         'seq_len': 1024,
         'loss': 'chunked',
         'micro_batch': 8,
         'grad_accum': 1,
         'hparams': {'lr': 0.0001,
                     'epochs': 3.0,
                     'lr_scheduler': 'cosine',
                     'warmup_steps': 0,
                     'weight_decay': 0.0,
                     'max_grad_norm': 1.0,
                     'seed': 42},
         'optimizer': 'adamw-fused',
         'grad_ckpt': True,
         'attn': 'sdpa',
         'sharding': 'ddp',
         'precision': 'amp-bf16',
         'gpus': 1},
        [],
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_example_maps_to_these_plan_fields(name):
    fmt, plan, not_modelled = EXPECTED[name]
    source = read_config(CONFIGS / name)
    assert source.format == fmt
    assert source.plan == plan
    assert [n["key"] for n in source.not_modelled] == not_modelled
    assert source.unknown == []  # every key of these files is accounted for
    # every plan field the reader set says where it came from, once
    flat = {f"{k}.{s}" if isinstance(v, dict) else k for k, v in plan.items() for s in (v if isinstance(v, dict) else [0])}
    assert flat == set(source.taken) | set(source.assumed)
    assert not set(source.taken) & set(source.assumed)


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if "alst" not in n))
def test_each_example_is_a_valid_plan(name):
    build_plan(merge(read_config(CONFIGS / name).plan, {}), source=name)


def test_deepspeed_offload_with_an_8bit_optimizer_is_refused_as_for_any_plan():
    source = read_config(CONFIGS / "axolotl/examples/alst/llama3-8b-deepspeed-alst.yaml")
    with pytest.raises(UserError, match="DeepSpeed's CPU offload runs its own CPU Adam"):
        build_plan(merge(source.plan, {}), source="alst")


def test_precision_follows_the_weights_dtype_and_autocast(tmp_path):
    # TRL loads float32 weights by default: bf16=True autocasts them (amp-bf16); dtype bfloat16 trains bf16 as is
    cases = {"": "amp-bf16", "bf16: false\n": "fp32", "bf16: false\nfp16: true\n": "amp-fp16",
             "dtype: bfloat16\n": "bf16", "torch_dtype: bfloat16\nbf16: false\n": "bf16"}
    for extra, precision in cases.items():
        path = tmp_path / "sft.yaml"
        path.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\n" + extra)
        assert read_config(path).plan["precision"] == precision, extra
    path.write_text("model_name_or_path: m\nuse_peft: true\nload_in_4bit: true\n")
    source = read_config(path)
    assert source.plan["method"] == "qlora" and source.plan["precision"] == "amp-bf16"
    assert source.not_modelled == []  # amp-bf16 QLoRA: the unquantized modules in float32, as memplan counts them


def test_deepspeed_auto_is_filled_from_the_trainer_and_a_mismatch_is_refused(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"},
          "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\nper_device_train_batch_size: 2\nbf16: false\n"
                   "deepspeed: ds.json\n")
    source = read_config(cfg)
    assert (source.plan["zero"], source.plan["offload"], source.plan["precision"]) == (2, "optimizer", "fp32")
    assert source.plan["micro_batch"] == 2 and source.files == [str(tmp_path / "ds.json")]
    ds["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu = 4 but the trainer's "
                                        "per_device_train_batch_size is 2"):
        read_config(cfg)
    cfg.write_text("model_name_or_path: x/y\ndeepspeed: missing/ds.json\n")
    with pytest.raises(UserError, match="deepspeed: cannot find missing/ds.json"):
        read_config(cfg)


def test_unrecognised_file_is_one_line_naming_the_formats(tmp_path, run_cli):
    cfg = tmp_path / "other.yaml"
    cfg.write_text("foo: 1\nbar: 2\n")
    code, _, err = run_cli("estimate", "--config", str(cfg))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not a config memplan reads; it reads memplan plan, TRL / transformers TrainingArguments, axolotl, " \
           "LLaMA-Factory, torchtune, accelerate launch configs" in err
    # a plan file with a typo still gets the plan's own error
    cfg.write_text("model: gpt2\nmicro_bach: 2\n")
    code, _, err = run_cli("estimate", "--config", str(cfg))
    assert code == 2 and "unknown key 'micro_bach'; did you mean 'micro_batch'?" in err
    # a TrainingArguments value that is not a number
    for key, value, kind in (("gradient_accumulation_steps", "lots", "a whole number"),
                             ("learning_rate", "fast", "a number")):
        cfg.write_text(f"model_name_or_path: gpt2\nper_device_train_batch_size: 2\n{key}: {value}\n")
        code, _, err = run_cli("estimate", "--config", str(cfg))
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"{cfg}: {key} is {value}, not {kind}" in err


def test_estimate_prints_where_each_field_came_from(run_cli):
    path = CONFIGS / "trl/alignment-handbook/recipes/zephyr-7b-beta/sft/config_qlora.yaml"
    code, out, _ = run_cli("estimate", "--config", str(path), "--gpu", "a100-80gb")
    assert code == 0
    head, estimate = out.split("\n\n", 1)
    assert head.startswith(f"Read {path} as a TRL / transformers TrainingArguments config:")
    assert "method=qlora <- use_peft + load_in_4bit" in head and "micro_batch=4 <- per_device_train_batch_size" in head
    assert "loss=chunked: loss_type not set; TRL's SFTConfig default" in head
    assert "not modelled (changes memory, not in this estimate):\n    per_device_eval_batch_size: 8:" in head
    assert estimate.startswith("mistral-7b: ") and "QLoRA r16" in estimate
    code, out, _ = run_cli("estimate", "--config", str(path), "--gpu", "a100-80gb", "--batch-size", "1", "--json")
    r = json.loads(out)
    assert r["results"][0]["plan"]["micro_batch"] == 1  # flags override the file
    src = r["config_source"]
    assert src["format"] == "trl" and src["taken"]["micro_batch"] == "per_device_train_batch_size"
    assert src["counted"] == {"gradient_checkpointing_kwargs": "{use_reentrant: false}: non-reentrant "
                                                               "checkpointing, as memplan counts"}
    assert "output_dir" in src["ignored"] and src["unknown"] == []


@pytest.mark.parametrize("name, preset", [
    ("torchtune/recipes/configs/llama3_1/8B_qlora_single_device.yaml", "llama-3.1-8b"),
    ("torchtune/recipes/configs/llama3_1/8B_full.yaml", "llama-3.1-8b"),
    ("llamafactory/examples/train_lora/qwen3_lora_sft.yaml", "Qwen/Qwen3-4B-Base"),
    ("axolotl/examples/llama-3/fft-8b-liger-fsdp.yaml", "meta-llama/Llama-3.1-8B"),
])
def test_estimate_json_of_each_trainer(tmp_path, run_cli, name, preset):
    text = (CONFIGS / name).read_text()
    for key in ("model_name_or_path: ", "base_model: "):  # a preset's Hub id: no network
        text = "\n".join(f"{key}{preset}" if line.startswith(key) else line for line in text.splitlines())
    path = tmp_path / Path(name).name
    path.write_text(text)
    code, out, err = run_cli("estimate", "--config", str(path), "--gpus", "4", "--gpu", "h100-80gb", "--json")
    assert code in (0, 1), err
    r = json.loads(out)
    assert r["config_source"]["format"] == EXPECTED[name][0]
    assert [n["key"] for n in r["config_source"]["not_modelled"]] == EXPECTED[name][2]
    assert r["results"][0]["plan"]["gpus"] == 4 and r["results"][0]["plan"]["method"] == EXPECTED[name][1]["method"]


def test_recommend_starts_from_the_config(run_cli, tmp_path):
    path = CONFIGS / "trl/alignment-handbook/recipes/zephyr-7b-beta/sft/config_qlora.yaml"
    source = read_config(path)
    assert recommend_inputs(source, None) == {
        "model": "mistralai/Mistral-7B-v0.1", "seq_len": 2048, "epochs": 1.0, "lr": 2e-4, "warmup_ratio": 0.1,
        "method": "qlora", "effective_batch": 8}
    assert recommend_inputs(source, 4)["effective_batch"] == 32  # 4 per GPU x 2 accumulated x 4 GPUs
    code, out, err = run_cli("recommend", "--config", str(path), "--gpu", "a100-80gb", "--gpus", "1",
                             "--dataset-size", "10000", "--lr", "1e-4", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["plan"]["method"] == "qlora" and r["plan"]["model"] == "mistralai/Mistral-7B-v0.1"
    assert r["plan"]["hparams"]["lr"] == 1e-4  # the flag beats the file
    assert r["plan"]["seq_len"] == 2048 and r["config_source"]["format"] == "trl"
    code, _, err = run_cli("recommend", "--gpu", "a100-80gb", "--dataset-size", "10")
    assert code == 2 and err == "memplan: error: recommend: missing option --model / -m (see `memplan recommend --help`)\n"
    bare = tmp_path / "sft.yaml"
    bare.write_text("per_device_train_batch_size: 2\n")
    code, _, err = run_cli("recommend", "--config", str(bare), "--dataset-size", "10")
    assert code == 2 and f"{bare} names no model: give --model" in err


def test_reading_configs_imports_neither_torch_nor_transformers(tmp_path):
    code = (f"from pathlib import Path\nfrom memplan.trainers import read_config\n"
            f"for p in sorted(Path({str(CONFIGS)!r}).rglob('*.y*ml')):\n    read_config(p)\nprint('ok')")
    assert run_torch_free(code, tmp_path).strip() == "ok"


def test_every_example_names_its_source_and_licence():
    for trainer in ("trl", "axolotl", "llamafactory", "torchtune"):
        text = (CONFIGS / trainer / "SOURCE.md").read_text()
        assert "commit" in text and ("Apache-2.0" in text or "BSD-3-Clause" in text)
        for name in (n for n in EXPECTED if n.startswith(trainer + "/")):
            assert Path(name).name in text, name
    assert REPO.joinpath("tests/trainers/configs").is_dir()


@pytest.mark.parametrize("text, fields", [
    # transformers' older fsdp option string, and fsdp_config's FSDP2 reshard_after_forward
    ("model_name_or_path: m\nfsdp: full_shard offload auto_wrap\n",
     {"sharding": "fsdp", "zero": 3, "offload": "optimizer+params"}),
    ("model_name_or_path: m\nfsdp: true\nfsdp_config: {reshard_after_forward: false, activation_checkpointing: true}\n"
     "gradient_checkpointing: false\n", {"sharding": "fsdp", "zero": 2, "offload": "none", "grad_ckpt": True}),
    # axolotl: batch_size without gradient_accumulation_steps is per GPU: accumulation = batch_size // micro
    ("base_model: m\nmicro_batch_size: 4\nbatch_size: 32\nlearning_rate: 1e-5\n",
     {"micro_batch": 4, "grad_accum": 8, "seq_len": 512, "precision": "fp32", "method": "full"}),
    # LLaMA-Factory: full fine-tuning upcasts to fp32 under bf16 autocast; pure_bf16 does not
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: full\nbf16: true\n", {"precision": "amp-bf16"}),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: full\npure_bf16: true\n", {"precision": "bf16"}),
    # reentrant checkpointing: transformers' gradient_checkpointing_kwargs (TRL, axolotl), LLaMA-Factory's
    # use_reentrant_gc (default true; it replaces TrainingArguments' kwargs); no checkpointing, nothing to recompute
    ("model_name_or_path: m\ngradient_checkpointing: true\ngradient_checkpointing_kwargs: {use_reentrant: true}\n",
     {"grad_ckpt": True, "ckpt_reentrant": True}),
    ("model_name_or_path: m\ngradient_checkpointing: false\ngradient_checkpointing_kwargs: {use_reentrant: true}\n",
     {"grad_ckpt": False, "ckpt_reentrant": None}),
    ("base_model: m\nmicro_batch_size: 1\ngradient_checkpointing: true\ngradient_checkpointing_kwargs:\n  use_reentrant: true\n",
     {"grad_ckpt": True, "ckpt_reentrant": True}),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\n", {"grad_ckpt": True, "ckpt_reentrant": True}),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\nuse_reentrant_gc: false\n"
     "gradient_checkpointing_kwargs: {use_reentrant: true}\n", {"grad_ckpt": True, "ckpt_reentrant": False}),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\ndisable_gradient_checkpointing: true\n",
     {"grad_ckpt": False, "ckpt_reentrant": None}),
    # an 8-bit (LLM.int8) base: TRL's load_in_8bit, LLaMA-Factory's quantization_bit 8 (axolotl: the lora-8b example)
    ("model_name_or_path: m\nuse_peft: true\nload_in_8bit: true\nbf16: true\n",
     {"method": "lora-8bit", "precision": "amp-bf16"}),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\nquantization_bit: 8\nbf16: true\n",
     {"method": "lora-8bit", "precision": "bf16"}),
    ("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\nquantization_bit: 4\nlora_target: q_proj,v_proj\n",
     {"method": "qlora", "lora": {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}}),
])
def test_settings_beyond_the_examples(tmp_path, text, fields):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    plan = read_config(path).plan
    assert {k: plan.get(k) for k in fields} == fields


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_configs_sizes_are_read_where_its_stage_uses_them(tmp_path, stage):
    """Sizes past 2**31 are DeepSpeed's own (ZeRO-Infinity's examples set sub_group_size 1e12); stage-3 sizes in a
    ZeRO-1/2 file change nothing and are counted as such, not carried into the plan."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": stage, "sub_group_size": 1e12, "max_live_parameters": 3e8, "reduce_bucket_size": "5e8"}}))
    text = (CONFIGS / "llamafactory/examples/train_full/qwen3_full_sft.yaml").read_text()
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("deepspeed: examples/deepspeed/ds_z3_config.json", f"deepspeed: {ds}"))
    source = read_config(path)
    where = "deepspeed (ds.json): zero_optimization."
    if stage == 3:
        assert source.plan["deepspeed"] == {"sub_group_size": 10 ** 12, "stage3_max_live_parameters": 300_000_000,
                                            "reduce_bucket_size": 500_000_000}
    else:
        assert source.plan["deepspeed"] == {"reduce_bucket_size": 500_000_000}
        assert source.counted[where + "sub_group_size"].startswith("1e+12: ZeRO-3's alone")
    plan = build_plan(merge(source.plan, {"model": "llama-2-7b"}), source=str(path))
    assert estimate(resolve_model("llama-2-7b"), plan).peak_allocated > 0


def test_llamafactory_with_its_zero2_offload_config(tmp_path):
    text = (CONFIGS / "llamafactory/examples/train_full/qwen3_full_sft.yaml").read_text()
    ds = CONFIGS / "llamafactory/examples/deepspeed/ds_z2_offload_config.json"
    path = tmp_path / "full_z2.yaml"
    path.write_text(text.replace("deepspeed: examples/deepspeed/ds_z3_config.json", f"deepspeed: {ds}"))
    source = read_config(path)
    assert {k: source.plan[k] for k in ("sharding", "zero", "offload", "precision")} == {
        "sharding": "deepspeed", "zero": 2, "offload": "optimizer", "precision": "bf16-master"}
    where = "deepspeed (ds_z2_offload_config.json): zero_optimization."
    assert [n["key"] for n in source.not_modelled] == [where + "allgather_bucket_size"]
    assert source.plan["deepspeed"] == {"reduce_bucket_size": 500_000_000}  # 5e8, not HF's auto
    assert source.taken["deepspeed.reduce_bucket_size"] == where + "reduce_bucket_size"
    build_plan(merge(source.plan, {}), source=str(path))
    # the estimate counts the file's bucket, not HF's auto of hidden_size² (on a preset: the file names a Hub id)
    plan = build_plan(merge(source.plan, {"model": "llama-2-7b"}))
    auto = build_plan(merge(source.plan, {"model": "llama-2-7b", "deepspeed.reduce_bucket_size": None}))
    spec = resolve_model(plan.model)
    assert estimate(spec, plan).breakdown["comm_buffers"] - estimate(spec, auto).breakdown["comm_buffers"] == \
        2 * 2 * (500_000_000 - spec.hidden_size ** 2)
