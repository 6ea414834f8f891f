"""FSDP2 in the allocation stream (memplan.estimator.fully_shard): its storages in the order two gloo ranks made and
freed them, the streams they are allocated on, the sharded load, and the plans it leaves to the measured ratio."""

import importlib.util
import itertools
import json
import math

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate, fully_shard
from memplan.estimator.allocator import replay
from memplan.estimator.overhead import CUBLAS_WORKSPACE_BYTES
from memplan.estimator.stream import allocation_stream, stream_plan
from memplan.plan import Plan

from support import REPO
from test_zero3_optimizer import _phase_peaks

STREAM_ROWS = [json.loads(line) for line in (REPO / "benchmarks/results/fsdp-stream.jsonl").read_text().splitlines()]
GLOO_ROWS = [json.loads(line) for line in (REPO / "benchmarks/results/fsdp-gloo-2rank.jsonl").read_text().splitlines()]
UNQUANTIZED_ROWS = [row for row in GLOO_ROWS if row["plan"]["method"] != "qlora"]
CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 512}


def _check_module():
    spec = importlib.util.spec_from_file_location("fsdp_stream_check", REPO / "benchmarks/fsdp_stream_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plan(**fields) -> Plan:
    return Plan(**{"model": "llama-small", "gpus": 2, "sharding": "fsdp", "zero": 3, "precision": "bf16",
                   "micro_batch": 2, "seq_len": 64, **fields})


@pytest.mark.parametrize("row", STREAM_ROWS, ids=lambda r: "zero{zero}-{method}-{}-accum{}".format(
    r["plan"].get("precision", "bf16"), r["plan"].get("grad_accum", 1), **r["plan"]))
def test_the_stream_makes_and_frees_fsdp_storages_as_two_gloo_ranks_did(row):
    """All-gather outputs, unsharded parameters, reduce-scatter inputs and outputs, each made and freed in the
    traced order (the second optimizer step: accumulation, checkpointing, FULL_SHARD and SHARD_GRAD_OP, autocast's
    mixed-precision policy)."""
    check = _check_module()
    events, kinds = check._stream(row["llama_config"], row["plan"])
    streamed = check._fsdp_sequence(events, lambda ev: kinds.get(ev[1], ""), step=2)
    assert check.canonical(streamed) == check.canonical(row["step2_fsdp_storages"])


def test_gathers_and_reduce_scatters_are_allocated_on_their_own_streams():
    spec = spec_from_config(CONFIG, "llama-small")
    events = allocation_stream(spec, _plan(method="full"))
    by_stream = {}
    for ev in events:
        if ev[0] == "a":
            by_stream.setdefault(ev[3] if len(ev) > 3 else 0, []).append(ev[2])
    tail = (8192 * 256 + 256) * 2  # the final norm and lm_head in bf16 (the embeddings are a unit of their own)
    assert max(by_stream[fully_shard.ALL_GATHER_STREAM]) == tail
    assert 8192 * 256 * 2 in by_stream[fully_shard.ALL_GATHER_STREAM]
    assert max(by_stream[fully_shard.REDUCE_SCATTER_STREAM]) == tail // 2  # this rank's half of the tail's gradients
    # separate pools reserve more than one pool would for the same allocations
    pooled = replay([ev[:3] if ev[0] == "a" else ev for ev in events])
    assert replay(events).peak_reserved > pooled.peak_reserved


@pytest.mark.parametrize("gpus", [2, 3])
def test_the_load_keeps_this_ranks_shards_and_two_whole_tensors_at_most(gpus):
    """accelerate's fsdp2_load_full_state_dict: each whole tensor is dropped as the loop rebinds its variable to the
    next one; each rank keeps its padded dim-0 chunks."""
    spec = spec_from_config(CONFIG, "llama-small")
    events = allocation_stream(spec, _plan(method="full", gpus=gpus))
    load = events[:events.index(("s",))]
    sizes = {ev[1]: ev[2] for ev in load if ev[0] == "a"}
    steps = list(itertools.accumulate(sizes[ev[1]] if ev[0] == "a" else -sizes[ev[1]] for ev in load))
    live, peak = steps[-1], max(steps)
    shards = 2 * sum(math.ceil(s[0] / gpus) * math.prod(s[1:]) for s in _shapes(spec))
    assert live == shards
    largest = 2 * 8192 * 256 * 2
    assert shards < peak <= shards + largest


def _shapes(spec):
    from memplan.estimator.states import module_parameters

    return [shape for shape, _ in module_parameters(spec)]


@pytest.mark.parametrize("precision", ["bf16", "bf16-master", "fp32", "amp-bf16"])
@pytest.mark.parametrize("row", UNQUANTIZED_ROWS, ids=lambda r: f"zero{r['plan']['zero']}-{r['plan']['method']}")
def test_the_stream_allocates_what_the_estimate_counts(row, precision):
    """The stream (CUDA kernels) against the estimate's allocated peak of the same plans on a GPU, which the gloo runs
    check per phase (bf16): what the replay does not allocate is added to its reserved peak, so it must stay small.
    bf16-master adds the optimizer's fp32 masters of the shards; amp-bf16 gathers bf16 copies of fp32 shards."""
    spec = spec_from_config(dict(model_type="llama", **row["llama_config"]), "llama-small")
    e = estimate(spec, Plan(**dict(row["plan"], device="cuda", model="llama-small", precision=precision)))
    assert e.reserved_basis == "replayed"
    assert -3 <= 100 * (e.replayed.steps_allocated - e.peak_allocated) / e.peak_allocated <= 2


def test_with_cpu_offload_the_stream_allocates_what_the_estimate_counts():
    """FULL_SHARD with CPUOffloadPolicy, the gloo rows' plans: the shards, their gradients, masters, states and the
    step on the host; the GPU holds what the unshards and the backward make."""
    for row in (r for r in UNQUANTIZED_ROWS if r["plan"]["zero"] == 3):
        spec = spec_from_config(dict(model_type="llama", **row["llama_config"]), "llama-small")
        for precision in ("bf16", "bf16-master", "amp-bf16"):
            plan = Plan(**dict(row["plan"], device="cuda", model="llama-small", precision=precision,
                               offload="optimizer+params"))
            e = estimate(spec, plan)
            assert e.reserved_basis == "replayed"
            assert -3 <= 100 * (e.replayed.steps_allocated - e.peak_allocated) / e.peak_allocated <= 2, \
                (row["plan"], precision)


@pytest.mark.parametrize("preset", ["llama-2-7b", "mistral-7b", "phi-3-mini", "qwen3-30b-a3b"])
def test_a_layers_whole_gradients_never_meet_its_largest_transient(preset):
    """Full FT under FULL_SHARD with CPU offload, where a layer's backward peaks as its last gradients are made: its
    saved tensors are gone and its transients small by then (the layer walked node by node,
    stream.layer_backward_walk), not all its saved tensors and its largest transient beside its whole gradients. The
    estimate's peak is the stream's, which allocates each tensor where the traced step does."""
    plan = Plan(model=preset, precision="bf16", gpus=2, sharding="fsdp", zero=3, offload="optimizer+params",
                micro_batch=1, seq_len=1024)
    e = estimate(resolve_model(preset), plan, kernels="cuda")
    assert e.peak_phase == "backward"
    assert abs(e.replayed.steps_requested / e.peak_allocated - 1) < 1e-3


def test_cpu_offload_leaves_nothing_on_the_gpu_between_steps():
    """accelerate moves each shard to the host as it loads it; an unshard copies each shard in, one tensor per
    parameter on the all-gather stream, freed once copied into the all-gather output; the reduce-scatter output goes
    to the host gradient; the optimizer step allocates nothing on the GPU."""
    spec = spec_from_config(CONFIG, "llama-small")
    for precision in ("bf16", "amp-bf16"):
        offloaded = allocation_stream(spec, _plan(offload="optimizer+params", precision=precision))
        kept = allocation_stream(spec, _plan(precision=precision))
        sizes, live, at = {}, 0, []
        for ev in offloaded:
            if ev[0] == "a":
                sizes[ev[1]] = ev[2]
                live += ev[2]
            elif ev[0] == "f" and ev[1] in sizes:
                live -= sizes.pop(ev[1])
            elif ev[0] in ("s", "p"):
                at.append((ev, live))
        assert [n for ev, n in at if ev == ("s",)] == [0, 0]  # the load left nothing, nor did the first step
        assert [n for ev, n in at if ev == ("p", None)] == [0, 0]
        step = offloaded.index(("p", "optimizer"))
        assert offloaded[step + 1] == ("p", None)  # no step on the GPU
        first_unshard = [ev for ev in offloaded[offloaded.index(("s",)):] if ev[0] == "a"][2:4]  # after the batch
        # the embeddings' shard copied in (cast under autocast's policy) and gathered
        assert [ev[3] for ev in first_unshard] == [fully_shard.ALL_GATHER_STREAM] * 2
        assert replay(offloaded).steps_allocated < replay(kept).steps_allocated


@pytest.mark.parametrize("precision", ["bf16", "amp-bf16"])
def test_fsdp_on_one_gpu_is_a_plain_process_unless_it_offloads(precision):
    """One process without offload has nothing to shard: memplan train runs it as a plain process, and the estimate
    is that process's, its stream too. Offloading, accelerate wraps it in FSDP2 (its mixed-precision policy under
    autocast): replayed as such, the parameters, gradients and step on the host."""
    spec = spec_from_config(CONFIG, "llama-small")
    alone = estimate(spec, _plan(precision=precision, gpus=1))
    plain = estimate(spec, _plan(precision=precision, gpus=1, sharding="ddp", zero=0))
    assert not alone.plan.fully_shards and alone.plan.fsdp_mixed_precision is False
    assert (alone.phases, alone.reserved) == (plain.phases, plain.reserved) and alone.reserved_basis == "replayed"
    offloaded = estimate(spec, _plan(precision=precision, gpus=1, offload="optimizer+params"))
    assert offloaded.plan.fully_shards and offloaded.plan.fsdp_mixed_precision is (precision == "amp-bf16")
    assert offloaded.reserved_basis == "replayed" and offloaded.peak_allocated < plain.peak_allocated
    assert -3 <= 100 * (offloaded.replayed.steps_allocated / offloaded.peak_allocated - 1) <= 2


@pytest.mark.parametrize("gpus", [2, 3])
def test_a_4bit_base_is_loaded_whole_on_every_gpu_then_sharded(gpus):
    """accelerate prepares a Params4bit model without its sharded load: every rank quantizes the whole model onto its
    GPU, fully_shard makes each unit's shards of the packed bf16 storage, and the whole tensors go together once it
    is done; each 4-bit weight's quantization state stays whole. The estimate's weights are what stays."""
    from memplan.estimator import states
    from memplan.estimator.activations import lora_targets, numerics

    spec = spec_from_config(CONFIG, "llama-small")
    plan = _plan(method="qlora", gpus=gpus)
    events = allocation_stream(spec, plan)
    load = events[:events.index(("s",))]
    sizes = {ev[1]: ev[2] for ev in load if ev[0] == "a"}
    live = list(itertools.accumulate(sizes[ev[1]] if ev[0] == "a" else -sizes[ev[1]] for ev in load))
    tensors = states.parameter_tensors(spec, plan, lora_targets(spec, plan))
    num = numerics(plan, spec)
    whole = states.weight_bytes(tensors, plan, num.stored_weights, num.stored_adapter)
    kept = states.unsharded_quantization_bytes(tensors, plan)
    assert 0 < kept < whole // 20
    shards = live[-1] - kept
    assert (whole - kept) / gpus <= shards < 1.01 * (whole - kept) / gpus  # dim 0 padded to equal chunks
    assert max(live) == whole + shards
    e = estimate(spec, plan)
    assert e.phases["optimizer"]["weights"] == pytest.approx(live[-1], rel=1e-2)  # (an even split: no padding)
    assert e.reserved_basis == "replayed"


@pytest.mark.parametrize("precision", ["bf16", "amp-bf16"])
@pytest.mark.parametrize("offload", ["none", "optimizer+params"])
def test_over_a_4bit_base_the_stream_allocates_what_the_estimate_counts(precision, offload):
    """QLoRA on the gloo rows' adapter plans: the packed weights gathered as stored, the adapters (cast under
    autocast's policy) and their sharded gradients; with CPU offload the shards on the host."""
    for row in (r for r in GLOO_ROWS if r["plan"]["method"] != "full"):
        if offload != "none" and row["plan"]["zero"] != 3:
            continue
        spec = spec_from_config(dict(model_type="llama", **row["llama_config"]), "llama-small")
        plan = Plan(**dict(row["plan"], device="cuda", model="llama-small", method="qlora", precision=precision,
                           offload=offload))
        e = estimate(spec, plan)
        assert e.reserved_basis == "replayed"
        assert -1 <= 100 * (e.replayed.steps_allocated - e.peak_allocated) / e.peak_allocated <= 1, row["plan"]


def test_autocast_under_fsdp_runs_the_layers_on_the_gathered_bf16_copies():
    """accelerate's mixed-precision policy: fp32 shards (weights, final gradients, states as an fp32 plan keeps
    them), activations and gathered parameters as in bf16 (no fp32 residual, no autocast copies of the weights);
    each gather first copies the shards to one flat bf16 tensor, each reduce-scatter casts its bf16 output to fp32."""
    spec = spec_from_config(CONFIG, "llama-small")
    amp, bf16, fp32 = (estimate(spec, _plan(method="full", precision=p)) for p in ("amp-bf16", "bf16", "fp32"))
    for term in ("weights", "optimizer_states"):
        assert amp.phases["optimizer"][term] == fp32.phases["optimizer"][term] == 2 * bf16.phases["optimizer"][term]
    for term in ("activations", "logits_loss", "gathered_params"):  # (the backward peaks elsewhere: fp32 gradients)
        assert amp.phases["forward"][term] == bf16.phases["forward"][term]
    one_gpu = estimate(spec, _plan(method="full", precision="amp-bf16", gpus=1, sharding="ddp", zero=0))
    assert one_gpu.phases["forward"]["activations"] > amp.phases["forward"]["activations"]  # fp32 residual
    events = allocation_stream(spec, _plan(method="full", precision="amp-bf16"))
    made = [(ev[3] if len(ev) > 3 else 0, ev[2]) for ev in events if ev[0] == "a"]
    tail_shard = (256 + 8192 * 256) // 2 * 2  # this rank's halves of the final norm and lm_head
    assert (fully_shard.ALL_GATHER_STREAM, tail_shard) in made  # bf16: half the fp32 shard's bytes
    assert (fully_shard.REDUCE_SCATTER_STREAM, tail_shard * 2) in made  # the fp32 cast of the reduced shard


def test_a_deferred_reduce_scatter_runs_in_the_last_micro_batch_only():
    """sync_each_batch off: the first micro-batch's post-backwards only reshard, its whole gradients stay, and the
    last micro-batch reduce-scatters every unit once; the replay holds the whole gradients between micro-batches."""
    spec = spec_from_config(CONFIG, "llama-small")

    def reduce_scatters_per_micro_batch(plan):
        events = allocation_stream(spec, plan)
        step2 = events[[i for i, ev in enumerate(events) if ev == ("s",)][1]:]
        counts = []
        for ev in step2:
            if ev == ("p", "forward"):
                counts.append(0)
            elif ev[0] == "a" and len(ev) > 3 and ev[3] == fully_shard.REDUCE_SCATTER_STREAM:
                counts[-1] += 1
        return counts, replay(events)

    units = spec.num_layers + 2  # the decoder layers, the embeddings and the tail (a Llama's root holds nothing)
    synced, synced_replay = reduce_scatters_per_micro_batch(_plan(method="full", grad_accum=2))
    deferred, deferred_replay = reduce_scatters_per_micro_batch(_plan(method="full", grad_accum=2,
                                                                      sync_each_batch=False))
    assert synced == [units, units] and deferred == [0, units]
    # every parameter's whole bf16 gradient where the synced micro-batches keep this rank's half
    whole = 2 * spec.params_total
    assert 0.45 * whole < deferred_replay.peak_allocated - synced_replay.peak_allocated <= 0.55 * whole


def test_a_loss_that_never_calls_lm_head_is_left_to_the_measured_ratio():
    """Liger's fused loss reads lm_head's weight without calling it: FSDP2 runs the tail unit's group in part, which
    is not traced (Liger's CPU path does not run under FSDP). The chunked loss, which calls lm_head once per chunk,
    is replayed as traced (fsdp-stream.jsonl: the tail resharded as the backward starts, gathered again for the
    first chunk's recomputation)."""
    spec = spec_from_config(dict(CONFIG, max_position_embeddings=4096), "llama-small")
    for chunks in (1, 2):
        e = estimate(spec, _plan(method="full", loss="chunked", micro_batch=chunks, seq_len=1024))
        assert e.reserved_basis == "replayed"
    e = estimate(spec, _plan(method="full", liger=["fused_linear_cross_entropy"]))
    assert e.reserved_basis.startswith("measured ratio (FSDP2 runs the tail unit"), e.reserved_basis
    assert e.replayed is None and e.peak_allocated > 0


@pytest.mark.parametrize("zero", [2, 3])
def test_the_root_gathers_a_vision_tower_it_never_calls(zero):
    """A multimodal model's frozen vision tower is in FSDP2's root unit, gathered whole with it for the step, under
    SHARD_GRAD_OP as under FULL_SHARD (Qwen2.5-VL-3B: 1.25 GiB in bf16). The stream and the estimate agree."""
    spec = resolve_model("qwen2.5-vl-3b")
    plan = Plan(model="qwen2.5-vl-3b", precision="bf16", gpus=2, sharding="fsdp", zero=zero, micro_batch=1,
                seq_len=1024)
    e = estimate(spec, plan)
    streamed = _phase_peaks(allocation_stream(spec, stream_plan(plan)))
    assert spec.params_frozen * 2 > 0.05 * e.peak_allocated
    for phase, peak in e.phase_peaks.items():
        assert streamed[phase] + CUBLAS_WORKSPACE_BYTES == pytest.approx(peak, rel=1e-3), phase
