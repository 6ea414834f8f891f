"""DeepSpeed ZeRO-1/2 in the allocation stream (memplan.estimator.zero_optimizer): what it allocates against the
estimate's terms, on which stream, and the plans it leaves to the measured ratio."""

import json

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate, zero_optimizer
from memplan.estimator.stream import allocation_stream
from memplan.plan import Plan

from support import REPO

ROWS = [row for line in (REPO / "benchmarks/results/deepspeed-gloo-2rank.jsonl").read_text().splitlines()
        if (row := json.loads(line))["plan"]["zero"] in (1, 2)]  # ZeRO-3: test_zero3_optimizer.py
CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512}


def _plan(**fields) -> Plan:
    return Plan(**{"model": "llama-small", "gpus": 2, "sharding": "deepspeed", "zero": 2, "precision": "bf16-master",
                   "micro_batch": 2, "seq_len": 128, "grad_ckpt": False, **fields})


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "zero{zero}-{method}-{precision}-accum{}-x{gpus}".format(
    r["plan"].get("grad_accum", 1), **r["plan"]))
def test_the_stream_allocates_what_the_estimate_counts(row):
    """The measured DeepSpeed plans on a GPU: the replay's allocated peak against the estimate's, which the CPU runs
    check per phase."""
    spec = spec_from_config(dict(model_type="llama", **row["llama_config"]), "llama-small")
    e = estimate(spec, Plan(**dict(row["plan"], device="cuda", model="llama-small")))
    assert e.reserved_basis == "replayed"
    assert -3 <= 100 * (e.replayed.steps_allocated - e.peak_allocated) / e.peak_allocated <= 2


def _partition_buffers(events, step: int = 2) -> list[int]:
    """Per micro-batch of optimizer step `step`, the gradient partition buffers allocated (the reduction stream)."""
    starts = [i for i, ev in enumerate(events) if ev == ("s",)]
    counts: list[int] = []
    for ev in events[starts[step - 1]:]:
        if ev == ("p", "forward"):
            counts.append(0)
        elif ev[0] == "a" and len(ev) > 3 and ev[3] == zero_optimizer.REDUCTION_STREAM:
            counts[-1] += 1
    return counts


def test_later_micro_batches_reduce_into_a_second_partition_under_zero2_only():
    spec = spec_from_config(CONFIG, "llama-small")
    assert _partition_buffers(allocation_stream(spec, _plan(grad_accum=2))) == [1, 1]  # the first kept, a second
    assert _partition_buffers(allocation_stream(spec, _plan(zero=1, grad_accum=2))) == [0, 1]  # the last reduces
    assert _partition_buffers(allocation_stream(spec, _plan())) == [1]


def test_the_load_flattens_the_weights_on_the_host_as_a_gpu_without_room_does():
    """Parameters, freed and the cache emptied (DeepSpeed moves them to the host to flatten them there), the flat
    buffer, then the fp32 masters (a bf16 clone cast to fp32)."""
    spec = spec_from_config(CONFIG, "llama-small")
    events = allocation_stream(spec, _plan())
    load = events[:events.index(("s",))]
    empty = load.index(("e",))
    params = spec.params_total * 2
    made = [ev[2] for ev in load[:empty] if ev[0] == "a"]
    assert sum(made) == params and {ev[0] for ev in load[empty - len(made):empty]} == {"f"}  # each, then all freed
    partition = -(-spec.params_total // 2)
    assert [ev[2] for ev in load[empty:] if ev[0] == "a"] == [params, 2 * partition, 4 * partition]


def test_offload_keeps_a_staging_buffer_and_copies_each_gradient_to_float64_as_the_step_reduces_it():
    """ZeRO-Offload: no fp32 masters, partition buffers or step on the GPU; the bf16 clone of the partition freed once
    copied to the host, then the staging buffer of the largest parameter; a float64 copy of each gradient's part in
    the last micro-batch only (its norm), none in the step."""
    spec = spec_from_config(CONFIG, "llama-small")
    events = allocation_stream(spec, _plan(offload="optimizer", grad_accum=2))
    load = events[:events.index(("s",))]
    partition = -(-spec.params_total // 2)
    after_flat = [ev[2] for ev in load[load.index(("e",)):] if ev[0] == "a"][1:]
    assert after_flat == [2 * partition, 2 * spec.vocab_size * spec.hidden_size]
    assert _partition_buffers(events) == [0, 0]
    starts = [i for i, ev in enumerate(events) if ev == ("s",)]
    step = events[starts[1]:]
    forwards = [i for i, ev in enumerate(step) if ev == ("p", "forward")]
    optimizer = step.index(("p", "optimizer"))
    vocab = spec.vocab_size * spec.hidden_size  # lm_head's and the embedding's float64 copies

    def copies(events):
        return [ev[2] for ev in events if ev[0] == "a" and ev[2] == 8 * min(vocab, partition)]

    assert not copies(step[forwards[0]:forwards[1]])
    assert len(copies(step[forwards[1]:optimizer])) == 2
    assert not [ev for ev in step[optimizer:] if ev[0] == "a"]


@pytest.mark.parametrize("fields, why", [
    (dict(method="qlora", precision="bf16-master"), "quantized base"),
    (dict(zero=3, offload="optimizer+params"), "ZeRO-3"),
])
def test_plans_the_stream_does_not_follow_keep_the_measured_ratio(fields, why):
    e = estimate(spec_from_config(CONFIG, "llama-small"), _plan(**fields))
    assert e.replayed is None and why in e.reserved_basis


def test_one_gpu_offload_peaks_at_initialization_where_deepspeed_clones_its_partition():
    """ZeRO-Offload on one GPU: the partition's 16-bit clone is made on the GPU beside the flat weights before it moves
    to the host, two copies of the weights at once, more than any step holds; the report names that moment."""
    from memplan.catalog.resolve import resolve_model
    from memplan.report.estimate import breakdown_table

    spec = resolve_model("llama-2-7b")
    e = estimate(spec, Plan(model="llama-2-7b", sharding="deepspeed", zero=2, offload="optimizer",
                            precision="bf16-master", micro_batch=1, seq_len=512))
    assert e.setup_allocated is not None and e.setup_allocated >= 2 * 2 * spec.params_total > e.peak_allocated
    assert "DeepSpeed's initialization" in breakdown_table(e)
