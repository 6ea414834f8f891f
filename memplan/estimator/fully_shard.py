"""What FSDP2 allocates on each GPU, on which stream, in the order a training step's stream
(`memplan.estimator.stream`) needs it, in the units accelerate's `fsdp_version: 2` makes (memplan.runtime.fsdp: every
decoder layer; the input embeddings; the tail, the final norm with lm_head, or tied the final norm with the
embeddings, never resharded after its forward; the model, the root, holding the rest). From
torch/distributed/fsdp/_fully_shard (`_fsdp_param.py`, `_fsdp_param_group.py`, `_fsdp_collectives.py`,
`_fsdp_state.py`, torch 2.x) and accelerate's `fsdp2_load_full_state_dict`; the order as two gloo ranks allocate it
(benchmarks/fsdp_stream_check.py):

- loading (accelerate, `fsdp_cpu_ram_efficient_loading`): parameter by parameter, the whole tensor is made on the
  GPU (rank 0 copies it there, the others receive it by broadcast), the previous one dropped, then this rank's
  shard is made (`distribute_tensor`): dim 0 split in `world` chunks, padded to equal ones;
- a unit's unshard: its all-gather output, one flat buffer of every shard, on the all-gather copy-in stream
  (`foreach_all_gather`: `get_all_gather_streams` picks the copy-in stream in the forward and the pre-backward);
  then each parameter's unsharded storage on the default stream (`alloc_storage`), copied out of it;
- the forward gathers the root, then the embeddings (tied: the tail, whose embeddings run first), the layers, the
  tail (at the final norm; under LoRA a Llama's at lm_head: peft hides its norm from accelerate); it keeps a unit's
  all-gather output until the next unit has copied out its own (`comm_ctx.all_gather_state`); FULL_SHARD frees each
  layer's and the embeddings' parameters after their forward (`reshard`); the last all-gather output goes after the
  loss, which transformers computes inside the model's forward;
- the backward: a unit's pre-backward (a hook on its output's gradient; the tail's on the logits') copies out its
  parameters, frees the all-gather output and prefetches the unit whose forward ended before its own
  (`_backward_prefetch`: the tail prefetches the last layer, the first layer the embeddings);
- a unit's post-backward: its parameters freed, the previous reduce-scatter input freed
  (`reduce_scatter_max_input_buffers` = 1), its own made on the default stream (`foreach_reduce`: the gradients
  copied in, dim 0 padded), the whole gradients freed, the reduce-scatter output made on the reduce-scatter stream;
  the sharded gradients are views of it, kept until `zero_grad` (a later micro-batch adds into them and frees its
  own). It runs on the gradient of the unit's input: the tail's after the final norm's backward (after lm_head's
  under LoRA); a unit whose input needs no gradient (the root, the embeddings, a tied tail, the first layer without
  trained embeddings or checkpointing) has it run by the backward's final callback, unit by unit in module order,
  with the release of an all-gather prefetched for a unit whose backward never ran (`finalize_backward`); the last
  reduce-scatter input is freed as the backward ends.

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
from memplan.estimator.activations import loss_chunks
from memplan.plan import Plan

# The caching allocator's streams (memplan.estimator.allocator: each keeps its own pools)
DEFAULT_STREAM = 0
ALL_GATHER_STREAM = 1  # FSDPCommContext.all_gather_copy_in_stream: where all-gather outputs are allocated
REDUCE_SCATTER_STREAM = 2  # FSDPCommContext.reduce_scatter_stream: where reduce-scatter outputs are allocated


def replayable(plan: Plan) -> str | None:
    """None where the stream follows FSDP2 for the plan; else why not. Liger's fused loss reads lm_head's weight
    without calling it, so FSDP2 runs the tail unit's group in part, untraced (the chunked loss, which calls lm_head
    once per chunk, is: `backward_start`)."""
    if plan.zero not in (2, 3):
        return "FSDP without sharded parameters is not replayed"
    if plan.liger_loss:
        return "FSDP2 runs the tail unit (final norm, lm_head) in part under Liger's loss, which never calls lm_head"
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
    indices, EMBED (the input embeddings, untied), TAIL (the final norm and lm_head; tied: the final norm and the
    embeddings) and ROOT (the rest), as accelerate makes them (memplan.runtime.fsdp); a unit without parameters has
    no events."""

    ROOT, EMBED, TAIL = -1, -2, -3

    def __init__(self, spec: ModelSpec, plan: Plan, weight_itemsize: int, trainable_itemsize: int,
                 targets: frozenset[str], shard_itemsize: int = 0, storage_itemsize: int = 2) -> None:
        """Itemsizes as gathered; `shard_itemsize` the shards' under a mixed-precision policy (0: none);
        `storage_itemsize` a 4-bit base's packed storage (the compute dtype, runtime.hf.quantization_config)."""
        self.world = plan.world_size
        self.reshard_after_forward = plan.zero == 3  # the layers' and the embeddings'; never the tail's or root's
        self.defer = plan.defers_gradient_reduction
        self._micro, self._last = 0, True  # the micro-batch that runs, and whether it is the step's last
        self.mixed_precision = bool(shard_itemsize)
        self.offload = plan.offload != "none"  # CPUOffloadPolicy: shards, their gradients and the step on the host
        self.full = full = plan.method == "full"
        self.chunked = loss_chunks(plan) > 1  # lm_head called once per chunk (`backward_start`)

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
        units = states.fsdp_units(spec, frozenset() if full else targets, plan.lora.rank, peft=not full)
        self.layers = [params(layer) for layer in units.layers]
        self.units = {self.EMBED: params(units.embed), self.TAIL: params(units.tail), self.ROOT: params(units.root)}
        self.tied = not units.embed
        self.tail_norm = units.tail_norm  # the tail's forward starts at the final norm, else at lm_head
        frozen = [((spec.params_frozen,), "frozen")] if spec.params_frozen else []
        self._model_order = params(states.module_parameters(spec, frozenset() if full else targets, plan.lora.rank)
                                   + frozen)
        self._post_forward_order: list[int] = []  # units in the order their post-forward ran (backward prefetch)
        self._pending: set[int] = set()  # units whose post-backward has not run in this backward
        self._gathered: dict[int, list[int]] = {}  # unit -> its unsharded parameters' ids
        self._all_gather: dict[int, int] = {}  # unit -> its all-gather output's id, until freed
        self._kept_all_gather: int | None = None  # the last forward all-gather output (all_gather_state)
        self._reduce_scatter_input: int | None = None
        self._grads: dict[int, list[int]] = {}  # unit -> its whole gradients, as autograd makes them
        self._current = self.ROOT  # the unit whose backward runs
        self.sharded_grads: list[tuple[int, int]] = []  # (unit, its reduce-scatter output)

    def _unit(self, u: int) -> list[_Param]:
        return self.units[u] if u < 0 else self.layers[u]

    def _all_units(self) -> list[int]:
        """The units in the order fully_shard makes them (the layers, the embeddings, the tail, the root) that
        hold parameters."""
        return [u for u in (*range(len(self.layers)), self.EMBED, self.TAIL, self.ROOT) if self._unit(u)]

    def _state_order(self) -> list[int]:
        """The units in the order of the root's named_modules (FSDPStateContext.all_states): the root, the
        embeddings (tied: the tail, at the embeddings), the layers, the tail."""
        head = [self.TAIL] if self.tied else [self.EMBED]
        tail = [] if self.tied else [self.TAIL]
        return [u for u in (self.ROOT, *head, *range(len(self.layers)), *tail) if self._unit(u)]

    def _optimizer_order(self) -> list[int]:
        """The units by their last parameter in the model's (the optimizer's) order: the embeddings, the root's
        (its position embeddings; its other tensors, rare, come after the layers, which no replay notices), the
        layers, the tail (tied: where its last parameter is, the final norm or the embeddings)."""
        first = [self.EMBED] if not self.tied else [] if self.tail_norm else [self.TAIL]
        last = [self.TAIL] if not self.tied or self.tail_norm else []
        return [*first, self.ROOT, *range(len(self.layers)), *last]

    @property
    def sharded_tensors(self) -> states.Tensors:
        """This rank's trainable shards: what the optimizer steps on (on the host, with offload)."""
        shapes = tuple((math.ceil(p.shape[0] / self.world), *p.shape[1:])
                       for u in self._optimizer_order() for p in self._unit(u) if p.trainable)
        return states.Tensors(shapes, (), 0)

    # ---------------------------------------------------------------- loading

    def load(self, st) -> None:
        """fsdp2_load_full_state_dict: the whole tensor, the previous one dropped as the loop rebinds it, the shard;
        in the model's order. A 4-bit base is loaded whole instead (`load_whole`)."""
        if self.quantized:
            self.load_whole(st)
            return
        previous = None
        for p in self._model_order:
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
        in the order it wraps them; the whole tensors, still held by the state dict accelerate took before
        sharding, are freed together once it is done. The quantization states stay (on the modules)."""
        base = [p for p in self._model_order if not (p.trainable and not self.full)]
        adapters = [p for p in self._model_order if p.trainable and not self.full]
        whole = []
        for p in base + adapters:
            whole.append(st.alloc(math.prod(p.shape) * p.stored))
            if p.state:
                st.alloc(p.state)
        for u in self._all_units():
            for p in self._unit(u):
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
        """A unit's forward: gathered (unless still unsharded: SHARD_GRAD_OP, the tail, the root), the previous
        all-gather output freed once this one is copied out."""
        if u in self._gathered or not self._unit(u):
            return
        ag = self._all_gather_output(st, u)
        self._copy_out(st, u)
        st.free(self._kept_all_gather)
        self._kept_all_gather = ag
        self._pending.add(u)

    def post_forward(self, st, u: int) -> None:
        """Resharded (FULL_SHARD's layers and embeddings); recorded for the backward's prefetch."""
        if not self._unit(u):
            return
        if self.reshard_after_forward and u not in (self.TAIL, self.ROOT):
            self._reshard(st, u)
        self._post_forward_order.append(u)

    def forward_start(self, st) -> None:
        """The root's pre-forward, then the first unit to run: the embeddings' (tied: the tail's, whose embeddings
        run first)."""
        self._post_forward_order = []
        self.pre_forward(st, self.ROOT)
        self.pre_forward(st, self.TAIL if self.tied else self.EMBED)

    def embedded(self, st) -> None:
        """The embeddings' post-forward (untied; the tail's comes after lm_head)."""
        if not self.tied:
            self.post_forward(st, self.EMBED)

    def forward_end(self, st) -> None:
        """The tail's post-forward (after lm_head), the root's (after the loss, which transformers computes inside
        the model's forward), then the last all-gather output freed."""
        self.post_forward(st, self.TAIL)
        self.post_forward(st, self.ROOT)
        st.free(self._kept_all_gather)
        self._kept_all_gather = None

    def _prefetch(self, st, u: int) -> None:
        if u not in self._gathered and u not in self._all_gather:
            self._all_gather[u] = self._all_gather_output(st, u)

    def pre_backward(self, st, u: int) -> None:
        """Copy out the unit (gathered now or prefetched), free its all-gather output, prefetch the unit whose
        post-forward ran before this one's (`_backward_prefetch`)."""
        if not self._unit(u):
            return
        if u not in self._gathered:
            self._prefetch(st, u)
            self._copy_out(st, u)
            st.free(self._all_gather.pop(u))
        self._current = u
        at = self._post_forward_order.index(u)
        if at > 0:
            self._prefetch(st, self._post_forward_order[at - 1])

    def backward_start(self, st) -> None:
        """A loss that calls lm_head once per chunk leaves the tail's group run in part: FSDP2 reshards the tail as
        the backward starts (traced; `regather` then gathers it for the first chunk's recomputation)."""
        if self.chunked:
            self._reshard(st, self.TAIL)

    def regather(self, st, u: int) -> None:
        """The unit gathered again for a recomputation in the backward (`FSDPState._pre_forward` in PRE_BACKWARD)."""
        if u not in self._gathered and self._unit(u):
            ag = self._all_gather_output(st, u)
            self._copy_out(st, u)
            st.free(ag)

    def running(self, u: int) -> None:
        """The unit whose gradients autograd makes next (its own pre-backward may not run: the tail's gathered
        parameters, a frozen input's unit)."""
        self._current = u if self._unit(u) else self.ROOT

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
        """Reshard, reduce-scatter the unit's whole gradients, keep the sharded ones. Deferred, the micro-batches
        before the last only reshard."""
        if u not in self._pending:
            return
        self._pending.discard(u)
        self._reshard(st, u)
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
            self.sharded_grads.append((u, out))
        else:  # added into the sharded gradients
            st.free(out)

    def backward_end(self, st) -> None:
        """The backward's final callback (`_root_post_backward_final_callback`), unit by unit in the root's module
        order: the post-backward of each unit whose inputs needed no gradient (the root, the embeddings, the first
        layer without trained embeddings or checkpointing, a tied tail), then an all-gather a prefetch made for a
        unit that never ran its backward (`finalize_backward`); the last reduce-scatter input freed."""
        for u in self._state_order():
            self.post_backward(st, u)
            st.free(self._all_gather.pop(u, None))
        st.free(self._reduce_scatter_input)
        self._reduce_scatter_input = None
        self._current = self.ROOT

    def zero_grad(self, st) -> None:
        """Each unit's reduce-scatter output goes with the last of its sharded gradients, in the optimizer's
        parameter order (`_optimizer_order`)."""
        order = self._optimizer_order()
        st.free(*(out for _, out in sorted(self.sharded_grads, key=lambda unit_out: order.index(unit_out[0]))))
        self.sharded_grads = []
