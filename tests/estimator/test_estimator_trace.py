"""The estimate against traced real training steps of full-width models (fake tensors: exact live bytes).

Each case runs two optimizer steps (forward, loss, backward, AdamW, zero_grad) of the transformers
model built from the preset's config and compares every phase's peak, steady state. The presets keep their
widths, vocabularies and sequence lengths, with the decoder cut to 6 layers: every layer's tensors are
the full model's, the trace's time is the layers', and the count only repeats them (6 holds one whole
period of Gemma-3's local/global pattern and of SmolLM3's NoPE layers). One case runs at full depth.
benchmarks/accuracy.py traces the whole models (benchmarks/results/accuracy-trace.md).
"""

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.plan import Plan
from memplan.profile.trace import trace_training

from support import preset_config

pytestmark = pytest.mark.slow

LAYERS = 6
FULL_DEPTH = 7  # the case traced with every layer

CASES = [
    ("qwen2.5-0.5b", dict(precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False)),  # tied embeddings
    ("qwen2.5-0.5b", dict(precision="amp-bf16", seq_len=512)),
    ("qwen2.5-0.5b", dict(precision="fp32", seq_len=512, grad_ckpt=False, attn="eager", grad_accum=2)),
    ("qwen2.5-0.5b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=512, grad_ckpt=False,
                          lora={"rank": 8, "targets": "q_proj,v_proj", "dropout": 0.0})),
    ("tinyllama-1.1b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False)),  # GQA
    ("tinyllama-1.1b", dict(method="lora", precision="amp-bf16", micro_batch=4, seq_len=512)),
    ("tinyllama-1.1b", dict(precision="bf16-master", optimizer="adamw-forloop", seq_len=256)),
    ("llama-3.2-1b", dict(precision="bf16", seq_len=1024, grad_ckpt=False, loss="chunked")),  # 128K vocabulary
    ("llama-3.2-1b", dict(method="lora", precision="bf16", seq_len=2048, loss="chunked",
                          grad_ckpt=False)),
    ("llama-3.2-1b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=1024)),
    # the 2025-26 families at full size: per-head q/k norms, local/global layers, post-norms, NoPE layers
    ("qwen3-0.6b", dict(precision="bf16", micro_batch=4, seq_len=1024, grad_ckpt=False)),
    ("gemma-3-1b", dict(precision="bf16", micro_batch=2, seq_len=1024, grad_ckpt=False)),
    ("olmo-2-7b", dict(method="lora", precision="bf16", micro_batch=4, seq_len=512, grad_ckpt=False)),
    ("smollm3-3b", dict(method="lora", precision="bf16", micro_batch=2, seq_len=2048, grad_ckpt=False)),
    # Liger's kernels (Triton launches skipped): the fused loss keeps no logits, so the layers decide the peaks
    ("qwen3-0.6b", dict(precision="amp-bf16", micro_batch=2, seq_len=1024, grad_accum=2, liger="all")),  # q/k norms
    ("llama-3.2-1b", dict(method="lora", precision="amp-bf16", micro_batch=2, seq_len=2048, liger="all")),
]


def _config(preset: str, layers: int | None) -> dict:
    """The preset's config.json, its decoder cut to `layers` (its per-layer lists with it)."""
    config = preset_config(preset)
    if layers is not None:
        config["num_hidden_layers"] = layers
        for key in ("no_rope_layers", "layer_types"):
            if key in config:
                config[key] = config[key][:layers]
        if "max_window_layers" in config:
            config["max_window_layers"] = min(config["max_window_layers"], layers)
    return config


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_phase_peaks_match_the_trace(request, case):
    preset, fields = CASES[case]
    plan = Plan(model=preset, **fields)
    if plan.liger:
        request.getfixturevalue("liger_warmed")
    config = _config(preset, None if case == FULL_DEPTH else LAYERS)
    est = estimate(spec_from_config(dict(config), preset), plan, kernels="cpu")
    trace = trace_training(config, plan, backend="trace")
    steady = trace.steady
    for phase in ("forward", "backward", "optimizer"):
        measured = getattr(steady, phase)
        err = 100 * (est.phase_peaks[phase] - measured) / measured
        assert -2.0 <= err <= 3.0, f"{phase}: estimate {est.phase_peaks[phase]:,} vs trace {measured:,} ({err:+.2f} %)"


def test_half_the_cases_are_activation_heavy():
    """The comparisons must exercise activations, not only model states: activations and logits are at least
    40 % of the peak in half the cases (by the estimate, which the test above holds to each trace)."""
    shares = {}
    for case, (preset, fields) in enumerate(CASES):
        config = _config(preset, None if case == FULL_DEPTH else LAYERS)
        est = estimate(spec_from_config(dict(config), preset), Plan(model=preset, **fields), kernels="cpu")
        at_peak = est.breakdown
        shares[case] = (at_peak["activations"] + at_peak["logits_loss"]) / est.peak_allocated
    assert sum(share >= 0.4 for share in shares.values()) >= len(CASES) / 2, shares


SMALL = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


@pytest.mark.parametrize("fields", [
    dict(precision="bf16", micro_batch=2, seq_len=128, grad_ckpt=False),
    dict(method="lora", precision="amp-bf16", micro_batch=2, seq_len=128),
    dict(method="qlora", precision="bf16", micro_batch=2, seq_len=128, grad_ckpt=False),  # bitsandbytes NF4
    # NF4 under autocast: the unquantized modules and the residual stream in fp32, Linear4bit's outputs cast back
    dict(method="qlora", precision="amp-bf16", micro_batch=2, seq_len=128, grad_ckpt=False),
    dict(precision="bf16", micro_batch=2, seq_len=128, grad_ckpt=False, optimizer="adamw-8bit"),
], ids=["full-bf16", "lora-amp", "qlora-nf4", "qlora-nf4-amp", "adamw-8bit"])
def test_phase_peaks_match_real_cpu_steps(fields):
    """Real CPU tensors (random weights): the same comparison where fake tensors cannot run the kernels."""
    plan = Plan(**fields)
    est = estimate(spec_from_config(dict(SMALL), "small"), plan, kernels="cpu")
    steady = trace_training(dict(SMALL), plan, backend="cpu").steady
    for phase in ("forward", "backward", "optimizer"):
        measured = getattr(steady, phase)
        err = 100 * (est.phase_peaks[phase] - measured) / measured
        assert -2.0 <= err <= 3.0, f"{phase}: {err:+.2f} %"


# h 256, V 2048: a vocabulary small against the layers' widths, as Llama-2-7B's (4096, 32000)
PROBE = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=2048, max_position_embeddings=2048)


def test_a_checkpointed_forward_peaks_inside_the_last_layer_where_the_loss_is_small():
    """LoRA, checkpointing and the chunked loss (two chunks of 1024 tokens): a chunk's logits weigh less than the
    MLP's (tokens, intermediate) tensors alive at once inside a layer's forward, beside every layer's kept input."""
    plan = Plan(method="lora", precision="fp32", micro_batch=2, seq_len=1024, loss="chunked")
    est = estimate(spec_from_config(dict(PROBE), "probe"), plan, kernels="cpu")
    forward = trace_training(dict(PROBE), plan, backend="trace").steady.forward
    assert est.phase_peaks["forward"] == pytest.approx(forward, rel=0.005)  # the loss's forward: -11.5 %
