"""Liger's kernels (Plan.liger): the plan field, what the estimate counts for each kernel, checked against real CPU
training steps of the Liger-patched model (its Triton launches skipped: Liger allocates in torch code around
them, so the memory is exact), and the commands' answers on models Liger is not modelled for."""

from __future__ import annotations

import json

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.errors import UserError
from memplan.estimator import estimate
from memplan.estimator.liger import chunk_rows
from memplan.plan import Plan, build_plan
from memplan.profile.trace import trace_training

SMALL = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
ALL = ["rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"]


@pytest.mark.parametrize("value, expected", [
    ("all", ALL), ("swiglu,rope", ["rope", "swiglu"]), (["fused_linear_cross_entropy", "rms_norm"],
                                                        ["rms_norm", "fused_linear_cross_entropy"]),
    ("none", []), ("", []), (None, []),
])
def test_the_kernels_are_a_list_in_liger_order(value, expected):
    assert build_plan({"liger": value}).liger == expected


@pytest.mark.parametrize("fields, needle", [
    (dict(liger="swiglu,geglu"), "unknown Liger kernel 'geglu'; did you mean 'swiglu'?"),
    (dict(liger="all", loss="chunked"), "fused linear cross-entropy is the loss"),
    (dict(liger="rope", device="cpu"), "a CPU run cannot use them"),
])
def test_bad_liger_plans_say_why(fields, needle):
    with pytest.raises(UserError) as err:
        build_plan(fields)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_model_liger_is_not_modelled_for_is_one_line(run_cli):
    code, out, err = run_cli("estimate", "--model", "gemma-2b", "--liger", "all", "--gpus", "1")
    assert code == 2
    assert "modelled for the llama, mistral, qwen2, qwen3, smollm3 model types" in err and "--liger none" in err


def test_chunks_of_the_fused_loss_follow_liger():
    # chunk_size = next_power_of_2(cdiv(BT, cdiv(V, H))): 4096 tokens, V 32000, H 4096 -> 8 -> 512 rows
    assert chunk_rows(4096, 4096, 32000) == 512
    assert chunk_rows(100, 4096, 128256) == 4  # cdiv(100, 32) = 4
    assert chunk_rows(3, 128, 1000) == 1
    assert chunk_rows(8, 128, 100) == 8  # V < H: one chunk of every row


def test_the_fused_loss_keeps_no_logits():
    spec = spec_from_config(dict(SMALL, vocab_size=32000), "small")
    plain = estimate(spec, Plan(precision="bf16", seq_len=2048, grad_ckpt=False), kernels="cuda")
    fused = estimate(spec, Plan(precision="bf16", seq_len=2048, grad_ckpt=False,
                                liger=["fused_linear_cross_entropy"]), kernels="cuda")
    # standard: bf16 logits + fp32 copy + fp32 log-softmax at the loss; fused: grad_input, grad_weight and one chunk
    assert plain.phases["forward"]["logits_loss"] >= 10 * 2048 * 32000
    assert fused.phases["forward"]["logits_loss"] < 2048 * 32000


@pytest.mark.parametrize("fields", [
    dict(precision="bf16", liger="all"),
    dict(precision="amp-bf16", liger="all", grad_accum=2),
    dict(method="lora", precision="amp-bf16", liger="all", grad_ckpt=True),
], ids=["full-bf16", "full-amp-accum", "lora-amp-ckpt"])
def test_the_fake_trace_of_a_liger_step_is_the_real_one(liger_warmed, fields):
    """The fake-tensor trace (the full-size checks in test_estimator_trace.py) answers Liger's .item() and
    torch.equal with symbols; real CPU tensors run the same step: the live bytes are the same, phase by phase."""
    plan = Plan(**{"micro_batch": 2, "seq_len": 128, "grad_ckpt": False, **fields})
    real = trace_training(dict(SMALL), plan, backend="cpu").steady
    fake = trace_training(dict(SMALL), plan, backend="trace").steady
    for phase in ("forward", "backward", "optimizer"):
        assert getattr(fake, phase) == getattr(real, phase), phase


def test_each_kernel_against_real_cpu_steps(liger_warmed):
    """Each kernel alone (the loss's peak dominates without the fused loss: what a layer keeps decides it)."""
    spec = spec_from_config(dict(SMALL), "small")
    for kernels in ("rope", "rms_norm", "swiglu", "fused_linear_cross_entropy"):
        plan = Plan(precision="bf16", micro_batch=2, seq_len=128, grad_ckpt=False, liger=kernels)
        est = estimate(spec, plan, kernels="cpu")
        steady = trace_training(dict(SMALL), plan, backend="cpu").steady
        for phase in ("forward", "backward", "optimizer"):
            measured = getattr(steady, phase)
            err = 100 * (est.phase_peaks[phase] - measured) / measured
            assert -0.1 <= err <= 1.0, f"{kernels} {phase}: {est.phase_peaks[phase]:,} vs {measured:,} ({err:+.2f} %)"


def test_a_traced_plan_with_liger_leaves_transformers_as_it_was():
    """apply_liger_kernel_to_llama replaces modeling_llama's names; the trace puts them back, so the next model
    built in the process is transformers' own."""
    from transformers.models.llama import modeling_llama

    before = (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb)
    trace_training(dict(SMALL), Plan(precision="bf16", micro_batch=1, seq_len=16, liger="all"), backend="cpu", steps=1)
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb) == before


def test_profile_measures_a_liger_plan_without_a_gpu(liger_warmed, run_cli):
    code, out, err = run_cli("profile", "--model", "demo-tiny", "--precision", "bf16", "--liger", "all",
                             "--batch-size", "2", "--seq-len", "64", "--backend", "trace", "--steps", "2", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["results"]
    assert result["plan"]["liger"] == ALL
    for phase, err_pct in result["phase_error_pct"].items():
        assert -1.0 <= err_pct <= 1.0, (phase, err_pct)
