"""DeepSpeed ZeRO-3 in the allocation stream (memplan.estimator.zero3_optimizer): DeepSpeed's own storages in the order
two gloo ranks made them, and what the stream allocates against the estimate's terms, phase by phase."""

import importlib.util
import json

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate, zero3_optimizer
from memplan.estimator.fully_shard import ALL_GATHER_STREAM
from memplan.estimator.overhead import CUBLAS_WORKSPACE_BYTES
from memplan.estimator.sharding import DEEPSPEED_SUB_GROUP_ELEMS, deepspeed_sub_groups, split_sub_groups
from memplan.estimator.stream import allocation_stream, stream_plan
from memplan.plan import Plan

from support import REPO

STREAM_ROWS = [json.loads(line) for line in (REPO / "benchmarks/results/zero3-stream.jsonl").read_text().splitlines()]
GLOO_ROWS = [row for line in (REPO / "benchmarks/results/deepspeed-gloo-2rank.jsonl").read_text().splitlines()
             if (row := json.loads(line))["plan"]["zero"] == 3 and row["plan"].get("offload", "none") == "none"]


def _check_module():
    spec = importlib.util.spec_from_file_location("zero3_stream_check", REPO / "benchmarks/zero3_stream_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _label(row: dict) -> str:
    plan, config = row["plan"], row.get("config") or row["llama_config"]
    return (f"{plan['method']}-{plan['precision']}-x{plan.get('gpus', 1)}-accum{plan.get('grad_accum', 1)}"
            f"-ckpt{int(plan['grad_ckpt'])}-kv{config.get('num_key_value_heads')}-V{config['vocab_size']}"
            f"{'-tied' if config.get('tie_word_embeddings') else ''}"
            f"{'-decay' if plan.get('hparams', {}).get('weight_decay') else ''}")


@pytest.mark.parametrize("row", STREAM_ROWS, ids=_label)
def test_the_stream_makes_and_frees_deepspeeds_storages_as_two_gloo_ranks_did(row):
    """The gathered parameters (single and coalesced gathers, the copies out of a flat buffer, releases, checkpointing's
    recompute, peft's wrappers), the flat tensors of coalesced reduce-scatters, and the step's storages (the norms'
    float64 copies, the flat fp32 gradient, AdamW's temporaries, the persistent parameters gathered again), in the
    traced order of the second optimizer step; the first's reductions and step (which makes the states) too."""
    check = _check_module()
    streamed = check.stream_sequences(row["config"], row["plan"])
    for step, kind in check.COMPARED:
        traced = row[f"step{step}"][kind]
        assert check.canonical(streamed[step][kind]) == check.canonical(traced), (step, kind)


def _phase_peaks(events: list, step: int = 2) -> dict[str, int]:
    """Bytes alive at each phase's peak of optimizer step `step` of a stream."""
    live: dict[int, int] = {}
    total, at, phase, peaks = 0, 0, None, {}
    for ev in events:
        if ev[0] == "s":
            at += 1
        elif ev[0] == "p":
            phase = ev[1]
        elif ev[0] == "a":
            live[ev[1]] = ev[2]
            total += ev[2]
            if at == step and phase:
                peaks[phase] = max(peaks.get(phase, 0), total)
        elif ev[0] == "f":
            total -= live.pop(ev[1])
    return peaks


@pytest.mark.parametrize("row", GLOO_ROWS, ids=_label)
def test_the_stream_allocates_what_the_estimate_counts_in_each_phase(row):
    """The ZeRO-3 plans measured per phase on two gloo ranks: the stream's allocated peak of each phase against the
    estimate's, whose reserved figure is the stream's replay."""
    spec = spec_from_config(dict(model_type="llama", **row["llama_config"]), "llama-small")
    plan = Plan(**dict(row["plan"], device="cuda", model="llama-small"))
    e = estimate(spec, plan)
    assert e.reserved_basis == "replayed" and e.reserved >= e.peak_allocated
    streamed = _phase_peaks(allocation_stream(spec, stream_plan(plan)))
    for phase, peak in e.phase_peaks.items():
        assert streamed[phase] + CUBLAS_WORKSPACE_BYTES == pytest.approx(peak, rel=0.006), phase


@pytest.mark.parametrize("preset", ["qwen2.5-vl-3b", "gemma-3-4b"])
def test_a_vision_towers_partition_is_in_the_stream(preset):
    """A multimodal model's vision tower is partitioned by ZeRO-3 like every parameter of the module, and never
    gathered by a text-only step: each rank keeps its share, which the stream allocates as the estimate counts it
    (both 1-2 % of these plans' peaks)."""
    spec = resolve_model(preset)
    plan = Plan(model=preset, precision="bf16-master", gpus=2, sharding="deepspeed", zero=3, micro_batch=1,
                seq_len=1024)
    e = estimate(spec, plan)
    streamed = _phase_peaks(allocation_stream(spec, stream_plan(plan)))
    assert spec.params_frozen * 2 / 2 > 0.01 * e.peak_allocated
    for phase, peak in e.phase_peaks.items():
        assert streamed[phase] + CUBLAS_WORKSPACE_BYTES == pytest.approx(peak, rel=1e-3), phase


CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 512}


def _plan(**fields) -> Plan:
    return Plan(**{"model": "llama-small", "gpus": 2, "sharding": "deepspeed", "zero": 3, "precision": "bf16-master",
                   "micro_batch": 2, "seq_len": 64, "grad_ckpt": False, **fields})


def test_one_process_gathers_nothing_and_several_gather_on_their_own_stream():
    spec = spec_from_config(CONFIG, "llama-small")

    def gathered(plan):
        return [ev[2] for ev in allocation_stream(spec, plan) if ev[0] == "a" and ev[3:] == (ALL_GATHER_STREAM,)]

    assert gathered(_plan(gpus=1)) == []
    two = gathered(_plan())
    assert max(two) == 2048 * 256 * 2  # the embedding (and lm_head), whole in bf16


def test_sub_groups_close_once_they_reach_deepspeeds_size():
    big = DEEPSPEED_SUB_GROUP_ELEMS
    assert split_sub_groups([10, 20]) == [30]
    assert split_sub_groups([big - 5, 10, big, 3]) == [big + 5, big, 3]
    assert split_sub_groups([]) == []


def test_a_configs_own_sizes_reach_the_estimate_the_stream_and_the_files_it_writes():
    """Plan.deepspeed: the sizes a DeepSpeed config sets, read as DeepSpeed reads them (5e8 as JSON's float or
    YAML's text), counted by the estimate and its stream, written to the plan file and to ds_config.json."""
    import yaml

    from memplan.plan import build_plan, plan_fields, plan_to_yaml
    from memplan.recommend.writers import ds_config

    spec = spec_from_config(CONFIG, "llama-small")
    sizes = {"reduce_bucket_size": 2 * 256 ** 2, "stage3_prefetch_bucket_size": 0, "sub_group_size": 0,
             "stage3_max_live_parameters": 256 ** 2, "stage3_max_reuse_distance": 0,
             "stage3_param_persistence_threshold": 0}
    plan, default = _plan(deepspeed=sizes), _plan()
    assert build_plan(dict(_plan().model_dump(mode="json"), deepspeed={"reduce_bucket_size": "1.31072e5"})) \
        .deepspeed.reduce_bucket_size == 2 * 256 ** 2
    # a sub-group per parameter: the step's fp32 gradient is the largest parameter's partition, not all of them
    assert max(deepspeed_sub_groups(spec, plan, 2)) == 2048 * 256 // 2 < deepspeed_sub_groups(spec, default, 2)[0]
    ours, theirs = estimate(spec, plan), estimate(spec, default)
    assert ours.breakdown != theirs.breakdown and ours.reserved_basis == "replayed"
    assert allocation_stream(spec, plan) != allocation_stream(spec, default)
    zero = ds_config(plan, spec)["zero_optimization"]
    assert {key: zero[key] for key in sizes} == sizes
    assert "sub_group_size" not in ds_config(default, spec)["zero_optimization"]
    assert plan_fields(plan)["deepspeed"] == sizes and "deepspeed" not in plan_fields(default)
    assert build_plan(yaml.safe_load(plan_to_yaml(plan))) == plan


def test_weight_decay_gives_the_norms_a_group_and_sub_group_of_their_own():
    """memplan's optimizer groups the 2-D weights apart from the rest under weight decay, and DeepSpeed splits each
    group into sub-groups; its step holds the largest sub-group's fp32 gradient."""
    spec = spec_from_config(CONFIG, "llama-small")
    plain, decayed = _plan(), _plan(hparams={"weight_decay": 0.01})
    norms = (2 * 3 + 1) * 256 // 2  # two per layer and the final one, this rank's half
    assert deepspeed_sub_groups(spec, decayed, 2) == [deepspeed_sub_groups(spec, plain, 2)[0] - norms, norms]
    steps = [[ev for ev in allocation_stream(spec, p) if ev[0] == "a"] for p in (plain, decayed)]
    assert len(steps[1]) > len(steps[0])  # a second flat fp32 gradient per step, and its states


def test_offloading_and_a_quantized_base_are_left_to_the_ratio():
    assert zero3_optimizer.replayable(_plan()) is None
    assert "offload" in zero3_optimizer.replayable(_plan(offload="optimizer"))
    assert "quantized" in zero3_optimizer.replayable(_plan(method="qlora"))
