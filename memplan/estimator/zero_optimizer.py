"""What DeepSpeed's ZeRO-1/2 optimizer (deepspeed/runtime/zero/stage_1_and_2.py, as memplan's ds_config runs it:
contiguous_gradients, overlap_comm, torch's AdamW over the fp32 partition) allocates on each GPU, in the order a
training step's stream (`memplan.estimator.stream`) needs it, for full fine-tuning without offload; the order as
`memplan profile --backend cpu` runs DeepSpeed's engine (benchmarks/deepspeed_gloo_check.py). The trained parameters
are the model's (full fine-tuning) or the adapters (LoRA: the base stays as loaded, in the engine's bf16):

- loading: the parameters in module order, then one flat 16-bit buffer of them all (`flatten_dense_tensors_aligned`),
  the parameters rebound to views of it, then this rank's fp32 masters, a clone of its partition cast to fp32
  (`.detach().clone().to(fp32)`). DeepSpeed flattens on the GPU only where it has room for the flat buffer beside the
  parameters (`flatten_on_accelerator`: `available_memory() >= flat_buffer_bytes`), else it moves the parameters to
  the host, empties the cache, and builds the buffer there before moving it back. The replay follows the host path,
  the one a GPU where the weights matter takes: the parameters freed and released, then the buffer. A GPU with room
  shows the other in max_memory_reserved (a second copy of the weights at initialization, and its blocks cached
  after, which the allocator releases at the first request it cannot otherwise serve), so it never decides whether
  a plan fits (github.com/deepspeedai/DeepSpeed/issues/1611);
- the backward: at the first gradient, two reduce buckets of reduce_bucket_size elements (`setup_buckets`); each
  gradient autograd makes is copied into a bucket and freed, unless larger than a bucket: then it waits for the
  next gradient's hook, which reduces it. This rank's part of each reduced bucket is copied into one buffer of its
  partition (`grads_in_partition`), allocated at the first copy on the reduction stream (overlap_comm). The replay
  follows the rank owning lm_head, the most loaded: its first copy is at the backward's start. With accumulation
  ZeRO-2 reduces every micro-batch, a later one into a second buffer added into the first and freed as its backward
  ends; ZeRO-1 keeps each micro-batch's whole gradients as autograd accumulates them until the last, which reduces
  (and frees) them. The buckets are freed as each backward ends (`_release_ipg_buffers`);
- the step: the optimizer states at the first one, the partition's gradients copied flat (`get_flat_partition`)
  and cast to fp32, the 16-bit copy and the partition buffer freed, torch's AdamW (its temporaries over the one flat
  fp32 tensor), the fp32 gradient freed; the updated partition is all-gathered into the flat buffer in place.

With ZeRO-Offload (`offload_optimizer`) the fp32 masters, the gradient partition, the optimizer states and the step
live in pinned host memory, so on the GPU: at loading, the partition's 16-bit clone (made on the GPU, then moved to
the host: with one GPU, a second copy of the weights at once) and then a staging buffer the size of the largest
trained parameter (`temp_grad_buffer_for_gpu_offload`); in the backward, a gradient larger than a bucket cloned out of
autograd's storage, and in the step's last micro-batch each reduced gradient's float64 copy for its norm
(`set_norm_for_param_grad_in_gpu`), freed before its fp32 copy leaves for the host; no step.

The estimate's terms for the same moments: `sharding._zero_step` and `sharding._zero_offload_reduction`. ZeRO-3 is
`memplan.estimator.zero3_optimizer`; a quantized base and parameter offload are left to the measured ratio
(`stream.supported`).
"""

from __future__ import annotations

import math

from memplan.catalog.spec import ModelSpec
from memplan.estimator import states
from memplan.estimator.fully_shard import DEFAULT_STREAM
from memplan.plan import Plan

REDUCTION_STREAM = 3  # DeepSpeedZeroOptimizer.reduction_stream (overlap_comm): where grads_in_partition is allocated


def replayable(plan: Plan) -> str | None:
    """None where the stream follows DeepSpeed's optimizer for the plan; else why not."""
    if plan.zero not in (1, 2):
        return f"DeepSpeed ZeRO-{plan.zero}: its partitioning is not replayed"
    if plan.quantized_base:
        return "DeepSpeed over a quantized base is not replayed"
    if plan.offload not in ("none", "optimizer"):
        return f"DeepSpeed's offload '{plan.offload}' is not replayed"
    return None


def step_temporaries(plan: Plan, partition: int) -> int:
    """What the plan's torch optimizer allocates inside its step over one flat fp32 partition of `partition`
    elements (states.optimizer_step_temporaries of that one tensor: foreach AdamW's sqrt of it, for-loop AdamW's two,
    fused none)."""
    return states.optimizer_step_temporaries(states.Tensors(((partition,),), (), 0),
                                             plan.model_copy(update={"precision": "fp32"}), 4)


class ZeroOptimizer:
    """The events DeepSpeed's ZeRO-1/2 optimizer adds to the step's stream (`st`: memplan.estimator.stream._Step)."""

    def __init__(self, spec: ModelSpec, plan: Plan, tensors: states.Tensors, grad_itemsize: int) -> None:
        from memplan.estimator.sharding import deepspeed_reduce_bucket_elems

        self.plan, self.g_item = plan, grad_itemsize
        self.partition = math.ceil(tensors.n_trainable / plan.world_size)  # elements of this rank's partition
        self.offload = plan.offload == "optimizer"
        self.largest = max(tensors.trainable, default=0)  # the offload staging buffer's elements
        self._in_bucket: list[int] = []  # offload: the elements of each gradient in the current bucket
        self.bucket = deepspeed_reduce_bucket_elems(spec, plan)
        self.stage, self.accumulates = plan.zero, plan.grad_accum > 1
        self._micro, self._last = 0, True
        self._buckets: list[int] = []
        self._filled = 0  # elements in the current bucket
        self._large: int | None = None  # a gradient larger than a bucket, waiting for the next hook
        self._first: int | None = None  # grads_in_partition of the step's first reducing micro-batch
        self._later: int | None = None  # ... of a later micro-batch (ZeRO-2 with accumulation)
        self._kept: list[int] = []  # ZeRO-1: whole gradients kept until the last micro-batch, in the hooks' order
        self._hooks = 0  # gradients seen in this micro-batch

    # ---------------------------------------------------------------- loading

    def load(self, st, parameters: list[int], flat_bytes: int) -> None:
        """The parameters' own storages freed and released, the flat buffer (DeepSpeed flattening on the host: see
        the module's docstring), the fp32 masters of this rank's partition."""
        st.free(*parameters)
        st.events.append(("e",))  # torch.cuda.empty_cache()
        st.alloc(flat_bytes)
        clone = st.alloc(self.partition * self.g_item)
        if self.offload:  # the masters go to pinned host memory; the GPU keeps a staging buffer
            st.free(clone)
            st.alloc(self.largest * self.g_item)
        elif self.g_item < 4:
            st.alloc(4 * self.partition)
            st.free(clone)

    # ---------------------------------------------------------------- the backward

    def start_micro_batch(self, micro: int, last: bool) -> None:
        self._micro, self._last, self._hooks = micro, last, 0

    @property
    def _reduces(self) -> bool:
        """Whether this micro-batch's gradients are reduced (ZeRO-1: the last micro-batch's only)."""
        return self.stage == 2 or self._last

    def keep_grad(self, st, g: int, nbytes: int) -> bool:
        """A parameter's gradient as autograd made it: False where the hook drops it (the caller frees it)."""
        hook, self._hooks = self._hooks, self._hooks + 1
        if not self._reduces:
            if self._micro == 0:
                self._kept.append(g)
                return True
            return False  # added in place into the one kept
        if hook < len(self._kept):  # ZeRO-1's last micro-batch: added into the kept one, which the hook copies
            st.free(self._kept[hook])
        if not self._buckets:
            self._buckets = [st.alloc(self.bucket * self.g_item) for _ in range(2)]
        numel = nbytes // self.g_item
        if self._filled + numel > self.bucket:
            self._reduce(st)
        self._in_bucket.append(numel)
        if numel > self.bucket:
            self._filled = numel
            if self.offload:  # cloned out of autograd's storage (_offload_gradient_safety_enabled)
                self._large = st.alloc(nbytes)
                return False
            self._large = g
            return True
        self._filled += numel
        return False

    def _reduce(self, st) -> None:
        """The bucket reduced: this rank's part copied into its partition buffer (the rank owning lm_head's first
        copy is the first reduction's), a waiting large gradient freed."""
        if self._filled and self.offload:
            if self._last:  # the step's gradients leave for the host: each one's float64 copy for its norm
                for numel in self._in_bucket:
                    st.free(st.alloc(8 * min(numel, self.partition)))
        elif self._filled:
            if self._first is None:
                self._first = st.alloc(self.partition * self.g_item, REDUCTION_STREAM)
            elif self._micro > 0 and self._later is None and self.stage == 2:
                self._later = st.alloc(self.partition * self.g_item, REDUCTION_STREAM)
        st.free(self._large)
        self._large, self._filled, self._in_bucket = None, 0, []

    def backward_end(self, st) -> None:
        """The epilogue: the last bucket reduced, ZeRO-1's whole gradients freed, the buckets freed, a later
        micro-batch's partition buffer added into the first and freed."""
        if not self._reduces:
            return
        self._reduce(st)
        self._kept = []
        st.free(*self._buckets)
        self._buckets = []
        st.free(self._later)
        self._later = None

    # ---------------------------------------------------------------- the step

    def step(self, st, first: bool, per_state: int) -> None:
        """States at the first step (`per_state` tensors); the flat copy, its fp32 cast, the 16-bit buffers freed,
        the optimizer's temporaries over the fp32 partition, the fp32 gradient freed."""
        if self.offload:  # in host memory: the states, the fp32 gradients and the step; the weights copied in place
            return
        flat_partition = states.Tensors(((self.partition,),), (), 0)
        if first:
            states_bytes = states.optimizer_state_bytes(flat_partition, self.plan, 4)
            for _ in range(per_state):
                st.alloc(states_bytes // per_state)
        flat = st.alloc(self.partition * self.g_item, DEFAULT_STREAM)
        fp32 = st.alloc(4 * self.partition) if self.g_item < 4 else flat
        if fp32 != flat:
            st.free(flat)
        st.free(self._first)
        self._first = None
        temporaries = step_temporaries(self.plan, self.partition)
        if temporaries:
            st.free(st.alloc(temporaries))
        st.free(fp32)
