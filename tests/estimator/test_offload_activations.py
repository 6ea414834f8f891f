"""Activation offloading (Plan.offload_activations: torchtune's enable_activation_offloading, TRL's
activation_offloading): the layers' saved tensors move to pinned host memory in the forward and come back one layer at
a time in the backward. Measuring it needs CUDA streams and pinned memory, which the CPU cannot fake; these tests
check the accounting against the same plan without offloading, term by term."""

from __future__ import annotations

import pytest

from memplan.catalog.resolve import resolve_model
from memplan.errors import UserError
from memplan.estimator import estimate
from memplan.estimator.activations import activations
from memplan.plan import Plan, build_plan

SPEC = "llama-3.1-8b"


@pytest.mark.parametrize("grad_ckpt", [True, False])
def test_the_layers_activations_move_to_the_host(grad_ckpt):
    spec = resolve_model(SPEC)
    fields = dict(method="lora", precision="bf16", micro_batch=2, seq_len=4096, grad_ckpt=grad_ckpt)
    kept = estimate(spec, Plan(**fields))
    moved = estimate(spec, Plan(offload_activations=True, **fields))
    acts = activations(spec, Plan(**fields))
    # the forward at the loss: the layers' saved tensors and the shared ones are on the host
    fwd_drop = kept.phases["forward"]["activations"] - moved.phases["forward"]["activations"]
    assert fwd_drop >= acts.layers_saved + acts.shared - acts.last_layer
    # the backward holds one layer's at a time, not the stack below it
    assert moved.phase_peaks["backward"] < kept.phase_peaks["backward"]
    assert moved.phase_peaks["optimizer"] == kept.phase_peaks["optimizer"]
    # the host holds the copies while the step runs, not when it saves
    host = moved.host.to_json()
    assert host["train"]["terms"]["offloaded"] == acts.offloaded >= acts.layers_saved
    assert host["save"]["terms"]["offloaded"] == 0


def test_a_plan_that_offloads_more_than_the_node_holds_does_not_fit(run_cli):
    code, out, err = run_cli("estimate", "--model", SPEC, "--method", "lora", "--precision", "bf16",
                             "--batch-size", "4", "--seq-len", "4096", "--no-grad-ckpt", "--offload-activations",
                             "--gpu", "h100-80gb", "--host-memory", "128GiB")
    assert code == 1
    assert "of host RAM per node" in out and "largest: offloaded" in out


def test_offloading_is_a_gpu_plan_and_memplan_does_not_measure_it(run_cli):
    with pytest.raises(UserError, match="a CPU run has nothing to move"):
        build_plan({"device": "cpu", "offload_activations": True})
    code, out, err = run_cli("profile", "--model", "demo-tiny", "--offload-activations", "--backend", "trace")
    assert code == 2 and "does not offload activations" in err and "\n" not in err.strip()
