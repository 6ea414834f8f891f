"""LoRA on an LLM.int8 base (method lora-8bit): the estimate against real CPU training steps.

bitsandbytes' int8 kernels do not run on fake tensors, so these steps run on real CPU tensors (random weights,
loaded through transformers' BitsAndBytesConfig(load_in_8bit=True)): LoRA r8 on every linear, bf16 and amp-bf16,
with and without checkpointing. Checkpointed cases keep a 32000-token vocabulary so that the loss stays the
forward peak, as in test_estimator_arch.py.
"""

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.estimator.states import int8_bytes, parameter_tensors, weight_bytes
from memplan.plan import Plan
from memplan.profile.trace import trace_training

pytest.importorskip("bitsandbytes")

LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)
QWEN3 = dict(model_type="qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=1000, tie_word_embeddings=False)
INT8 = dict(method="lora-8bit", micro_batch=2, seq_len=128, lora={"rank": 8})


@pytest.mark.parametrize("config, fields", [
    (LLAMA, dict(precision="bf16", grad_ckpt=False)),
    (LLAMA, dict(precision="amp-bf16", grad_ckpt=False)),
    (QWEN3, dict(precision="bf16", grad_ckpt=False, attn="eager")),
    # non-reentrant checkpointing cannot discard the int8 layers' inputs (a ctx attribute, not saved tensors)
    (dict(LLAMA, vocab_size=32000), dict(precision="bf16", grad_ckpt=True)),
    (dict(QWEN3, vocab_size=32000), dict(precision="bf16", grad_ckpt=True, ckpt_reentrant=True)),
], ids=["llama-bf16", "llama-amp", "qwen3-bf16-eager", "llama-bf16-ckpt", "qwen3-bf16-ckpt-reentrant"])
def test_phase_peaks_match_real_cpu_steps(config, fields):
    plan = Plan(**INT8, **fields)
    est = estimate(spec_from_config(dict(config), config["model_type"]), plan, kernels="cpu")
    trace = trace_training(dict(config), plan, backend="cpu")
    assert trace.after_load == est.phases["optimizer"]["weights"] + 128  # + rotary inv_freq buffers (2 x 16 fp32)
    for phase in ("forward", "backward", "optimizer"):
        measured = getattr(trace.steady, phase)
        err = 100 * (est.phase_peaks[phase] - measured) / measured
        assert -2.0 <= err <= 3.0, f"{phase}: estimate {est.phase_peaks[phase]:,} vs measured {measured:,} ({err:+.2f} %)"


def test_int8_weights_by_hand():
    """One int8 per quantized weight and an fp32 absmax per output row; embeddings, norms and lm_head in the load
    dtype (bf16), adapters fp32."""
    spec = spec_from_config(dict(LLAMA), "llama")
    plan = Plan(**INT8, precision="bf16")
    rows = 128 + 64 + 64 + 128 + 344 + 344 + 128
    quantized = 128 * 128 + 2 * 64 * 128 + 128 * 128 + 3 * 344 * 128
    assert int8_bytes(344, 128) == 344 * 128 + 4 * 344
    adapters = 8 * (2 * (128 + 128) + 2 * (128 + 64) + 3 * (128 + 344)) * 2  # q, o; k, v; gate, up, down
    plain = 2 * 1000 * 128 + 5 * 128
    tensors = parameter_tensors(spec, plan, frozenset(spec.linear_names()) - {"lm_head"})
    assert weight_bytes(tensors, plan, 2, 4) == 2 * (quantized + 4 * rows) + 2 * plain + 4 * adapters
