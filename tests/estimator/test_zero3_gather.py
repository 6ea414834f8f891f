"""DeepSpeed ZeRO-3's gathered parameters (memplan.estimator.zero3_gather): the replay of its parameter coordinator
against the coordinator's own count, event by event, on two gloo ranks (benchmarks/zero3_trace_check.py), and
what the rules mean at full size."""

import json
from pathlib import Path

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.estimator import zero3_gather
from memplan.plan import DeepSpeedSettings, Plan, build_plan

REPO = Path(__file__).resolve().parents[2]
ROWS = [json.loads(line) for line in (REPO / "benchmarks/results/zero3-trace.jsonl").read_text().splitlines()]


#: The coordinator's rules a stored row ran with, as the plan's DeepSpeed settings
RULES = {"live": "stage3_max_live_parameters", "reuse": "stage3_max_reuse_distance"}


def _replayed(spec, plan, wrappers=0):
    """The coordinator's replay with the plan's DeepSpeed sizes (Plan.deepspeed, else memplan's ds_config values)."""
    trace = zero3_gather.step_trace(spec, plan, wrappers=wrappers)
    reuse, live = zero3_gather.reuse_and_live(plan)
    return trace, zero3_gather.replay(trace, world=plan.world_size, itemsize=2, reuse=reuse, live=live,
                                      persistent=zero3_gather.persistence_threshold(spec, plan),
                                      bucket=zero3_gather.prefetch_bucket(spec, plan))


def _row_id(row) -> str:
    config = row["config"]
    return "{}-{method}-ckpt{grad_ckpt}".format(config.get("model_type", "llama"), **row["plan"]) + "-kv{}{}".format(
        config.get("num_key_value_heads", config.get("n_head")), "".join(f"-{k}{v}" for k, v in row["rules"].items()))


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_the_replay_counts_what_deepspeeds_coordinator_gathers_at_every_event(row, tmp_path):
    """Fetches and releases of every module with parameters of its own (peft's wrapper: lora_A's weight, which its
    forward reads), in DeepSpeed's order, and the elements gathered after each: prefetches ahead of every module
    (containers too), parameters kept for a reuse within the distance or passed by a prefetch scan, the
    recompute's frozen parameters released with the backward module that ran it."""
    from transformers import AutoConfig

    fields = dict(row["config"])
    path = tmp_path / "config.json"
    path.write_text(AutoConfig.for_model(fields.pop("model_type", "llama"), **fields).to_json_string())
    deepspeed = {RULES[rule]: value for rule, value in row["rules"].items()}
    spec, plan = resolve_model(str(path)), Plan(**row["plan"], deepspeed=deepspeed)
    trace, replay = _replayed(spec, plan, wrappers=row["wrappers"])
    replayed = [[e.kind[0], e.forward, n] for e, n in zip(trace.events, replay.available)
                if e.kind != "end" and trace.modules[e.module].params]
    assert len(replayed) == len(row["events"])
    for k, (ours, theirs) in enumerate(zip(replayed, row["events"])):
        assert ours == theirs, f"event {k}"


def test_the_default_reuse_distance_keeps_what_a_short_one_releases():
    """With DeepSpeed's 1e9 the whole small model is gathered at the loss; with a distance of a layer's parameters,
    the forward releases what it will not use again soon, and holds less throughout."""
    spec = resolve_model("demo-tiny")
    plan = build_plan(dict(model="demo-tiny", method="full", sharding="deepspeed", zero=3, gpus=2,
                            precision="bf16-master"))
    trace, default = _replayed(spec, plan)
    _, short = _replayed(spec, plan.model_copy(update={"deepspeed": DeepSpeedSettings(
        stage3_max_reuse_distance=spec.params_total // spec.num_layers)}))
    at_loss = max(k for k, e in enumerate(trace.events) if e.region == "head")
    norms = (2 * spec.num_layers + 1) * spec.hidden_size  # kept whole, never gathered
    assert default.available[at_loss] == spec.params_total - norms
    forward = [k for k, e in enumerate(trace.events) if e.region == "forward"]
    assert all(short.available[k] <= default.available[k] for k in forward)
    assert sum(short.available[k] for k in forward) < sum(default.available[k] for k in forward)


def test_at_full_size_the_live_parameter_cap_bounds_the_prefetch():
    """Every module fetched prefetches, containers too, so the prefetch runs ahead layer by layer until
    stage3_max_live_parameters (1e9 elements) stops it, having taken whole parameters (at most one more, lm_head's):
    on Llama-2-7B some 2 GB of bf16 parameters stay gathered through the forward, whatever the GPU count."""
    spec = resolve_model("llama-2-7b")
    largest = 32000 * 4096
    for gpus in (4, 8):
        plan = build_plan(dict(model="llama-2-7b", method="full", sharding="deepspeed", zero=3, gpus=gpus, precision="bf16-master",
                               grad_ckpt=True))
        trace, replay = _replayed(spec, plan)
        forward = [n for e, n in zip(trace.events, replay.available) if e.region == "forward"]
        assert zero3_gather.MAX_LIVE_PARAMETERS * 0.8 < max(forward)
        assert max(forward) <= zero3_gather.MAX_LIVE_PARAMETERS + largest
        held = zero3_gather.moments(spec, plan, gpus, 2)
        assert 1.6e9 < held.forward_end < 2.4e9


def test_the_estimate_counts_the_gathered_parameters_at_each_moment():
    """ZeRO-3 on several GPUs: the estimate's gathered parameters are the replay's at the decoder's end, the loss,
    and each layer's backward; on one GPU nothing is gathered (each partition is the whole parameter)."""
    from memplan.estimator import estimate

    spec = resolve_model("llama-3.2-1b")
    fields = dict(model="llama-3.2-1b", method="lora", sharding="deepspeed", zero=3, micro_batch=1, seq_len=1024,
                  precision="bf16-master")
    one = estimate(spec, build_plan(dict(fields, gpus=1)))
    two = estimate(spec, build_plan(dict(fields, gpus=2)))
    held = zero3_gather.moments(spec, build_plan(dict(fields, gpus=2)), 2, 2)
    assert one.breakdown["gathered_params"] == 0
    assert two.breakdown["gathered_params"] in (held.decoder_end, held.forward_end, held.backward_start,
                                                 held.last_layer_forward, *held.layers_backward)
