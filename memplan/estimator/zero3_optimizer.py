"""What DeepSpeed ZeRO-3 (deepspeed/runtime/zero/stage3.py, partition_parameters.py and its parameter coordinator, as
memplan's ds_config runs it: contiguous_gradients, overlap_comm, reduce_scatter, torch's AdamW over each fp32
sub-group) allocates on each GPU, in the order a training step's stream (`memplan.estimator.stream`) needs it, for
full fine-tuning and adapters without offload; the order as `memplan profile --backend cpu` runs DeepSpeed's engine
on two gloo ranks (benchmarks/zero3_stream_check.py):

- loading, under `zero.Init` (accelerate's zero3_init_flag): each parameter made whole, its partition of
  ceil(numel / ranks) elements made, the whole one freed (`_partition_param`), but for the persistent ones (at most
  `stage3_param_persistence_threshold` elements), which stay whole; then the trained parameters' partitions copied
  into one flat buffer and freed (`_create_fp16_partitions_with_defragmentation`); per sub-group the fp32 masters,
  a cast copy cloned (`_create_fp32_partitions`); a zeroed fp32 buffer of the largest sub-group, made and freed
  (`initialize_optimizer_states`); the reduce bucket (`ipg_buckets`) and the gradient partition
  (`grad_partitions_flat_buffer`), both kept for the run;
- the forward and backward: the parameters the coordinator gathers and releases (`memplan.estimator.zero3_gather`:
  its replay's storages, on the all-gather stream, each module's at the moment the stream runs the module); each
  gradient autograd makes copied into the bucket and freed, or, larger than what is left of the bucket, kept until
  the next gradient's hook reduces it; a bucket of several gradients (or one not divisible by the ranks) is
  interleaved into one flat tensor for the reduce-scatter (`reduce_scatter_coalesced`: torch.cat), on the
  reduce-and-partition stream;
- the step: the persistent parameters' whole copies freed (re-gathered after the step, `_post_step`); each
  gradient partition's float64 copy for its norm (`get_grad_norm_direct`); per sub-group its gradients flattened
  and cast to fp32 (`_prepare_fp32_grad_for_sub_group`), the optimizer states at the first step, torch's AdamW's
  temporaries, the fp32 gradient freed.

One process gathers nothing (each partition is the whole parameter). The replay takes a released parameter's
memory as reusable at once: DeepSpeed marks it used by the compute stream (`record_stream`), so a host running ahead
of the GPU holds it a little longer. The estimate's terms for the same moments: `sharding._zero3_step` and
`zero3_gather.moments`.
"""

from __future__ import annotations

import math

from memplan.catalog.spec import ModelSpec
from memplan.estimator import states, zero3_gather
from memplan.estimator.activations import lora_targets
from memplan.estimator.fully_shard import ALL_GATHER_STREAM, DEFAULT_STREAM
from memplan.estimator.sharding import deepspeed_param_groups, deepspeed_reduce_bucket_elems, deepspeed_sub_groups
from memplan.estimator.zero_optimizer import REDUCTION_STREAM, step_temporaries
from memplan.plan import Plan


def replayable(plan: Plan) -> str | None:
    """None where the stream follows DeepSpeed ZeRO-3 for the plan; else why not."""
    if plan.quantized_base:
        return "DeepSpeed over a quantized base is not replayed"
    if plan.offload != "none":
        return f"DeepSpeed ZeRO-3's offload '{plan.offload}' is not replayed"
    return None


class Zero3:
    """The events DeepSpeed ZeRO-3 adds to the step's stream (`st`: memplan.estimator.stream._Step)."""

    def __init__(self, spec: ModelSpec, plan: Plan, itemsize: int, grad_itemsize: int) -> None:
        self.plan, self.item, self.g_item, self.world = plan, itemsize, grad_itemsize, plan.world_size
        trace, replay = zero3_gather.replayed(spec, plan, self.world, itemsize)
        self.threshold = zero3_gather.persistence_threshold(spec, plan)
        # every parameter in the order of named_parameters, whether it is trained
        params = states.module_parameters(spec, lora_targets(spec, plan), plan.lora.rank)
        self.params = [(math.prod(shape), role == "adapter" or not plan.trains_adapters) for shape, role in params]
        self.persistent = [n for n, _ in self.params if n <= self.threshold]
        self.frozen = spec.params_frozen  # named_parameters' vision tower, which text-only steps never call
        # the trained partitions by the optimizer's parameter group, and its sub-groups
        self.trained = sum(deepspeed_param_groups(spec, plan, self.world), [])
        self.groups = deepspeed_sub_groups(spec, plan, self.world)
        self.bucket = deepspeed_reduce_bucket_elems(spec, plan)
        self._segments = _segments(trace, replay, spec.num_layers) if self.world > 1 else {}
        self._ids: dict[int, int] = {}  # the coordinator's storage ids -> the stream's
        self._whole: list[int] = []  # the persistent parameters' whole copies
        self._in_bucket: list[int] = []  # elements of each gradient in the bucket
        self._large: list[int] = []  # gradients kept out of the bucket until it is reduced

    # ---------------------------------------------------------------- loading

    def load(self, st) -> None:
        """zero.Init's partitions, the flat buffer of the trained ones, the fp32 masters, the bucket and the gradient
        partition (see the module's docstring)."""
        trained_parts = []
        if self.frozen:  # a multimodal model's vision tower (first in the module): partitioned, never gathered
            st.alloc(math.ceil(self.frozen / self.world) * self.item)
        for numel, trained in self.params:
            whole = st.alloc(numel * self.item)
            part = st.alloc(math.ceil(numel / self.world) * self.item)
            if trained:
                trained_parts.append(part)
            if numel <= self.threshold:  # kept whole (ds_persist)
                self._whole.append(whole)
            else:
                st.free(whole)
        st.alloc(sum(self.trained) * self.item)  # the flat buffer (lp_param_buffer)
        st.free(*trained_parts)
        for n in self.groups:  # the fp32 masters: the sub-group cast, then cloned
            cast = st.alloc(4 * n)
            st.alloc(4 * n)
            st.free(cast)
        if self.groups:
            st.free(st.alloc(4 * max(self.groups)))  # initialize_optimizer_states' zeroed gradient
        st.alloc(self.bucket * self.g_item)
        st.alloc(sum(self.trained) * self.g_item)

    # ---------------------------------------------------------------- the gathers

    def gather(self, st, moment: tuple, before: bool | None = None) -> None:
        """The coordinator's storages at a moment of the step ((region, layer): ("forward", None) before the
        decoder, ("forward", i), ("tail", None) after it (the final norm), ("head", None) lm_head and the model's
        return, ("backward", None) as the backward starts, to the last layer's, ("backward", i), ("end", None) the
        embeddings' and what is left): those up to the moment's most gathered with `before`, the rest without, all
        with None."""
        segment = self._segments.get(moment)
        if not segment:
            return
        storages, split = segment
        for ev in storages[:split] if before else storages[split:] if before is False else storages:
            if ev[0] == "a":
                self._ids[ev[1]] = st.alloc(ev[2], ALL_GATHER_STREAM)
            else:
                st.free(self._ids.pop(ev[1]))

    # ---------------------------------------------------------------- the backward

    def start_micro_batch(self, micro: int, last: bool) -> None:
        pass  # every micro-batch reduces into the gradient partition (added in place after the first)

    def keep_grad(self, st, g: int, nbytes: int) -> bool:
        """A parameter's gradient as autograd made it (`reduce_independent_p_g_buckets_and_remove_grads`): False
        where it is copied into the bucket (the caller frees it), True where it waits for the bucket's reduction."""
        numel = nbytes // self.g_item
        if self._in_bucket and sum(self._in_bucket) + numel > self.bucket:
            self._reduce(st)
        fits = sum(self._in_bucket) + numel <= self.bucket
        self._in_bucket.append(numel)
        if fits:
            return False
        self._large.append(g)
        return True

    def _reduce(self, st) -> None:
        """`__reduce_and_partition_ipg_grads`: several gradients (or one the ranks do not divide) interleaved into
        one flat tensor with each one's padding, reduce-scattered; this rank's part added into the gradient
        partition; the waiting gradients freed."""
        if len(self._in_bucket) > 1 or any(n % self.world for n in self._in_bucket):
            padded = sum(math.ceil(n / self.world) for n in self._in_bucket) * self.world
            st.free(st.alloc(padded * self.g_item, REDUCTION_STREAM))
        st.free(*self._large)
        self._in_bucket, self._large = [], []

    def backward_end(self, st) -> None:
        """The epilogue (`independent_gradient_partition_epilogue`): the last bucket reduced."""
        if self._in_bucket:
            self._reduce(st)

    # ---------------------------------------------------------------- the step

    def step(self, st, first: bool, per_state: int) -> None:
        """The persistent parameters' copies freed, the norms' float64 copies, per sub-group the flat fp32 gradient,
        states at the first step and the optimizer's temporaries, then the persistent parameters gathered again."""
        st.free(*self._whole)
        for part in self.trained:
            st.free(st.alloc(8 * part))
        for n in self.groups:
            flat = st.alloc(n * self.g_item, DEFAULT_STREAM)
            fp32 = st.alloc(4 * n) if self.g_item < 4 else flat
            if fp32 != flat:
                st.free(flat)
            if first:  # torch's AdamW makes them as its first step starts
                state = states.optimizer_state_bytes(states.Tensors(((n,),), (), 0), self.plan, 4)
                for _ in range(per_state):
                    st.alloc(state // per_state)
            temporaries = step_temporaries(self.plan, n)
            if temporaries:
                st.free(st.alloc(temporaries))
            st.free(fp32)
        self._whole = [st.alloc(n * self.item) for n in self.persistent]


def _segments(trace: zero3_gather.Trace, replay: zero3_gather.Replay, layers: int) -> dict[tuple, tuple]:
    """The replay's storages by the moment of the step they belong to, each with the position after its most
    gathered event."""
    moments: dict[tuple, list[int]] = {}
    seen: set[str] = set()  # "forward" once a decoder layer ran forward, "head", "backward" likewise
    for k, e in enumerate(trace.events):
        layer = trace.modules[e.module].layer if e.kind != "end" else None
        if e.region == "head" or e.region == "forward" and layer is None and "head" in seen:
            seen.add("head")
            key = ("head", None)
        elif e.region == "forward":
            key = ("forward", layer) if layer is not None else ("tail" if "forward" in seen else "forward", None)
            seen.add("forward" if layer is not None else "")
        elif e.region == "backward" and layer is not None:
            seen.add("backward")
            key = ("backward", layer)
        else:
            key = ("end" if "backward" in seen or e.region == "end" else "backward", None)
        moments.setdefault(key, []).append(k)
    out = {}
    for key, ks in moments.items():
        top = max(range(len(ks)), key=lambda j: replay.held[ks[j]])  # the first most gathered
        storages = [ev for k in ks for ev in replay.storages[k]]
        split = sum(len(replay.storages[k]) for k in ks[:top + 1])
        out[key] = (tuple(storages), split)
    return out
