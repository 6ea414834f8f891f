"""The estimator: hand-worked numbers, monotonicity, and agreement with traced and measured steps."""

import json
import math

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.estimator.activations import layer_saved
from memplan.estimator.states import nf4_bytes, optimizer_state_bytes, parameter_tensors
from memplan.plan import Plan

from support import REPO

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
TINY_PARAMS = 6400 + 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64) + 64 + 6400


def tiny():
    return spec_from_config(dict(TINY), "tiny")


def test_tiny_parameter_count_by_hand():
    assert tiny().params_total == TINY_PARAMS == 86848


@pytest.mark.parametrize("precision, bytes_per_param", [
    ("fp32", 4 + 4 + 8 + 4),  # weights, grads, m+v, foreach sqrt temporaries
    ("bf16", 2 + 2 + 4 + 2),
    ("bf16-master", 2 + 2 + (4 + 8) + (4 + 4)),  # + fp32 master, fp32 states; temps: sqrt + fp32 grads
])
def test_optimizer_phase_bytes_per_parameter(precision, bytes_per_param):
    e = estimate(tiny(), Plan(precision=precision), kernels="cpu")
    assert e.phase_peaks["optimizer"] == bytes_per_param * TINY_PARAMS


def test_layer_activations_by_hand():
    """bf16, SDPA, no checkpointing, b1 s8: what one Llama layer saves (see layers.py for each line)."""
    b, s, h, f, a, kv, d = 1, 8, 64, 128, 4, 2, 16
    tok = b * s
    norms = 2 * (4 * tok * h + 4 * tok + 2 * tok * h + 2 * tok * h)  # fp32 x, rsqrt, normalized, weight*x
    # q, k, v, out, lse; SDPA's output is laid out like q, so transpose(1, 2).contiguous() for o_proj is a view
    attn = 2 * tok * a * d + 2 * 2 * tok * kv * d + 2 * tok * a * d + 4 * b * a * s
    mlp = 4 * 2 * tok * f  # gate out, silu out, up out, product
    plan = Plan(precision="bf16", micro_batch=b, seq_len=s, grad_ckpt=False)
    assert layer_saved(tiny(), plan, "cuda", input_rg=True) == norms + attn + mlp


def test_lora_trainable_count_and_first_layer():
    spec = tiny()
    plan = Plan(method="lora", precision="bf16", lora={"rank": 4}, grad_ckpt=False, micro_batch=1, seq_len=8)
    e = estimate(spec, plan)
    per_layer = 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert e.params_trainable == 2 * per_layer
    # layer 0's input comes from the frozen embedding: it keeps strictly less
    assert layer_saved(spec, plan, "cuda", input_rg=False) < layer_saved(spec, plan, "cuda", input_rg=True)


def test_quantized_and_8bit_state_sizes():
    n = 4096 * 4096
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * 256 + 4 * 16
    assert 0.51 < nf4_bytes(n) / n < 0.52  # QLoRA paper: 4.127 bits per weight
    spec = tiny()
    t = parameter_tensors(spec, Plan(optimizer="adamw-8bit"), frozenset())
    expected = sum(2 * (k + 4 * math.ceil(k / 256)) if k >= 4096 else 8 * k for k in t.trainable)
    assert optimizer_state_bytes(t, Plan(optimizer="adamw-8bit"), 4) == expected


def _total(model, **fields):
    return estimate(resolve_model(model), Plan(**fields)).total


def test_more_gpus_less_memory_per_gpu_under_zero3():
    totals = [_total("llama-2-7b", sharding="deepspeed", zero=3, precision="bf16-master", gpus=n) for n in (1, 2, 4, 8)]
    assert totals == sorted(totals, reverse=True) and totals[0] > 2 * totals[-1]


def test_higher_zero_stage_never_costs_more():
    """With accumulation ZeRO-1 keeps every whole gradient between micro-batches and ZeRO-2 its partition; with one
    micro-batch both reduce each gradient into buckets as autograd makes it, and hold the same (measured alike:
    benchmarks/results/deepspeed-gloo-2rank.jsonl)."""
    def totals(accum):
        return [_total("llama-2-13b", sharding="deepspeed", zero=z, precision="bf16-master", gpus=8,
                       grad_accum=accum) for z in (1, 2, 3)]

    z1, z2, z3 = totals(4)
    assert z1 > z2 > z3
    z1, z2, z3 = totals(1)
    assert z1 == z2 > z3


def test_offload_moves_states_to_host():
    on = estimate(resolve_model("llama-2-7b"), Plan(sharding="deepspeed", zero=3, precision="bf16-master",
                                                    offload="optimizer", gpus=4))
    off = estimate(resolve_model("llama-2-7b"), Plan(sharding="deepspeed", zero=3, precision="bf16-master", gpus=4))
    assert on.total < off.total and on.host_offload_bytes > 0 == off.host_offload_bytes
    assert on.host.phases["train"].terms["offloaded"] == on.host_offload_bytes
    assert on.host_bytes > off.host_bytes
    assert on.breakdown["optimizer_states"] == 0


@pytest.mark.parametrize("field, small, big", [("micro_batch", 1, 4), ("seq_len", 512, 4096)])
def test_memory_grows_with_batch_and_sequence(field, small, big):
    lora = dict(method="lora", precision="bf16")
    assert _total("llama-3-8b", **lora, **{field: small}) < _total("llama-3-8b", **lora, **{field: big})


def test_checkpointing_and_chunked_loss_save_memory():
    lora = dict(method="lora", precision="bf16", seq_len=4096)
    assert _total("llama-3-8b", grad_ckpt=True, **lora) < _total("llama-3-8b", grad_ckpt=False, **lora)
    big_vocab = dict(method="lora", precision="bf16", seq_len=8192)
    assert _total("llama-3-8b", loss="chunked", **big_vocab) < _total("llama-3-8b", **big_vocab)


def test_cpu_plan_has_no_cuda_terms():
    spec = resolve_model("qwen2.5-0.5b")
    gpu = estimate(spec, Plan(method="lora", precision="bf16"))
    cpu = estimate(spec, Plan(method="lora", precision="bf16", device="cpu"))
    assert cpu.breakdown["workspace"] == 0 and gpu.breakdown["workspace"] > 0
    assert cpu.reserved == cpu.total == cpu.peak_allocated  # no caching allocator, no CUDA context
    assert gpu.total > gpu.reserved > gpu.peak_allocated
    # weights, gradients and states are the same bytes wherever they live
    for term in ("weights", "gradients", "optimizer_states"):
        assert cpu.phases["optimizer"][term] == gpu.phases["optimizer"][term]


def test_json_interface_names():
    e = estimate(resolve_model("llama-2-7b"), Plan(), gpu_memory=80 * 2**30).to_json()
    for key in ("plan", "params_trainable", "peak_allocated_bytes", "reserved_bytes", "total_bytes", "host_bytes",
                "breakdown", "phase_peaks", "disk"):
        assert key in e
    assert "fits" not in e  # bytes only: whether they fit is memplan.fit's verdict, with headroom and host RAM
    assert set(e["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert set(e["disk"]) == {"checkpoint_bytes", "artifact_bytes"}
    assert e["peak_allocated_bytes"] == max(e["phase_peaks"].values()) == sum(e["breakdown"].values())
    assert e["peak_allocated_bytes"] < e["reserved_bytes"] < e["total_bytes"]


def test_estimate_path_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys; from memplan.cli import main\n"
            "try:\n    main(['estimate', '--model', 'llama-7b', '--gpus', '4', '--json'])\n"
            "except SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------ measured on a GPU

H100_RUNS = sorted((REPO / "benchmarks" / "results").glob("gpu-h100-run*.jsonl"))


def _h100_cases():
    rows = [json.loads(line) for run in H100_RUNS for line in run.read_text().splitlines()]
    return [r for r in rows if "measured" in r]


@pytest.mark.parametrize("row", _h100_cases(), ids=lambda r: f"{r['case']}-{r['preset']}")
def test_estimate_matches_h100_measurements(row):
    """max_memory_allocated per phase, steady state, measured by benchmarks/gpu_check.py on an H100:
    the peak within -2 % .. +3 %, every phase within 3 %."""
    e = estimate(resolve_model(row["preset"]), Plan(model=row["preset"], **row["plan"]), kernels="cuda")
    steps = row["measured"]["steps"][1:]
    measured = {phase: max(s[phase] for s in steps) for phase in ("forward", "backward", "optimizer")}
    for phase, m in measured.items():
        err = 100 * (e.phase_peaks[phase] - m) / m
        assert -3.0 <= err <= 3.0, f"{phase}: {err:+.2f} %"
    peak = max(measured.values())
    assert -2.0 <= 100 * (e.peak_allocated - peak) / peak <= 3.0


PROCESS_RUNS = [json.loads(line) for name in ("fsdp-gloo-2rank", "deepspeed-gloo-2rank")
                for line in (REPO / f"benchmarks/results/{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("row", PROCESS_RUNS, ids=lambda r: "{sharding}-zero{zero}-{method}-x{gpus}{offloaded}".format(
    offloaded="-offload" if r["plan"].get("offload", "none") != "none" else "", **r["plan"]))
def test_estimate_matches_gloo_measurements(row, tmp_path):
    """FSDP2 SHARD_GRAD_OP / FULL_SHARD on 2 gloo ranks, and DeepSpeed ZeRO-1 / 2 / 3 through its engine on its CPU
    accelerator (the most loaded rank), measured by memplan profile --backend cpu, per phase."""
    from transformers import LlamaConfig

    path = tmp_path / "config.json"
    path.write_text(LlamaConfig(**row["llama_config"]).to_json_string())
    e = estimate(resolve_model(str(path)), Plan(**row["plan"]), kernels="cpu")  # ZeRO-Offload rows: CUDA plans
    for phase, measured in row["phase_peaks"].items():
        if phase not in row.get("checked", [phase]):  # a row may name the phases it checks
            continue
        err = 100 * (e.phase_peaks[phase] - measured) / measured
        assert -2 <= err <= 3, (phase, err)


def test_deepspeed_zero2_keeps_a_gradient_partition_and_steps_on_its_fp32_copy():
    """DeepSpeed's ZeRO-1/2 step (stage_1_and_2.py): the fp32 masters are a clone of the partition whatever the
    weights' dtype; the step copies the gradient partition flat, casts the copy to fp32, and frees both 16-bit
    buffers before torch's AdamW runs beside the fp32 gradient; with accumulation the partition stays between
    micro-batches (and a later one reduces into a second: the measured rows above)."""
    from memplan.plan import build_plan

    spec = resolve_model("demo-tiny")

    def zero2(**fields):
        return estimate(spec, build_plan(dict(dict(model="demo-tiny", method="full", precision="bf16-master",
                                                   device="cpu", sharding="deepspeed", zero=2, gpus=2, micro_batch=2,
                                                   seq_len=128), **fields)))

    bf16, fp32, fused, accum = zero2(), zero2(precision="fp32"), zero2(optimizer="adamw-fused"), zero2(grad_accum=2)
    part = math.ceil(bf16.params_trainable / 2)
    assert bf16.breakdown["master_weights"] == fp32.breakdown["master_weights"] == 4 * part
    opt = bf16.phases["optimizer"]
    assert opt["gradients"] == 2 * part
    # the bf16 copy and its fp32 cast beside the partition; then the fp32 gradient and _foreach_sqrt's temporary
    assert opt["gradients"] + opt["optimizer_temporaries"] == max(2 * part + 2 * part + 4 * part, 4 * part + 4 * part)
    assert fused.phases["optimizer"]["optimizer_temporaries"] == 2 * part + 4 * part  # the cast's moment
    assert fp32.phases["optimizer"]["gradients"] + fp32.phases["optimizer"]["optimizer_temporaries"] == 8 * part
    assert accum.phases["forward"]["gradients"] == 2 * part and bf16.phases["forward"]["gradients"] == 0


def test_deepspeed_zero3_steps_the_fp32_gradients_one_sub_group_at_a_time():
    """ZeRO-3 holds one sub-group's fp32 gradients at a time (stage3.py _release_sub_group): the largest, at least
    sub_group_size (1e9) and at most one parameter's partition more, however large the rank's partition is; fused
    AdamW adds nothing beside it, foreach AdamW its temporaries over that sub-group."""
    from memplan.estimator.sharding import DEEPSPEED_SUB_GROUP_ELEMS, deepspeed_sub_groups
    from memplan.plan import build_plan

    spec = resolve_model("llama-2-7b")
    temporaries = {}
    for optimizer in ("adamw-fused", "adamw"):
        plan = build_plan(dict(model="llama-2-7b", method="full", precision="bf16-master", sharding="deepspeed",
                               zero=3, gpus=4, optimizer=optimizer))
        e = estimate(spec, plan)
        temporaries[optimizer] = e.phases["optimizer"]["optimizer_temporaries"]
    cap = 4 * max(deepspeed_sub_groups(spec, plan, 4))
    assert 4 * DEEPSPEED_SUB_GROUP_ELEMS <= cap <= 4 * (DEEPSPEED_SUB_GROUP_ELEMS + math.ceil(spec.vocab_size * spec.hidden_size / 4))
    assert 4 * math.ceil(e.params_trainable / 4) > cap  # the partition is larger than a sub-group here
    assert temporaries["adamw-fused"] == cap
    assert temporaries["adamw"] == 2 * cap  # _foreach_sqrt of the sub-group's exp_avg_sq


def test_fsdp_gathers_a_quantized_layer_at_its_packed_size():
    """FSDP gathers a QLoRA layer's NF4 storage (about 0.52 B per weight with its absmax), not compute-dtype weights:
    as the last layer gathers (its all-gather output and parameters beside the previous layer's output, and the
    root's final norm, which a peft model keeps out of the tail), its layers weigh about a quarter of LoRA's in
    bf16."""
    from memplan.estimator import sharding, states
    from memplan.estimator.activations import lora_targets, numerics
    from memplan.plan import build_plan

    spec = resolve_model("llama-2-70b")
    gathered = {}
    for method in ("lora", "qlora"):
        plan = build_plan(dict(model="llama-2-70b", method=method, precision="bf16", sharding="fsdp", zero=3, gpus=2))
        tensors = states.parameter_tensors(spec, plan, lora_targets(spec, plan))
        shard = sharding.per_gpu(spec, plan, tensors, numerics(plan, spec), weights=0, grads=0, master=0,
                                 opt_states=0, opt_temps=0)
        gathered[method] = (shard.unshard_last - 2 * spec.params_final_norm) / 3
    assert 3.5 < gathered["lora"] / gathered["qlora"] < 4.0
