"""The estimate against traced training steps: the cases of each family beyond its first
(test_estimator_arch.py, whose configs these are), with other precisions, attention kernels, masks, checkpointing
and LoRA targets, and reentrant checkpointing."""

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.plan import Plan
from memplan.profile.trace import trace_training

from test_estimator_arch import FULL_BF16, LLAMA, LORA, OVER, QWEN3, VARIANTS, assert_phase_peaks_match_the_trace, cfg


@pytest.mark.parametrize("name, config, fields", VARIANTS, ids=[c[0] for c in VARIANTS])
def test_phase_peaks_match_the_trace(name, config, fields):
    assert_phase_peaks_match_the_trace(config, fields, OVER.get(name, 3.0))


@pytest.mark.parametrize("config, fields", [
    (cfg(LLAMA, vocab_size=1000), dict(LORA, attn="sdpa")),
    (cfg(LLAMA, vocab_size=1000), dict(LORA, attn="sdpa", precision="fp32")),
    (cfg(QWEN3, vocab_size=1000), dict(FULL_BF16, attn="sdpa")),
    (cfg(QWEN3, vocab_size=1000), dict(LORA, attn="eager")),
], ids=["llama-lora-bf16-sdpa", "llama-lora-fp32-sdpa", "qwen3-full-bf16-sdpa", "qwen3-lora-bf16-eager"])
def test_reentrant_checkpointing_holds_the_recomputed_layer_output(config, fields):
    """With a small vocabulary the backward peaks inside a recomputed layer. There reentrant checkpointing keeps
    exactly one b x s x h tensor in the residual dtype more than non-reentrant: the recomputed layer output that
    CheckpointFunction.backward holds through its inner backward. The estimate moves by what the trace moves."""
    peaks = {}
    for reentrant in (False, True):
        plan = Plan(**{"micro_batch": 2, "seq_len": 512, **fields, "grad_ckpt": True, "ckpt_reentrant": reentrant})
        est = estimate(spec_from_config(dict(config), config["model_type"]), plan, kernels="cpu")
        peaks[reentrant] = est.phase_peaks["backward"], trace_training(dict(config), plan).steady.backward
    residual = 4 if fields.get("precision") == "fp32" else 2
    held = 2 * 512 * config["hidden_size"] * residual
    assert peaks[True][0] - peaks[False][0] == held
    assert peaks[True][1] - peaks[False][1] == held
