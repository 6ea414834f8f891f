"""What FSDP2 (`fully_shard` on every decoder layer, then on the model: memplan train through accelerate's
`fsdp_version: 2`) allocates on each GPU, on which stream, in the order a training step's stream
(`memplan.estimator.stream`) needs it. From torch/distributed/fsdp/_fully_shard (`_fsdp_param.py`,
`_fsdp_param_group.py`, `_fsdp_collectives.py`, torch 2.x) and accelerate's `fsdp2_load_full_state_dict`; the order
as two gloo ranks allocate it (benchmarks/fsdp_stream_check.py):

- loading (accelerate, `fsdp_cpu_ram_efficient_loading`): parameter by parameter, the whole tensor is made on the
  GPU (rank 0 copies it there, the others receive it by broadcast), the previous one dropped, then this rank's
  shard is made (`distribute_tensor`): dim 0 split in `world` chunks, padded to equal ones;
- a unit's unshard: its all-gather output, one flat buffer of every shard, on the all-gather copy-in stream
  (`foreach_all_gather`: `get_all_gather_streams` picks the copy-in stream in the forward and the pre-backward);
  then each parameter's unsharded storage on the default stream (`alloc_storage`), copied out of it;
- the forward keeps a unit's all-gather output until the next unit has copied out its own
  (`comm_ctx.all_gather_state`); FULL_SHARD frees each layer's parameters after its forward (`reshard`), and the
  root's after the loss, which transformers computes inside the model's forward; then the last all-gather output;
- the backward: the root gathers again (FULL_SHARD), frees its all-gather output once copied out, and each unit
  prefetches the next one's (`_backward_prefetch`); a unit's pre-backward copies out its parameters and frees the
  all-gather output;
- a unit's post-backward: its parameters freed, the previous reduce-scatter input freed
  (`reduce_scatter_max_input_buffers` = 1), its own made on the default stream (`foreach_reduce`: the gradients
  copied in, dim 0 padded), the whole gradients freed, the reduce-scatter output made on the reduce-scatter stream;
  the sharded gradients are views of it, kept until `zero_grad` (a later micro-batch adds into them and frees its
  own). The root's post-backward comes last; its reduce-scatter input is freed as the backward ends.

Deferring the reduce-scatter to the last micro-batch (Plan.defers_gradient_reduction,
`set_requires_gradient_sync(False)`, as transformers' Trainer runs accumulation unless accelerate's sync_each_batch
is set): a unit's post-backward only reshards; its whole gradients stay on the unsharded parameters, the next
micro-batches' are added into them in place (AccumulateGrad), and the last micro-batch's post-backward
reduce-scatters them. accelerate's policy reduces in the gradients' own dtype, so `to_accumulated_grad_if_needed`
copies nothing.

Under autocast's mixed-precision policy (Plan.fsdp_mixed_precision) the shards are fp32: each unshard first copies
them to one flat tensor in the compute dtype, freed once copied into the all-gather output, and each reduce-scatter
output is cast to fp32 on the reduce-scatter stream (`_to_dtype_if_needed`), the bf16 one freed.

With CPU offload (`CPUOffloadPolicy`, Plan.offload optimizer+params, FULL_SHARD) the shards, their gradients and
the optimizer live in host memory, so on the GPU:
- loading: each shard made on the GPU is moved to the host at once (accelerate's `cpu_offload`: `tensor.to("cpu")`);
- a unit's unshard: each parameter's shard copied to the GPU first (`FSDPParam.all_gather_inputs`:
  `sharded_param_data.to(device)`, on the copy-in stream; under a mixed-precision policy then cast, the copy freed),
  one tensor per parameter (`use_foreach_copy` is off with offload), freed once copied into the all-gather output;
- a unit's post-backward: the reduce-scatter output copied to the host gradient (`new_sharded_grad.to("cpu")`) and
  freed; no gradients, masters, states or step on the GPU.

Over a 4-bit base (QLoRA; memplan train stores the packed weights in the compute dtype so that FSDP shards them,
runtime.hf.quantization_config) each quantized weight is a column of packed bytes in that dtype, sharded, gathered
and freed like any frozen parameter, never cast by a mixed-precision policy; its quantization state stays whole on
the module (`packed_nf4`). accelerate cannot load such a model on the meta device, so each rank loads it whole
(`load_whole`).

The first decoder layer's input needs no gradient where the embeddings are frozen and nothing is checkpointed: no
hook on it runs its post-backward, which the backward's final callback runs after the root's (the stream's order).

Replayed: FULL_SHARD and SHARD_GRAD_OP on several processes, full fine-tuning, LoRA and QLoRA, bf16, bf16-master
(with the optimizer's fp32 masters of the shards), fp32 and autocast, and CPU offload. The offload events and a
4-bit base's load follow torch's, accelerate's and bitsandbytes' source; the gloo check runs on CPU ranks, where a
copy to the "device" is no copy, and starts measuring after the load. NCCL's own buffers live outside the caching
allocator (`overhead.NCCL_BYTES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memplan.catalog.spec import ModelSpec
from memplan.estimator import states
from memplan.plan import Plan

# The caching allocator's streams (memplan.estimator.allocator: each keeps its own pools)
DEFAULT_STREAM = 0
ALL_GATHER_STREAM = 1  # FSDPCommContext.all_gather_copy_in_stream: where all-gather outputs are allocated
REDUCE_SCATTER_STREAM = 2  # FSDPCommContext.reduce_scatter_stream: where reduce-scatter outputs are allocated


def replayable(plan: Plan) -> str | None:
    """None where the stream follows FSDP2 for the plan; else why not."""
    if plan.zero not in (2, 3):
        return "FSDP without sharded parameters is not replayed"
    return None


@dataclass(frozen=True)
class _Param:
    shape: tuple[int, ...]
    itemsize: int  # gathered, and its gradient as autograd makes it
    trainable: bool
    stored: int  # the shard's (a mixed-precision policy gathers copies of fp32 shards)
    state: int = 0  # a 4-bit weight's quantization state, whole on every rank (bytes)

    def shard_numel(self, world: int) -> int:
        """dim 0 in `world` equal chunks, padded (FSDPParam.padded_sharded_param_size)."""
        return math.ceil(self.shape[0] / world) * math.prod(self.shape[1:])


def packed_nf4(numel: int, storage_itemsize: int) -> _Param:
    """A frozen 4-bit weight as FSDP sees it: bitsandbytes' packed storage, two weights per byte in a column of the
    storage dtype (functional.quantize_4bit: shape ((numel + 1) // (2 * itemsize), 1)), gathered as stored, with its
    quantization state beside it."""
    return _Param(((numel + 1) // (2 * storage_itemsize), 1), storage_itemsize, False, storage_itemsize,
                  states.nf4_state_bytes(numel))


class FullyShard:
    """The events FSDP2 adds to the step's stream (`st`: memplan.estimator.stream._Step). Units are decoder layer
    indices, and ROOT."""

    ROOT = -1

    def __init__(self, spec: ModelSpec, plan: Plan, weight_itemsize: int, trainable_itemsize: int,
                 targets: frozenset[str], shard_itemsize: int = 0, storage_itemsize: int = 2) -> None:
        """Itemsizes as gathered; `shard_itemsize` the shards' under a mixed-precision policy (0: none);
        `storage_itemsize` a 4-bit base's packed storage (the compute dtype, runtime.hf.quantization_config)."""
        self.world = plan.world_size
        self.reshard_after_forward = plan.zero == 3
        self.defer = plan.defers_gradient_reduction
        self._micro, self._last = 0, True  # the micro-batch that runs, and whether it is the step's last
        self.mixed_precision = bool(shard_itemsize)
        self.offload = plan.offload != "none"  # CPUOffloadPolicy: shards, their gradients and the step on the host
        self.full = full = plan.method == "full"

        self.quantized = plan.quantized_base == "nf4"

        def params(listed) -> list[_Param]:
            out = []
            for shape, role in listed:
                if self.quantized and role == "linear":
                    out.append(packed_nf4(math.prod(shape), storage_itemsize))
                    continue
                itemsize = trainable_itemsize if full or role == "adapter" else weight_itemsize
                out.append(_Param(shape, itemsize, full and role != "frozen" or role == "adapter",
                                  shard_itemsize or itemsize))
            return out
        root, layers = states.unit_parameters(spec, frozenset() if full else targets, plan.lora.rank)
        self.root = params(root)
        self.layers = [params(layer) for layer in layers]
        self._leading = 2 if spec.position_embeddings else 1  # the root's tensors before the decoder layers
        self._gathered: dict[int, list[int]] = {}  # unit -> its unsharded parameters' ids
        self._all_gather: dict[int, int] = {}  # unit -> its all-gather output's id, until freed
        self._kept_all_gather: int | None = None  # the last forward all-gather output (all_gather_state)
        self._reduce_scatter_input: int | None = None
        self._grads: dict[int, list[int]] = {}  # unit -> its whole gradients, as autograd makes them
        self._current = self.ROOT  # the unit whose backward runs
        self.sharded_grads: list[int] = []

    def _unit(self, u: int) -> list[_Param]:
        return self.root if u == self.ROOT else self.layers[u]

    @property
    def sharded_tensors(self) -> states.Tensors:
        """This rank's trainable shards: what the optimizer steps on (on the host, with offload)."""
        shapes = tuple((math.ceil(p.shape[0] / self.world), *p.shape[1:])
                       for unit in (*self.layers, self.root) for p in unit if p.trainable)
        return states.Tensors(shapes, (), 0)

    # ---------------------------------------------------------------- loading

    def _model_order(self) -> list[_Param]:
        """The parameters in the model's order: the root's leading tensors, the decoder layers, the rest of the root."""
        lead = self._leading
        return self.root[:lead] + [p for layer in self.layers for p in layer] + self.root[lead:]

    def load(self, st) -> None:
        """fsdp2_load_full_state_dict: the whole tensor, the previous one dropped as the loop rebinds it, the shard;
        in the model's order. A 4-bit base is loaded whole instead (`load_whole`)."""
        if self.quantized:
            self.load_whole(st)
            return
        previous = None
        for p in self._model_order():
            full = st.alloc(math.prod(p.shape) * p.stored)
            st.free(previous)
            shard = st.alloc(p.shard_numel(self.world) * p.stored)
            if self.offload:  # moved to the host
                st.free(shard)
            previous = full
        st.free(previous)

    def load_whole(self, st) -> None:
        """A 4-bit base, as accelerate prepares it (fsdp2_prepare_model: no cpu_ram_efficient_loading for
        Params4bit): every rank quantizes the whole model onto its GPU as it loads (device_map), base weights first,
        each 4-bit weight with its quantization state, then peft's adapters; fully_shard makes each unit's shards,
        the decoder layers first, then the root; the whole tensors, still held by the state dict accelerate took
        before sharding, are freed together once it is done. The quantization states stay (on the modules)."""
        base = [p for p in self._model_order() if not (p.trainable and not self.full)]
        adapters = [p for p in self._model_order() if p.trainable and not self.full]
        whole = []
        for p in base + adapters:
            whole.append(st.alloc(math.prod(p.shape) * p.stored))
            if p.state:
                st.alloc(p.state)
        for unit in (*self.layers, self.root):
            for p in unit:
                shard = st.alloc(p.shard_numel(self.world) * p.stored)
                if self.offload:  # moved to the host (FSDPParam._init_sharded_param, offload_to_cpu)
                    st.free(shard)
        st.free(*whole)

    # ---------------------------------------------------------------- gathering

    def _all_gather_output(self, st, u: int) -> int:
        """Under a mixed-precision policy the shards are first copied to the gathered dtype, one flat tensor
        (`_get_param_all_gather_inputs`' foreach copy), freed once copied into the output. Offloaded, each shard is
        first copied to the GPU, one tensor per parameter (then cast, the copy freed), all freed once copied in."""
        unit = self._unit(u)
        nbytes = sum(p.shard_numel(self.world) * p.itemsize for p in unit)
        if self.offload:
            inputs = []
            for p in unit:
                copy = st.alloc(p.shard_numel(self.world) * p.stored, ALL_GATHER_STREAM)
                if p.stored != p.itemsize:
                    cast = st.alloc(p.shard_numel(self.world) * p.itemsize, ALL_GATHER_STREAM)
                    st.free(copy)
                    copy = cast
                inputs.append(copy)
        else:  # the foreach copy casts the shards stored in another dtype (FSDPParam.param_dtype None for the rest)
            cast = sum(p.shard_numel(self.world) * p.itemsize for p in unit if p.stored != p.itemsize)
            inputs = [st.alloc(cast, ALL_GATHER_STREAM)] if self.mixed_precision and cast else []
        out = st.alloc(nbytes * self.world, ALL_GATHER_STREAM)
        st.free(*inputs)
        return out

    def _copy_out(self, st, u: int) -> None:
        self._gathered[u] = [st.alloc(p.shard_numel(self.world) * self.world * p.itemsize) for p in self._unit(u)]

    def _reshard(self, st, u: int) -> None:
        st.free(*self._gathered.pop(u, ()))

    def pre_forward(self, st, u: int) -> None:
        """A unit's forward: gathered (unless still unsharded, SHARD_GRAD_OP), the previous all-gather output freed."""
        if u in self._gathered:
            return
        ag = self._all_gather_output(st, u)
        self._copy_out(st, u)
        st.free(self._kept_all_gather)
        self._kept_all_gather = ag

    def post_forward(self, st, u: int) -> None:
        if self.reshard_after_forward:
            self._reshard(st, u)

    def forward_end(self, st) -> None:
        """The root's post-forward, after the loss: its parameters (FULL_SHARD), then the last all-gather output."""
        self.post_forward(st, self.ROOT)
        st.free(self._kept_all_gather)
        self._kept_all_gather = None

    def _prefetch(self, st, u: int) -> None:
        if u not in self._gathered and u not in self._all_gather:
            self._all_gather[u] = self._all_gather_output(st, u)

    def pre_backward(self, st, u: int) -> None:
        """Copy out the unit (gathered now or prefetched), free its all-gather output, prefetch the next unit."""
        if u not in self._gathered:
            self._prefetch(st, u)
            self._copy_out(st, u)
            st.free(self._all_gather.pop(u))
        self._current = u
        following = len(self.layers) - 1 if u == self.ROOT else u - 1
        if following >= 0:
            self._prefetch(st, following)

    def start_micro_batch(self, micro: int, last: bool) -> None:
        self._micro, self._last = micro, last

    def keep_grad(self, g: int) -> bool:
        """A parameter's whole gradient, made by autograd in the backward of the unit that runs: kept, or False
        where it is added in place into the one a deferred micro-batch left (the caller frees it)."""
        if self.defer and self._micro > 0:
            return False
        self._grads.setdefault(self._current, []).append(g)
        return True

    def post_backward(self, st, u: int) -> None:
        """Reshard, reduce-scatter the unit's whole gradients, keep the sharded ones; the root's backward goes on
        (the embedding's gradient). Deferred, the micro-batches before the last only reshard."""
        self._reshard(st, u)
        self._current = self.ROOT
        if self.defer and not self._last:
            return
        st.free(self._reduce_scatter_input)
        self._reduce_scatter_input = None
        trainable = [p for p in self._unit(u) if p.trainable]
        if not trainable:
            return
        nbytes = sum(p.shard_numel(self.world) * self.world * p.itemsize for p in trainable)
        self._reduce_scatter_input = st.alloc(nbytes)
        st.free(*self._grads.pop(u, ()))
        out = st.alloc(nbytes // self.world, REDUCE_SCATTER_STREAM)
        if self.mixed_precision:  # reduced in the gathered dtype, then cast to the shards' (`_to_dtype_if_needed`)
            cast = st.alloc(sum(p.shard_numel(self.world) * p.stored for p in trainable), REDUCE_SCATTER_STREAM)
            st.free(out)
            out = cast
        if self.offload:  # copied to the host gradient
            st.free(out)
        elif self._micro == 0 or self.defer:  # the step's first reduce-scatter makes the sharded gradients
            self.sharded_grads.append(out)
        else:  # added into the sharded gradients
            st.free(out)

    def backward_end(self, st) -> None:
        st.free(self._reduce_scatter_input)
        self._reduce_scatter_input = None

    def zero_grad(self, st) -> None:
        st.free(*self.sharded_grads)
        self.sharded_grads = []
