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

from dataclasses import dataclass

from memplan.errors import UserError
from memplan.plan import Plan
from memplan.profile.run import measure
from memplan.runtime.meter import StepMeasure

IN_PROCESS_BACKENDS = ("trace", "cpu")  # the profile backends that run in this process without a GPU


@dataclass
class TraceResult:
    steps: list[StepMeasure]  # one per optimizer step
    after_load: int  # live bytes after model build (+LoRA) before the first step

    @property
    def steady(self) -> StepMeasure:
        """The last optimizer step (optimizer states exist from step 1 on)."""
        return self.steps[-1]

    @property
    def peak(self) -> int:
        """Max over all phases of all steps (what torch.cuda.max_memory_allocated would report)."""
        return max(s.peak for s in self.steps)


def trace_training(config, plan: Plan, *, backend: str = "trace", steps: int = 2, seed: int = 0) -> TraceResult:
    """Run `steps` optimizer steps of `plan` on the model of `config` and return the per-phase peaks.

    `config`: a transformers PretrainedConfig, a config dict with `model_type`, a config.json path or a
    local model directory. `backend`: "trace" (FakeTensorMode, any size) or "cpu" (CPU tensors).
    """
    if backend not in IN_PROCESS_BACKENDS:
        raise UserError(f"trace backend '{backend}' is not one of: {', '.join(IN_PROCESS_BACKENDS)}")
    result = measure(config, plan, backend=backend, steps=steps, seed=seed)
    return TraceResult(steps=result.steps, after_load=result.after_load)
