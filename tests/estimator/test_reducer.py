"""DDP's allocations in the estimate's stream (memplan.estimator.reducer) against torch's DistributedDataParallel:
the module states' broadcast, the gradient buckets, and their rebuild, traced in order on a one-process gloo group
(the same code runs for every world size; the plan says two GPUs)."""

import pytest

from memplan.catalog.spec import spec_from_config
from memplan.estimator import reducer
from memplan.estimator.allocator import replay
from memplan.estimator.stream import _Model, allocation_stream, ddp_events
from memplan.plan import Plan

CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 6000, "max_position_embeddings": 256}
LORA = {"rank": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
MINIMUM = 4096  # the shape check's and the index broadcast's small tensors are left out of the stream


def test_bucket_assignment_closes_each_bucket_at_the_tensor_that_reaches_its_limit():
    tensors = [("a", 600), ("b", 50), ("a", 500), ("a", 100), ("a", 900), ("b", 70)]
    assert reducer.bucket_assignment(tensors, [1000]) == [[0, 2], [1, 5], [3, 4]]
    assert reducer.bucket_assignment(tensors, [500, 1000], ready_order=True) == [[0], [2, 3, 4], [1, 5]]


def _traced_ddp_allocations(plan: Plan) -> list[tuple[int, int]]:
    """(step, bytes) of each storage DDP creates, from wrapping to the third step: a real DDP on the CPU."""
    torch = pytest.importorskip("torch")
    dist = torch.distributed
    from memplan.profile.launch import make_wrapper
    from memplan.profile.run import measure
    from memplan.runtime.meter import LiveBytes

    class Tagged(LiveBytes):
        def _event_alloc(self, rec):
            if self.events is not None and rec.nbytes:
                self.events.append(("a", rec.uid, rec.nbytes, rec.cat))

    meter = Tagged(record_events=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        measure(CONFIG, plan.model_copy(update={"device": "cpu"}), backend="cpu", steps=3, meter=meter,
                wrap=make_wrapper(plan, "cpu", 1))
    finally:
        dist.destroy_process_group()
    out, step = [], 0
    for ev in meter.events:
        step += ev[0] == "s"
        if ev[0] == "a" and ev[3] == "comm_buffers" and ev[2] >= MINIMUM:
            out.append((step, ev[2]))
    return out


def _streamed_ddp_allocations(plan: Plan) -> list[tuple[int, int]]:
    wrap, rebuild = ddp_events(spec_from_config(CONFIG, "tiny"), plan)
    return [(0, ev[2]) for ev in wrap if ev[0] == "a"] + [(2, ev[2]) for ev in rebuild if ev[0] == "a"]


@pytest.mark.parametrize("fields", [
    {"method": "lora", "precision": "bf16", "grad_ckpt": True, "lora": LORA},
    {"method": "full", "precision": "fp32", "grad_accum": 2},
], ids=["lora-bf16", "full-fp32"])
def test_ddp_allocates_what_torch_does_in_its_order(fields):
    """LoRA in bf16 (fp32 adapters: two dtypes, bucketed apart) and full fine-tuning with accumulation: each
    broadcast flat tensor (the buffers' few hundred bytes aside), the single first bucket, and the rebuilt buckets
    (the parameters' reverse order stands for the order gradients become ready: the norms' place within a layer
    aside, a few KiB)."""
    plan = Plan(model="tiny", micro_batch=1, seq_len=64, gpus=2, **fields)
    traced, streamed = _traced_ddp_allocations(plan), _streamed_ddp_allocations(plan)
    assert [s for s, _ in streamed] == [s for s, _ in traced]
    assert [n for _, n in streamed] == pytest.approx([n for _, n in traced], abs=16 << 10)


def test_the_stream_wraps_and_rebuilds_only_under_ddp():
    spec = spec_from_config(CONFIG, "tiny")
    one = Plan(model="tiny", method="lora", precision="bf16", lora=LORA)
    ddp = one.model_copy(update={"gpus": 2})
    single, wrapped = allocation_stream(spec, one), allocation_stream(spec, ddp)
    buckets = sum(n for _, n in _Model(spec, ddp).ddp().trainable)
    # the same step, plus the gradient buckets (a copy of the gradients) held throughout
    assert replay(wrapped).steps_allocated == replay(single).steps_allocated + buckets
    assert allocation_stream(spec, ddp.model_copy(update={"sharding": "deepspeed", "zero": 3, "offload": "optimizer"})) is None


def test_a_wrap_that_peaks_above_the_step_is_reported_and_reserved():
    """The module states' broadcast holds a flat copy of every parameter beside the weights (one bucket here: the
    model's 232 MB are under 250 MiB): with a short sequence, more than the step ever allocates."""
    from memplan.estimator import estimate

    spec = spec_from_config(dict(CONFIG, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                 vocab_size=32000), "tiny")
    plan = Plan(model="tiny", method="lora", precision="bf16", micro_batch=1, seq_len=16, gpus=2,
                lora={"rank": 4, "targets": ["q_proj", "v_proj"]})
    e = estimate(spec, plan, kernels="cuda")
    weights = e.phases["forward"]["weights"]
    assert e.setup_allocated is not None and e.setup_allocated > e.peak_allocated
    assert e.setup_allocated >= 2 * weights and e.reserved >= e.setup_allocated
    assert e.to_json()["setup_peak_allocated_bytes"] == e.setup_allocated
    assert estimate(spec, plan.model_copy(update={"gpus": 1}), kernels="cuda").setup_allocated is None
