"""memplan.runtime: the one model constructor behind `memplan profile` and `memplan train`."""

from __future__ import annotations

import itertools

import pytest

from memplan.plan import Plan

pytest.importorskip("torch")

CASES = [(method, precision, ckpt)
         for method, precision, ckpt in itertools.product(("full", "lora", "qlora"), ("amp-bf16", "bf16", "fp32"),
                                                          (True, False))
         if not (method == "qlora" and precision == "fp32")]  # not a QLoRA regime (plan_problems)


def anatomy(model, hf_model) -> dict:
    """What the plan decides about a built model: its module tree (types by name), each parameter's dtype
    and requires_grad, checkpointing per module, whether bitsandbytes may repack a 4-bit layer for its CPU
    kernel (memplan.runtime.hf.keep_4bit_layers_differentiable), the attention implementation and the KV cache."""
    return {
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "parameters": [(name, str(p.dtype), p.requires_grad) for name, p in model.named_parameters()],
        "checkpointing": [(name, m.gradient_checkpointing) for name, m in model.named_modules()
                          if hasattr(m, "gradient_checkpointing")],
        "repacks_4bit": [(name, m.support_avx512bf16_for_cpu) for name, m in model.named_modules()
                         if hasattr(m, "support_avx512bf16_for_cpu")],
        "attention": hf_model.config._attn_implementation,
        "use_cache": hf_model.config.use_cache,
        "training": model.training,
    }


@pytest.mark.parametrize(("method", "precision", "ckpt"), CASES)
def test_profile_and_train_build_the_same_model(method, precision, ckpt):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from memplan.catalog.resolve import config_file
    from memplan.runtime.model import build_model, load_model, model_dir

    plan = Plan(model="demo-tiny", method=method, precision=precision, grad_ckpt=ckpt,
                lora={"rank": 4, "targets": "q_proj,v_proj"})
    # `memplan profile`: the plan's model from the preset's config.json, random weights (memplan.profile.run)
    profiled = build_model(plan, config=str(config_file("demo-tiny")[0]), device="cpu")
    # `memplan train`: the same plan loaded from the preset's weights (memplan.train.loop)
    trained = load_model(plan, model_dir("demo-tiny"), "cpu")
    hf_trained = trained.get_base_model() if method != "full" else trained
    profile_side, train_side = anatomy(profiled.model, profiled.hf_model), anatomy(trained, hf_trained)
    assert profile_side == train_side
    dtypes = {dtype for _, dtype, _ in profile_side["parameters"]}
    trains = {name for name, _, grad in profile_side["parameters"] if grad}
    if method == "full":
        assert dtypes == {"torch.bfloat16" if precision == "bf16" else "torch.float32"}
        assert len(trains) == len(profile_side["parameters"])
    else:
        assert trains and all("lora_" in name for name in trains)
    assert bool(profile_side["checkpointing"]) and all(on == ckpt for _, on in profile_side["checkpointing"])


def test_every_process_of_a_group_builds_a_quantized_model_from_a_config(monkeypatch):
    """QLoRA from a config quantizes a random model saved and loaded back, in each process: a rank other than the
    first writes its copy too (save_pretrained writes on rank 0 only once a process group is up)."""
    pytest.importorskip("bitsandbytes")
    import torch.distributed as dist

    from memplan.catalog.resolve import config_file
    from memplan.runtime.model import build_model, quant_state_tensors

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    plan = Plan(model="demo-tiny", method="qlora", precision="bf16", gpus=2, sharding="ddp",
                lora={"rank": 4, "targets": "q_proj,v_proj"})
    built = build_model(plan, config=str(config_file("demo-tiny")[0]), device="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in built.model.modules())
    assert quant_state_tensors(built.model)


@pytest.mark.parametrize("fields, on_host", [
    (dict(sharding="fsdp", zero=3, gpus=2, method="lora"), True),
    (dict(sharding="fsdp", zero=2, gpus=2, method="full"), True),
    (dict(sharding="ddp", gpus=2, method="full"), False),
    (dict(sharding="deepspeed", zero=3, gpus=2, method="full", precision="bf16-master"), False),
])
def test_under_fsdp_on_gpus_train_leaves_the_loaded_model_on_the_host(fields, on_host):
    """accelerate's sharded load copies rank 0's host tensors to the GPUs one at a time; a model already on the
    GPU would be whole on every GPU first. Elsewhere the model goes to the process's device as it loads."""
    from memplan.runtime.model import load_model, loads_on_host, model_dir

    plan = Plan(**{"model": "demo-tiny", "device": "cuda", "precision": "bf16", **fields})
    assert loads_on_host(plan) is on_host
    if on_host:  # (no GPU here: the device is only named, as the attention's)
        model = load_model(plan, model_dir("demo-tiny"), "cuda:0")
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not loads_on_host(plan.model_copy(update={"method": "qlora"}))


def test_the_trains_cpu_peak_follows_storages_freed_by_hand():
    """`memplan train` counts with profile's meter: a storage resized to 0 (how FSDP frees an unsharded
    parameter) stops counting, so a later allocation of the same size does not raise the peak."""
    import torch

    from memplan.runtime.meter import LiveBytes, PeakMemory

    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters: 440 B
    meter = PeakMemory(torch.device("cpu"), steps=1)
    meter.start(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(meter.mode, LiveBytes)
    gathered = torch.ones(1000)  # 4000 B
    gathered.untyped_storage().resize_(0)
    again = torch.ones(1000)
    meter.step_done(rows_len=1)
    assert meter.peak_bytes == 440 + 4000 and meter.mode is None
    del gathered, again


def test_live_bytes_leaves_host_memory_out():
    """A CPU run standing in for a GPU run (DeepSpeed's ZeRO-Offload): storages created inside `host()` and those
    `exclude`d once made (pinned buffers) are never counted, not even when a later op returns them; the others are.
    A meter for one device type counts only tensors on it."""
    import torch

    from memplan.runtime.meter import LiveBytes

    meter = LiveBytes()
    with meter:
        meter.new_step()
        meter.phase("optimizer")
        device = torch.ones(1000)  # 4000 B
        with meter.host():
            state = torch.zeros(2000)  # 8000 B, the CPU step's
        pinned = torch.zeros(500)  # 2000 B, counted until pinned
        meter.exclude([pinned])
        state.add_(1)
        pinned.mul_(2)
        meter.classify([state], "optimizer_states")
        assert meter.live == 4000 and meter.peak == 6000
        del device, state, pinned
        assert meter.live == 0
    cuda_only = LiveBytes(device_type="cuda")
    with cuda_only:
        host = torch.ones(1000)
        assert cuda_only.live == 0
    del host


class _Classifier:
    """Stands in for profile's meter: records which tensors it was told are which term."""

    def __init__(self):
        self.terms: dict[str, int] = {}

    def classify(self, tensors, term):
        self.terms[term] = self.terms.get(term, 0) + len(list(tensors))


@pytest.mark.parametrize("precision", ["bf16", "bf16-master"])
def test_profile_and_train_build_the_same_optimizer(precision):
    """Weight decay splits the parameters into decayed matrices and undecayed vectors (as HF Trainer does),
    and bf16-master steps fp32 masters: the optimizer `memplan profile` measures is the one train steps."""
    from memplan.runtime.model import load_model, model_dir
    from memplan.runtime.optim import MasterWeightsOptimizer, make_optimizer, optimizer_factory
    from memplan.train.loop import plan_optimizer

    plan = Plan(model="demo-tiny", precision=precision, hparams={"weight_decay": 0.1})
    model = load_model(plan, model_dir("demo-tiny"), "cpu")
    trainable = [p for p in model.parameters() if p.requires_grad]
    meter = _Classifier()
    profiled = make_optimizer(plan, optimizer_factory(plan), trainable, meter)
    trained = plan_optimizer(plan, model)

    def shape(opt):
        return [(g["weight_decay"], [tuple(p.shape) for p in g["params"]], {str(p.dtype) for p in g["params"]})
                for g in opt.param_groups]

    assert type(profiled) is type(trained) and shape(profiled) == shape(trained)
    assert [wd for wd, _, _ in shape(trained)] == [0.1, 0.0]
    assert all(len(p) == 1 for _, shapes, _ in shape(trained)[1:] for p in shapes)  # the norms' vectors
    masters = isinstance(trained, MasterWeightsOptimizer)
    assert masters == (precision == "bf16-master")
    assert ("master_weights" in meter.terms) == masters
    if masters:
        assert {str(p.dtype) for g in trained.param_groups for p in g["params"]} == {"torch.float32"}


# GPT-OSS and Gemma-2 have no SDPA path in transformers (_supports_sdpa = False): it refuses "sdpa" for them.
GPT_OSS = dict(model_type="gpt_oss", hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=1)
GEMMA2 = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=32)


@pytest.mark.parametrize("config", [GPT_OSS, GEMMA2], ids=["gpt_oss", "gemma2"])
def test_sdpa_plan_loads_the_attention_the_estimate_assumes(config, tmp_path):
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator.activations import attention_impl
    from memplan.runtime.model import build_model, load_model

    plan = Plan(precision="bf16", grad_ckpt=False, attn="sdpa", micro_batch=1, seq_len=16)
    assumed = attention_impl(spec_from_config(dict(config), config["model_type"]), plan)
    built = build_model(plan, config=dict(config), device="cpu")
    assert assumed == built.hf_model.config._attn_implementation == "eager"
    assert built.notes == [f"attention: eager, not sdpa: transformers has no SDPA path for {config['model_type']} "
                           "models (the estimate assumes eager too)"]
    eager = build_model(plan.model_copy(update={"attn": "eager"}), config=dict(config), device="cpu")
    assert eager.notes == []
    eager.hf_model.save_pretrained(tmp_path)  # `memplan train` loads a checkpoint with the same attention
    assert load_model(plan, tmp_path, "cpu").config._attn_implementation == "eager"


def test_profile_of_an_sdpa_plan_without_an_sdpa_path_says_it_runs_eager(run_cli, tmp_path):
    import json

    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT_OSS))
    code, out, err = run_cli("profile", "--model", str(path), "--batch-size", "1", "--seq-len", "32",
                             "--precision", "bf16", "--no-grad-ckpt", "--attn", "sdpa", "--backend", "trace")
    assert code in (0, 1), err
    assert "attention: eager, not sdpa" in out


QWEN_VL = dict(model_type="qwen2_5_vl", vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1,
               vision_config=dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=256))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_multimodal_config_trains_its_language_model_only(method):
    """A multimodal config builds its <Model>ForConditionalGeneration, the vision tower frozen and kept free of
    adapters (LoRA's all-linear would otherwise wrap its qkv, proj and MLP linears): what the estimate assumes."""
    from memplan.catalog.spec import spec_from_config
    from memplan.estimator import estimate
    from memplan.runtime.model import build_model

    plan = Plan(method=method, precision="bf16", micro_batch=1, seq_len=16)
    built = build_model(plan, config=dict(QWEN_VL), device="meta", on_meta=True)
    assert type(built.hf_model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    named = dict(built.model.named_parameters())
    vision = {n: p for n, p in named.items() if ".visual." in n}
    assert vision and not any(p.requires_grad for p in vision.values())
    assert not any("lora_" in n for n in vision)
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    assert trainable == estimate(spec_from_config(dict(QWEN_VL), "q"), plan).params_trainable


def test_a_micro_batch_without_its_gradient_reduction_asks_each_wrapper_its_own_way():
    """memplan profile and memplan train skip a micro-batch's reduction the same way: FSDP2 through
    set_requires_gradient_sync (turned back on after, also when the backward raises), DDP through no_sync."""
    import contextlib

    from memplan.runtime.model import gradient_sync

    calls = []

    class FullyShardLike:
        def set_requires_gradient_sync(self, value):
            calls.append(("sync", value))

    class DDPLike:
        @contextlib.contextmanager
        def no_sync(self):
            calls.append("no_sync in")
            yield
            calls.append("no_sync out")

    with gradient_sync(FullyShardLike(), sync=True):
        pass
    assert calls == []
    with pytest.raises(RuntimeError), gradient_sync(FullyShardLike(), sync=False):
        raise RuntimeError("backward failed")
    assert calls == [("sync", False), ("sync", True)]
    calls.clear()
    with gradient_sync(DDPLike(), sync=False):
        calls.append("backward")
    assert calls == ["no_sync in", "backward", "no_sync out"]


FSDP_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128},
    "llama-tied": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                   "max_position_embeddings": 128, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 128},
}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("name", sorted(FSDP_CONFIGS))
def test_fsdp_units_are_what_the_estimate_counts(name, method):
    """accelerate's carve-out (memplan.runtime.fsdp.units, which profile and train shard by) against the estimate's
    units (memplan.estimator.states.fsdp_units): each unit's parameter count, the root holding the rest. A peft
    model answers `model` with its inner model, so under LoRA a Llama's tail is lm_head alone (tied: the
    embeddings), where GPT-2's (`transformer`) keeps its final norm."""
    import math

    from memplan.catalog.spec import spec_from_config
    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import fsdp_units
    from memplan.runtime.fsdp import units
    from memplan.runtime.model import build_model

    config = FSDP_CONFIGS[name]
    plan = Plan(model=name, method=method, precision="bf16", device="cpu")
    built = build_model(plan, config=dict(config), device="meta", on_meta=True)
    layers, embed, tail = units(built.model)

    def count(modules) -> int:  # each tensor once: a tied lm_head is the embeddings
        return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())

    spec = spec_from_config(config, name)
    expected = fsdp_units(spec, lora_targets(spec, plan), plan.lora.rank if method != "full" else 0,
                          peft=method != "full")

    def listed(params) -> int:
        return sum(math.prod(shape) for shape, _ in params)

    assert [count([layer]) for layer in layers] == [listed(p) for p in expected.layers]
    assert count(embed) == listed(expected.embed)
    assert count(tail) == listed(expected.tail)
    assert sum(p.numel() for p in built.model.parameters()) - count(layers + embed + tail) == listed(expected.root)
    assert expected.tail_norm == (method == "full" or name == "gpt2")
