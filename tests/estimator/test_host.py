"""Host RAM per node by phase (memplan.estimator.host): hand-worked numbers for each term, who loads and who
gathers, and how the terms reach the Estimate and its JSON."""

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.catalog.spec import spec_from_config
from memplan.estimator import estimate
from memplan.estimator import host as h
from memplan.plan import Plan

B, L = h.PROCESS_BASELINE_BYTES, h.LAUNCHER_BYTES
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
TINY_PARAMS = 86848  # tests/estimator/test_estimator.py works it out by hand


def llama8b():
    return resolve_model("llama-3-8b")  # config.json: torch_dtype bfloat16


def test_every_rank_loads_the_whole_model_in_its_load_dtype():
    """8 GPUs, amp-bf16 (fp32 weights) from a bf16 checkpoint: the file's pages once per node (one page cache),
    and on every rank the fp32 copy transformers makes beside them, before moving it to the GPU."""
    spec = llama8b()
    n = spec.params_total
    load = estimate(spec, Plan(precision="amp-bf16", gpus=8)).host.phases["load"]
    assert load.rank0 == {"processes": B, "dataset": 0, "checkpoint_pages": 2 * n, "loaded_weights": 4 * n}
    assert load.rank0_bytes == B + 6 * n == load.other_bytes
    assert load.node == 8 * B + L + 2 * n + 8 * 4 * n  # 259.9 GiB: what OOM-kills 8 ranks on a 160 GB host


def test_loading_in_the_checkpoints_dtype_makes_no_copy():
    spec = llama8b()
    load = estimate(spec, Plan(precision="bf16", method="lora")).host.phases["load"]
    assert load.rank0["loaded_weights"] == 0 and load.rank0["checkpoint_pages"] == 2 * spec.params_total
    assert load.node == B + 2 * spec.params_total  # one process: no launcher


@pytest.mark.parametrize("plan, copy", [
    (dict(sharding="fsdp", zero=3, precision="amp-bf16"), True),  # fsdp_cpu_ram_efficient_loading
    (dict(sharding="deepspeed", zero=3, precision="bf16-master"), False),  # zero.Init: rank 0 reads the file
])
def test_rank0_alone_loads_under_fsdp_and_zero3(plan, copy):
    spec = llama8b()
    e = estimate(spec, Plan(gpus=8, **plan))
    load = e.host.phases["load"]
    assert e.host.loaders == 1
    assert load.other == {"processes": B, "dataset": 0}
    assert load.rank0["loaded_weights"] == (4 * spec.params_total if copy else 0)
    assert load.node == 8 * B + L + load.rank0["checkpoint_pages"] + load.rank0["loaded_weights"]


def test_qlora_quantizes_on_the_gpu_without_a_host_copy():
    spec = llama8b()
    load = estimate(spec, Plan(method="qlora", precision="amp-bf16", gpus=2)).host.phases["load"]
    assert load.rank0["loaded_weights"] == 0 and load.rank0["checkpoint_pages"] == 2 * spec.params_total
    assert load.node == 2 * B + L + 2 * spec.params_total  # both ranks map the file: its pages once


def test_checkpoint_dtype_comes_from_the_config():
    spec = spec_from_config(dict(TINY, dtype="bfloat16"), "t")
    assert h.checkpoint_bytes(spec) == 2 * TINY_PARAMS
    bare = spec_from_config(dict(TINY), "t")  # no dtype: transformers writes float32
    e = estimate(bare, Plan(precision="bf16"))
    assert h.checkpoint_bytes(bare) == 4 * TINY_PARAMS
    assert e.host.phases["load"].rank0["loaded_weights"] == 2 * TINY_PARAMS
    assert any("states no dtype" in note for note in e.host.notes)


def test_dataset_bytes_by_hand():
    """Three list slots and the id's int per token, one more int for each position from 257."""
    plan = Plan(seq_len=512, data={"samples": 1000})
    assert h.dataset_bytes(plan) == 1000 * (512 * (24 + 32) + (512 - 257) * 32)
    assert h.dataset_bytes(Plan(seq_len=64, data={"samples": 10})) == 10 * 64 * 56
    assert h.dataset_bytes(Plan()) == 0
    e = estimate(llama8b(), Plan(gpus=4, seq_len=512, data={"samples": 1000}))
    assert all(ph.terms["dataset"] == 4 * h.dataset_bytes(Plan(seq_len=512, data={"samples": 1000}))
               for ph in e.host.phases.values())


def test_offloaded_states_stay_in_host_ram_while_training_and_saving():
    spec = llama8b()
    e = estimate(spec, Plan(sharding="deepspeed", zero=3, precision="bf16-master", offload="optimizer", gpus=8))
    train = e.host.phases["train"]
    assert train.terms["offloaded"] == e.host_offload_bytes > 0
    assert train.node == 8 * B + L + e.host_offload_bytes
    assert e.host.phases["save"].terms["offloaded"] == e.host_offload_bytes


def test_deepspeed_zero2_offload_adds_pinned_buffers():
    """stage_1_and_2.py: a pinned 16-bit copy of the partition and a gradient buffer of the largest parameter."""
    spec = llama8b()
    e = estimate(spec, Plan(sharding="deepspeed", zero=2, precision="bf16-master", offload="optimizer", gpus=8))
    largest = spec.vocab_size * spec.hidden_size  # the embedding (and the untied lm_head)
    assert e.host.phases["train"].rank0["pinned_buffers"] == -(-spec.params_total // 8) * 2 + largest * 2


def test_saves_gather_on_the_main_process():
    spec = llama8b()
    n = spec.params_total
    ddp = estimate(spec, Plan(precision="bf16", gpus=8)).host.phases["save"]
    # model.pt: the trainable weights copied to the CPU by the main process only; the other ranks keep nothing
    assert ddp.rank0["saved_state"] == 2 * n and ddp.other["saved_state"] == 0
    # ZeRO-3: rank 0 consolidates the 16-bit model, then copies its trainable weights; each rank's fp32
    # partition leaves the GPU one storage at a time
    z3 = estimate(spec, Plan(sharding="deepspeed", zero=3, precision="bf16-master", gpus=8)).host.phases["save"]
    assert z3.rank0["saved_state"] == 2 * n + 2 * n and z3.other["saved_state"] == 0
    assert z3.rank0["serialization"] == z3.other["serialization"] == 4 * -(-n // 8)
    # ZeRO-1/2: accelerate's get_state_dict clones the whole model to the CPU on every process
    z1 = estimate(spec, Plan(sharding="deepspeed", zero=1, precision="bf16-master", gpus=8)).host.phases["save"]
    assert z1.other["saved_state"] == 2 * n and z1.rank0["saved_state"] == 4 * n
    # the final model of a DDP run: save_pretrained's safetensors shard (all of an 8B model) copied off the GPU
    assert ddp.rank0.get("serialization", 0) <= 2 * n


def test_merging_the_adapter_reloads_the_base_on_the_cpu():
    spec = llama8b()
    plan = Plan(method="lora", precision="amp-bf16", hparams={"merge_adapter": True})
    save = estimate(spec, plan).host.phases["save"]
    assert save.rank0["checkpoint_pages"] == 2 * spec.params_total  # merged in fp32: a copy beside the file
    assert save.rank0["loaded_weights"] == 4 * spec.params_total
    assert save.node == B + 6 * spec.params_total  # more than the adapter's save, which it follows
    no_merge = estimate(spec, plan.model_copy(update={"hparams": plan.hparams.model_copy(
        update={"merge_adapter": False})})).host.phases["save"]
    assert no_merge.node < B + spec.params_total


def test_cpu_plan_holds_its_tensors_in_host_ram():
    spec = spec_from_config(dict(TINY, dtype="float32"), "t")
    e = estimate(spec, Plan(device="cpu", precision="fp32"))
    train = e.host.phases["train"]
    # glibc's heap keeps up to the activations and logits at their peak (the backward's, here), and 64 MiB
    bwd = e.phases["backward"]
    retained = max(t["activations"] + t["logits_loss"] for t in e.phases.values()) + 64 * 2**20
    assert retained == bwd["activations"] + bwd["logits_loss"] + 64 * 2**20
    assert train.rank0 == {"processes": B, "dataset": 0, "training_tensors": e.peak_allocated,
                           "heap_retention": retained}
    # fp32 from an fp32 checkpoint, one process: the parameters are the mapped pages, not read while loading
    assert e.host.phases["load"].rank0["loaded_weights"] == 0
    opt = e.phases["optimizer"]
    at_save = sum(opt.values()) - opt["gradients"] - opt["optimizer_temporaries"]
    assert e.host.phases["save"].rank0["training_tensors"] == at_save
    assert e.host.phases["save"].rank0["heap_retention"] == retained  # kept from training
    assert e.host.phases["save"].rank0["saved_state"] == 4 * TINY_PARAMS  # model.pt's copy
    two = estimate(spec, Plan(device="cpu", precision="fp32", gpus=2)).host.phases["load"]
    # DDP's broadcast reads every parameter; its gradient buckets are allocated when it wraps the model
    assert two.rank0["loaded_weights"] == 4 * TINY_PARAMS and two.rank0["training_tensors"] == 4 * TINY_PARAMS
    assert two.node == 2 * two.rank0_bytes + L


def test_estimate_reports_the_host_peak_and_its_phase():
    e = estimate(llama8b(), Plan(precision="amp-bf16", gpus=8))
    assert e.host_bytes == e.host.peak == max(e.host.phase_peaks.values()) == e.host.phase_peaks["load"]
    out = e.to_json()
    assert out["host_bytes"] == out["host_peak_bytes"] == e.host_bytes and out["host_peak_phase"] == "load"
    assert set(out["host_phases"]) == {"load", "train", "save"}
    assert set(out["host_phases"]["save"]["terms"]) == set(h.HOST_TERMS)
    assert out["host_phases"]["load"]["node_bytes"] == e.host_bytes and out["host_offload_bytes"] == 0
    assert out["host_notes"] == ["no data.samples in the plan: the tokenized dataset is not counted"]
