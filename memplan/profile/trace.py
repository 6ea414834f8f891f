"""Trace the live allocated bytes of real training steps of a Hugging Face causal LM, per phase.

This is memplan's ground truth: the analytic estimator is tested against it, and `memplan profile` runs
the same code (its trace and cpu backends). It runs the real transformers/peft/torch code of a training
step and records every tensor storage that the step allocates, on fake tensors (`backend="trace"`: any
model size, nothing allocated, ~1-2 s for a 7B step) or on real CPU tensors (`backend="cpu"`: small
models only; the same meter, used to check the fake trace).

How each Plan field becomes the traced step: memplan.runtime.model (model, dtype, attention, LoRA, QLoRA,
checkpointing), memplan.runtime.optim (optimizer, bf16 master weights), memplan.profile.run (the loop:
micro-batches, autocast, loss, grad_accum, zero_grad). How bytes are counted and named:
memplan.runtime.meter. Not traced (a GPU-only or multi-process matter, modelled elsewhere):
sharding/zero/offload, gpus/nodes, the CUDA caching allocator, context and workspaces, CUDA attention and
optimizer kernel choices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from memplan.errors import UserError
from memplan.plan import Plan
from memplan.profile.run import measure
from memplan.runtime.meter import LiveBytes, StepMeasure

IN_PROCESS_BACKENDS = ("trace", "cpu")  # the profile backends that run in this process without a GPU


@dataclass
class TraceResult:
    steps: list[StepMeasure]  # one per optimizer step
    after_load: int  # live bytes after model build (+LoRA) before the first step
    events: list[tuple] | None = None  # storage allocations and frees in order (record_events)

    @property
    def steady(self) -> StepMeasure:
        """The last optimizer step (optimizer states exist from step 1 on)."""
        return self.steps[-1]

    @property
    def peak(self) -> int:
        """Max over all phases of all steps (what torch.cuda.max_memory_allocated would report)."""
        return max(s.peak for s in self.steps)


def trace_training(config, plan: Plan, *, backend: str = "trace", steps: int = 2, seed: int = 0,
                   record_events: bool = False, kernels: str = "cpu") -> TraceResult:
    """Run `steps` optimizer steps of `plan` on the model of `config` and return the per-phase peaks.

    `config`: a transformers PretrainedConfig, a config dict with `model_type`, a config.json path or a
    local model directory. `backend`: "trace" (FakeTensorMode, any size) or "cpu" (CPU tensors).
    `record_events`: also return the order of the step's allocations and frees (`events`), which
    memplan.estimator.allocator.replay serves as the CUDA caching allocator would. `kernels="cuda"` (fake
    tensors only) traces the memory of CUDA's kernels where they differ from the CPU's (cuda_kernel_memory).
    """
    if backend not in IN_PROCESS_BACKENDS:
        raise UserError(f"trace backend '{backend}' is not one of: {', '.join(IN_PROCESS_BACKENDS)}")
    if kernels not in ("cpu", "cuda") or (kernels == "cuda" and backend != "trace"):
        raise UserError(f"kernels '{kernels}': 'cpu', or 'cuda' with the trace backend")
    meter = LiveBytes(record_events=record_events)
    with cuda_kernel_memory() if kernels == "cuda" else contextlib.nullcontext():
        result = measure(config, plan, backend=backend, steps=steps, seed=seed, meter=meter)
    return TraceResult(steps=result.steps, after_load=result.after_load, events=meter.events)


def replayed_reserved(config, plan: Plan, steps: int = 3) -> dict[str, int]:
    """What the plan's step would leave reserved on a GPU, per allocator ("default", "expandable"): the step
    traced with CUDA's kernel memory, its allocations and frees served by the caching allocator model, the
    cuBLAS workspaces allocated at the first forward (memplan.estimator.allocator.replay)."""
    from memplan.estimator.allocator import ALLOCATORS, replay
    from memplan.estimator.overhead import CUBLAS_WORKSPACE_BYTES

    traced = trace_training(config, plan, steps=steps, record_events=True, kernels="cuda")
    return {a: replay(traced.events, a, workspace=CUBLAS_WORKSPACE_BYTES).peak_reserved for a in ALLOCATORS}


@contextlib.contextmanager
def cuda_kernel_memory() -> Iterator[None]:
    """Run the CPU's ops with the memory of CUDA's where the two differ (fake tensors: values do not matter):
    dropout as CUDA's fused native_dropout, which saves a bool mask (the CPU's composite dropout saves an
    input-dtype noise tensor); attention dropout inside SDPA's fused kernel (CUDA's flash and efficient
    kernels keep only their RNG state; the CPU falls back to the math kernel, which keeps the probabilities).
    Not emulated: autograd sums two gradients of one tensor (a residual stream, a tied embedding) in place on
    real tensors and out of place on fake ones (InputBuffer::accumulate skips tensor subclasses), so the
    trace holds a brief extra copy there (torch/csrc/autograd/input_buffer.cpp)."""
    import torch
    import torch.nn.functional as F

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        return torch.native_dropout(input, p, True)[0]

    def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        return sdpa(query, key, value, attn_mask, 0.0, *args, **kwargs)

    F.dropout, F.scaled_dot_product_attention = fused_dropout, fused_sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa

