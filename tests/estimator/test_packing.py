"""Packed rows (data.packing: position ids restart at each example) and padding-free micro-batches
(data.padding_free: the micro-batch's sequences in one row, TRL's packing): the masks transformers builds for them,
checked against real CPU steps fed such batches; and memplan train's padding-free collate."""

from __future__ import annotations

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.estimator.activations import as_one_row, mask_bytes, packed
from memplan.plan import Plan
from memplan.profile.trace import trace_training

SMALL = dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False)


def test_padding_free_is_one_row_of_every_token():
    plan = Plan(micro_batch=4, seq_len=512, data={"padding_free": True})
    row = as_one_row(plan)
    assert (row.micro_batch, row.seq_len, packed(row)) == (1, 2048, True)
    single = Plan(micro_batch=1, seq_len=512, data={"padding_free": True})
    assert as_one_row(single) is single and not packed(single)  # one sequence: nothing to tell apart


def test_packed_rows_get_a_mask_per_row_where_sdpa_runs():
    spec = resolve_model("llama-3.1-8b")
    b, s = 4, 4096
    assert mask_bytes(spec, Plan(micro_batch=b, seq_len=s)) == 0  # is_causal: no mask
    assert mask_bytes(spec, Plan(micro_batch=b, seq_len=s, data={"packing": True})) == b * s * s
    assert mask_bytes(spec, as_one_row(Plan(micro_batch=b, seq_len=s, data={"padding_free": True}))) == (b * s) ** 2
    assert mask_bytes(spec, Plan(micro_batch=b, seq_len=s, attn="flash", data={"packing": True})) == 0  # varlen


def test_padding_free_without_flash_attention_costs_the_square_of_the_batch():
    spec = resolve_model("llama-3.1-8b")
    fields = dict(method="lora", precision="bf16", micro_batch=4, seq_len=4096, grad_ckpt=False)
    flash = estimate(spec, Plan(attn="flash", data={"padding_free": True}, **fields)).peak_allocated
    rows = estimate(spec, Plan(attn="flash", **fields)).peak_allocated
    sdpa = estimate(spec, Plan(attn="sdpa", data={"padding_free": True}, **fields)).peak_allocated
    assert flash == pytest.approx(rows, rel=0.01)  # varlen flash-attention: the tokens are what count
    assert sdpa - flash > spec.num_layers * (4 * 4096) ** 2 * 2  # every layer keeps its (b*s)^2 mask in bf16


@pytest.mark.parametrize("data", [{"packing": True}, {"padding_free": True}, {"padding_free": True, "packing": True}],
                         ids=["packed", "padding-free", "packed-padding-free"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_phase_peaks_match_real_cpu_steps_of_packed_batches(data, attn):
    plan = Plan(precision="bf16", micro_batch=2, seq_len=256, grad_ckpt=False, attn=attn, data=data)
    est = estimate(spec_from_config(dict(SMALL), "small"), plan, kernels="cpu")
    steady = trace_training(dict(SMALL), plan, backend="cpu").steady
    unpacked = estimate(spec_from_config(dict(SMALL), "small"), Plan(**{**plan.model_dump(), "data": {}}),
                        kernels="cpu")
    if attn == "sdpa":  # the packed-row masks are what is measured here
        assert est.phase_peaks["forward"] > unpacked.phase_peaks["forward"]
    for phase in ("forward", "backward", "optimizer"):
        measured = getattr(steady, phase)
        err = 100 * (est.phase_peaks[phase] - measured) / measured
        assert -0.1 <= err <= 0.1, f"{phase}: {est.phase_peaks[phase]:,} vs {measured:,} ({err:+.2f} %)"


def test_memplan_train_collates_a_padding_free_micro_batch():
    from memplan.train.data import IGNORE, Example, collate

    a = Example([5, 6, 7], [IGNORE, 6, 7], [0, 1, 2])
    b = Example([8, 9], [8, 9], [0, 1])
    batch = collate([a, b], pad_id=0, packed=False, padding_free=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]  # nothing predicts across the boundary
    assert "attention_mask" not in batch
