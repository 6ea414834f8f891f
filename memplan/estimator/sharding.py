"""Data-parallel sharding (ZeRO / FSDP), CPU offload and the buffers they add, per GPU.

ZeRO paper (Rajbhandari et al. 2020, §5): stage 1 partitions optimizer states, stage 2 also gradients,
stage 3 also parameters, each by the data-parallel degree N. FSDP's SHARD_GRAD_OP ~ stage 2 and
FULL_SHARD ~ stage 3; NO_SHARD ~ DDP. Divisors are applied once per term; numbers are for the
most-loaded GPU (ceil of each partition).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from memplan.catalog.spec import ModelSpec
from memplan.estimator import zero3_gather
from memplan.estimator.layers import Numerics
from memplan.estimator.states import Tensors, trainable_itemsize, unsharded_quantization_bytes
from memplan.plan import Plan


@dataclass
class PerGpu:
    weights: int
    grads: int
    master: int
    opt_states: int
    opt_temps: int
    head_grads: int  # gradients of lm_head + final norm (the first the backward produces)
    grads_from: tuple[int, ...]  # [i]: gradients of decoder layers i..L-1 (what exists in layer i's backward)
    emb_grad: int  # the token embedding's gradient
    gathered_forward: int  # ZeRO-3 / FULL_SHARD: unsharded parameters in flight (at the loss, the decoder's end)
    gathered_backward: int  # ... at the start of the backward (the loss's)
    gathered_layers_forward: int  # ... inside a decoder layer's forward
    gathered_layers_backward: tuple[int, ...]  # [i]: ... inside decoder layer i's backward
    gathered_end: int  # ... at the end of the backward (the embedding's gradient)
    gathered_prefetch: int  # FSDP2: ... once the logits' gradient exists (0: no such moment)
    gathered_tail_reduce: int  # FSDP2: ... as the untied tail reduce-scatters
    # FSDP2's moments of most gathered bytes (0: none): as the first and the last decoder layer gather their
    # parameters in the forward, and as the tail (the final norm and lm_head) gathers its own after them
    unshard_first: int
    unshard_last: int
    unshard_tail: int
    # FSDP2: the gradients the backward's final callback reduce-scatters (the embeddings', a tied tail's, the
    # root's), whole until then, and their sharded part
    root_grads: int
    root_grads_sharded: int
    root_head_grads: int  # ... of which a tied tail's, whole through the layers' backward
    tail_reduce: int  # FSDP2: an untied tail's gradients, whole as its reduce-scatter input until the last layer's
    first_unit_grads: int  # FSDP2: the first layer's gradients, reduce-scatter input until the final callback's
    # FSDP2 under a mixed-precision policy: the final callback's reduce-scatters, their input (whole gradients,
    # gathered dtype), output and the output's cast to the shards' dtype
    root_reduce: int
    unit_grads: int  # FSDP2: a layer's gradients, whole until its reduce-scatter (the largest layer's)
    # FSDP2 deferring the reduce-scatter to the last micro-batch (Plan.defers_gradient_reduction; else 0 and ()):
    # every trainable parameter's whole gradient, and [i] those of decoder layers i..L-1
    deferred_grads: int
    deferred_from: tuple[int, ...]
    # DeepSpeed ZeRO-1/2: the gradients alive through the layers' backward (0: as the backward produces them) and in
    # the optimizer phase (the gradient partition its step reduced into)
    backward_grads: int
    step_grads: int
    buffers: int  # DDP gradient buckets, DeepSpeed reduce buckets
    host_bytes: int  # CPU RAM per node
    notes: list[str] = field(default_factory=list)
    # The buffers alive in the forward and in the optimizer phase, where they differ from `buffers` (None: the same):
    # DeepSpeed frees its reduce buckets as each reducing backward ends
    forward_buffers: int | None = None
    step_buffers: int | None = None
    # DeepSpeed ZeRO-1/2 with optimizer offload: what the reduction of lm_head's gradient holds beside every saved
    # activation (it is reduced as the next gradient arrives), and the gradients alive as the backward ends (the
    # embedding's being reduced); 0: not such a plan
    reduce_head: int = 0
    reduce_end: int = 0
    # gradients alive between optimizer steps too (DeepSpeed ZeRO-3's flat gradient partition); 0: none
    resting_grads: int = 0
    # unsharded parameters at the decoder's end, where they differ from gathered_forward (None: the same):
    # DeepSpeed ZeRO-3 gathers lm_head after it, and may release it before the loss
    gathered_decoder_end: int | None = None


#: DeepSpeed ZeRO-3's sub_group_size default (deepspeed/runtime/zero/config.py); memplan's ds_config leaves it
#: unless the plan sets it (Plan.deepspeed).
DEEPSPEED_SUB_GROUP_ELEMS = 1_000_000_000
#: DeepSpeed's ZeRO-3 defaults that are constants (deepspeed/runtime/zero/config.py), by Plan.deepspeed's names: what
#: the estimate counts where the plan leaves them unset (the buckets and the persistence threshold follow the
#: hidden size instead). The trainer-config reader and memplan train's check of a DeepSpeed file compare with them.
DEEPSPEED_ZERO3_DEFAULTS = {"sub_group_size": DEEPSPEED_SUB_GROUP_ELEMS,
                            "stage3_max_live_parameters": zero3_gather.MAX_LIVE_PARAMETERS,
                            "stage3_max_reuse_distance": zero3_gather.MAX_REUSE_DISTANCE}
#: The Plan.deepspeed sizes that apply below ZeRO-3 (the others are stage 3's alone)
DEEPSPEED_ALL_STAGES = frozenset({"reduce_bucket_size"})


def _part(x: int, n: int) -> int:
    return math.ceil(x / n)


def deepspeed_reduce_bucket_elems(spec: ModelSpec, plan: Plan) -> int:
    """The plan's reduce_bucket_size, else HF's "auto" DeepSpeed config: hidden_size**2 (transformers
    integrations/deepspeed.py)."""
    size = plan.deepspeed.reduce_bucket_size
    return spec.hidden_size ** 2 if size is None else size


def deepspeed_param_groups(spec: ModelSpec, plan: Plan, n: int) -> list[list[int]]:
    """This rank's partition (elements) of each trained parameter, by the optimizer's parameter group, in the order
    of named_parameters: one group, or with weight decay two, the 2-D weights and the rest (memplan.runtime.optim
    param_groups, as HF Trainer groups them)."""
    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import module_parameters

    trained = [shape for shape, role in module_parameters(spec, lora_targets(spec, plan), plan.lora.rank)
               if role == "adapter" or not plan.trains_adapters]
    groups = [trained] if plan.hparams.weight_decay <= 0 else \
        [[s for s in trained if len(s) >= 2], [s for s in trained if len(s) < 2]]
    return [[_part(math.prod(shape), n) for shape in group] for group in groups if group]


def split_sub_groups(partitions: list[int], sub_group_size: int = DEEPSPEED_SUB_GROUP_ELEMS) -> list[int]:
    """`_create_fp16_sub_groups` over one parameter group: the whole group where it is at most sub_group_size
    elements, else sub-groups closed once they reach it (so one may overshoot by a partition); the elements of
    each."""
    if sum(partitions) <= sub_group_size:
        return [sum(partitions)] if partitions else []
    groups, size = [], 0
    for k, numel in enumerate(partitions):
        size += numel
        if size >= sub_group_size or k == len(partitions) - 1:
            groups.append(size)
            size = 0
    return groups


def deepspeed_sub_groups(spec: ModelSpec, plan: Plan, n: int) -> list[int]:
    """ZeRO-3's optimizer sub-groups on one rank, in elements: each parameter group split by `split_sub_groups`
    (at the plan's sub_group_size, else DeepSpeed's default)."""
    cap = plan.deepspeed.sub_group_size
    cap = DEEPSPEED_SUB_GROUP_ELEMS if cap is None else cap
    return [size for group in deepspeed_param_groups(spec, plan, n) for size in split_sub_groups(group, cap)]


def deepspeed_step_fp32_grad_elems(spec: ModelSpec, plan: Plan, n_trainable: int, n: int, stage: int) -> int:
    """Elements of the fp32 gradient partition that DeepSpeed's bf16-master step holds at once.

    Stages 1-2: the whole partition (stage_1_and_2.py step(): one flat group). Stage 3 steps one sub-group
    at a time and releases its fp32 gradient before the next (stage3.py _release_sub_group): the largest
    (`deepspeed_sub_groups`)."""
    if stage < 3:
        return _part(n_trainable, n)
    return max(deepspeed_sub_groups(spec, plan, n), default=0)


def per_gpu(spec: ModelSpec, plan: Plan, tensors: Tensors, num: Numerics, *, weights: int, grads: int,
            master: int, opt_states: int, opt_temps: int) -> PerGpu:
    n = plan.world_size
    stage = plan.zero
    # FSDP on one GPU without offload is a plain process (Plan.fully_shards)
    ds, fsdp = plan.sharding == "deepspeed", plan.sharding == "fsdp" and (plan.world_size > 1 or plan.fully_shards)
    notes: list[str] = []
    g_item = grads // tensors.n_trainable if tensors.n_trainable else num.weights
    # a gradient as autograd makes it, whole: in the dtype the layers see (under FSDP's mixed-precision policy the
    # gathered one, which also reduce-scatters it (reduce_dtype) before the shard is cast to the parameter's)
    whole_item = trainable_itemsize(plan, num.weights, num.adapter)

    # Gradient sizes of each layer and of the head, for the backward's progression (grads_from below).
    trainable = _trainable_per_layer(spec, plan)
    if plan.method == "full":
        head_params = spec.params_final_norm + (spec.params_lm_head or spec.vocab_size * spec.hidden_size)
    else:
        head_params = 0
    head_grads = head_params * g_item
    emb_grad = spec.vocab_size * spec.hidden_size * g_item if plan.method == "full" else 0

    # Parameters sharded at rest: ZeRO-3 / FULL_SHARD, and FSDP's SHARD_GRAD_OP too (it reshards after the
    # backward; only between a unit's forward and its backward are its parameters whole).
    W = _part(weights, n) if stage == 3 or (fsdp and stage == 2) else weights
    # a 4-bit base's quantization states stay whole on the GPU, outside the parameters FSDP shards and offloads
    quant_states = unsharded_quantization_bytes(tensors, plan) if fsdp and stage in (2, 3) else 0
    if quant_states:
        W = _part(weights - quant_states, n) + quant_states
    # One decoder layer's parameters as gathered for compute: the frozen base weights are sharded and
    # gathered like trainable ones, so LoRA gathers them too (plus its adapters, in their own dtype).
    # The largest layer is the unit that bounds what is gathered at once.
    adapters = {g: trainable[g] * whole_item if plan.method != "full" else 0 for g in spec.layer_groups}
    unit = max(_gathered_layer(g, plan, num.compute) + adapters[g] for g in spec.layer_groups)
    adapters_all = sum(adapters[g] * g.count for g in spec.layer_groups)
    G = _part(grads, n) if stage >= 2 else grads
    M = _part(master, n) if stage >= 1 else master
    S = _part(opt_states, n) if stage >= 1 else opt_states
    TMP = _part(opt_temps, n) if stage >= 1 else opt_temps
    per_layer = (lambda x: _part(x, n)) if stage >= 2 else (lambda x: x)
    grads_from = list(itertools.accumulate(per_layer(trainable[spec.group_of(i)] * g_item)
                                           for i in reversed(range(spec.num_layers))))[::-1]
    if stage >= 2 and not ds:  # (DeepSpeed's autograd makes whole gradients; its buckets partition them)
        head_grads, emb_grad = _part(head_grads, n), _part(emb_grad, n)
    buffers = 0
    gathered_f = gathered_b = 0
    host = 0

    if n > 1 and plan.sharding == "ddp" or (fsdp and stage == 0 and n > 1):
        # DDP's Reducer keeps flat bucket buffers the size of all gradients unless
        # gradient_as_bucket_view=True (torch/nn/parallel/distributed.py); HF/accelerate leave it False.
        buffers += grads
        notes.append("DDP gradient buckets: one extra copy of the gradients (gradient_as_bucket_view=False).")
    backward_grads, step_grads = 0, None
    forward_buffers = step_buffers = None
    reduce_head = reduce_end = resting_grads = 0
    if ds and stage in (1, 2) and plan.quantized_base is None and plan.offload == "optimizer":
        # ZeRO-1 with accumulation keeps every whole gradient until the last micro-batch, whose hooks reduce them
        # one by one: each one reduced is among them (its clone in place of the one autograd added into)
        kept = G if stage == 1 and plan.grad_accum > 1 else 0
        reduced = _zero_offload_reduction(spec, plan, tensors, n, g_item, kept > 0)
        backward_grads = kept + reduced.layer
        reduce_head = kept + reduced.head if reduced.head else 0
        reduce_end = reduced.end
        G = G if stage == 1 else 0  # ZeRO-2 moves each reduced gradient to the host; ZeRO-1 keeps the whole ones
        step_grads, TMP = 0, 0
        M = 2 * _part(4 * tensors.n_trainable, n)  # the fp32 masters and gradient partition, in host RAM (below)
        buckets = 2 * deepspeed_reduce_bucket_elems(spec, plan) * g_item
        buffers += buckets + reduced.staging
        forward_buffers = reduced.staging + (buckets if stage == 1 and plan.grad_accum > 1 else 0)
        step_buffers = reduced.staging
        notes.append("DeepSpeed ZeRO-Offload: a GPU staging buffer of the largest gradient; each gradient leaves for "
                     "the host as its bucket reduces, beside a float64 copy of it for the gradient norm.")
    elif ds and stage in (1, 2) and plan.quantized_base is None and plan.offload == "none":
        backward_grads, step_grads, TMP, M = _zero_step(plan, tensors, n, G, g_item)
        if n > 1:
            # overlap_comm's two reduce buckets (stage_1_and_2.py setup_buckets), in the gradients' dtype, made at a
            # backward's first gradient and freed as a reducing one ends (ZeRO-1 with accumulation: the last)
            buffers += 2 * deepspeed_reduce_bucket_elems(spec, plan) * g_item
            forward_buffers = buffers if stage == 1 and plan.grad_accum > 1 else 0
            step_buffers = 0
    elif ds and stage == 3 and plan.quantized_base is None and plan.offload == "none":
        backward_grads, TMP, M, zero3_bucket = _zero3_step(spec, plan, tensors, n, G, g_item)
        buffers += zero3_bucket
        resting_grads = G
    elif ds:
        if stage >= 1:
            TMP = 0  # DeepSpeed runs its own fused/multi-tensor Adam: no foreach temporaries
            if plan.method == "full" and plan.precision == "bf16-master":
                # The fp32 gradient partition its fp32 master step needs exists only inside step():
                # stage_1_and_2.py converts the flat bf16 partition (`.to(fp32)`), frees the bf16 grads,
                # steps, then sets `single_partition_of_fp32_groups[i].grad = None` (stage3.py likewise per
                # sub-group). Counting it in every phase puts the estimate 14-16 % high on the CPU
                # (deepspeed_cpu_check.py). With optimizer offload the fp32 gradients are pinned host
                # buffers for the whole partition, allocated once, kept with the masters in host RAM (below).
                if plan.offload == "none":
                    TMP = 4 * deepspeed_step_fp32_grad_elems(spec, plan, tensors.n_trainable, n, stage)
                else:
                    M += _part(4 * tensors.n_trainable, n)
            elif plan.method == "full" and plan.precision == "fp32":
                # Its masters are a copy even of fp32 weights (`.detach().clone().to(fp32)` of the
                # partition), one copy: the second that ZeRO-2 once seemed to keep was the meter counting
                # DeepSpeed's meta tensors (see _zero_step, which the measured stages 1-2 use)
                M += _part(4 * tensors.n_trainable, n)
            if n > 1 and stage in (1, 2):
                buffers += deepspeed_reduce_bucket_elems(spec, plan) * num.compute
        if stage == 3 and plan.offload != "none" and plan.quantized_base is None:
            # ZeRO-3 offloading: the gradient partition is a pinned host buffer (stage3.py: grad_partitions_flat_buffer
            # on the offload device), the reduce bucket stays on the GPU for the run (measured with
            # `memplan profile --backend cpu`, benchmarks/results/deepspeed-gloo-2rank.jsonl)
            host += G * plan.gpus
            G = 0
            buffers += deepspeed_reduce_bucket_elems(spec, plan) * g_item
    if ds and stage == 3:
        # current + prefetched parameters, gathered in the compute dtype
        gathered_f = unit + zero3_gather.prefetch_bucket(spec, plan) * num.compute
        gathered_b = gathered_f + (0 if resting_grads else deepspeed_reduce_bucket_elems(spec, plan) * g_item)
    deferred, deferred_from = 0, ()
    gathered_layers_f = gathered_f
    decoder_end = None
    gathered_layers_b = [gathered_b] * spec.num_layers
    gathered_end = gathered_b
    if ds and stage == 3 and n == 1 and plan.quantized_base is None and plan.offload != "optimizer+params":
        # one process gathers nothing: each parameter's partition is the parameter (measured)
        gathered_f = gathered_b = gathered_layers_f = gathered_end = 0
        gathered_layers_b = [0] * spec.num_layers
    elif ds and stage == 3 and plan.quantized_base is None:
        # several: what DeepSpeed's coordinator holds gathered at each moment, prefetches and parameters kept for
        # their reuse included (memplan.estimator.zero3_gather)
        held = zero3_gather.moments(spec, plan, n, num.compute)
        bucket = 0 if resting_grads else deepspeed_reduce_bucket_elems(spec, plan) * g_item
        gathered_f, gathered_layers_f, gathered_end = held.forward_end, held.last_layer_forward, held.end + bucket
        decoder_end = held.decoder_end
        gathered_b = held.backward_start + bucket
        gathered_layers_b = [g + bucket for g in held.layers_backward]
    if plan.defers_gradient_reduction:
        # set_requires_gradient_sync(False) until the last micro-batch: each unit's post-backward only reshards, its
        # whole gradients (in the gathered dtype) stay on the unsharded parameters and the next micro-batches add
        # into them; the last one reduce-scatters them unit by unit
        deferred = tensors.n_trainable * whole_item
        deferred_from = tuple(itertools.accumulate(trainable[spec.group_of(i)] * whole_item
                                                   for i in reversed(range(spec.num_layers))))[::-1]
        notes.append("Gradient reduce-scatter deferred to the last micro-batch (sync_each_batch off): every layer's "
                     "whole gradients stay on each GPU between micro-batches.")
    f2, gathered_prefetch, gathered_tail_reduce = _Fsdp2(), 0, 0
    if fsdp and stage in (2, 3):
        f2 = _fsdp2(spec, plan, num, n, unit, adapters_all, whole_item, g_item, trainable)
        gathered_f, gathered_b, gathered_layers_f = f2.forward, f2.backward, f2.layers_forward
        gathered_prefetch, gathered_tail_reduce = f2.prefetch, f2.tail_reduce_gathered
        gathered_layers_b, gathered_end, decoder_end = list(f2.layers_backward), f2.end, f2.decoder_end

    if plan.offload != "none":
        # optimizer states, master weights (and DeepSpeed's fp32 grads) live in CPU RAM; the step runs there.
        host += (S + M) * plan.gpus
        S, M, TMP = 0, 0, 0
        notes.append("Optimizer states and master weights offloaded to CPU RAM; the step runs on the CPU.")
        if plan.offload == "optimizer+params":
            host += (W - quant_states) * plan.gpus
            W = quant_states
            if fsdp:  # FSDP CPUOffload also keeps sharded gradients on the CPU
                host += G * plan.gpus
                G = 0
    if ds and stage == 3 and plan.quantized_base is None and (n > 1 or plan.offload == "optimizer+params"):
        # the persistent parameters (norms, biases) stay whole on the GPU beside their partitions
        W += _persistent_bytes(spec, plan, num.compute)
    return PerGpu(weights=W, grads=G, master=M, opt_states=S, opt_temps=TMP, head_grads=head_grads,
                  grads_from=tuple(grads_from), emb_grad=emb_grad,
                  gathered_forward=gathered_f, gathered_backward=gathered_b, gathered_layers_forward=gathered_layers_f,
                  gathered_layers_backward=tuple(gathered_layers_b), gathered_end=gathered_end,
                  gathered_prefetch=gathered_prefetch, gathered_tail_reduce=gathered_tail_reduce,
                  unshard_first=f2.unshard_first, unshard_last=f2.unshard_last if spec.num_layers > 1 else 0,
                  unshard_tail=f2.unshard_tail, root_grads=f2.root_grads, root_grads_sharded=f2.root_grads_sharded,
                  root_head_grads=f2.root_head_grads, tail_reduce=f2.tail_reduce, unit_grads=f2.unit_grads,
                  first_unit_grads=f2.first_unit_grads, root_reduce=f2.root_reduce,
                  deferred_grads=deferred,
                  deferred_from=deferred_from, backward_grads=backward_grads,
                  step_grads=G if step_grads is None else step_grads,
                  buffers=buffers, host_bytes=host, notes=notes, forward_buffers=forward_buffers,
                  step_buffers=step_buffers, reduce_head=reduce_head, reduce_end=reduce_end,
                  resting_grads=resting_grads, gathered_decoder_end=decoder_end)


@dataclass(frozen=True)
class _Fsdp2:
    """What FSDP2 holds at its moments (memplan.estimator.fully_shard replays them event by event); 0: no FSDP2."""

    forward: int = 0  # gathered at the loss
    backward: int = 0  # ... as the loss's backward peaks
    prefetch: int = 0  # ... once the logits' gradient exists (the standard loss): the last layer's prefetched
    tail_reduce_gathered: int = 0  # ... as the untied tail reduce-scatters
    layers_forward: int = 0  # ... inside a decoder layer's forward
    layers_backward: tuple[int, ...] = ()  # [i]: inside layer i's backward
    end: int = 0  # ... at the embeddings' backward
    decoder_end: int | None = None  # ... at the decoder's end
    unshard_first: int = 0
    unshard_last: int = 0
    unshard_tail: int = 0
    root_grads: int = 0
    root_grads_sharded: int = 0
    root_head_grads: int = 0
    tail_reduce: int = 0
    first_unit_grads: int = 0
    unit_grads: int = 0
    root_reduce: int = 0


def _fsdp2(spec: ModelSpec, plan: Plan, num: Numerics, n: int, unit: int, adapters_all: int, whole_item: int,
           g_item: int, trainable: dict) -> _Fsdp2:
    """FSDP2 in accelerate's units (memplan.runtime.fsdp; torch/distributed/fsdp/_fully_shard: _fsdp_param_group.py,
    _fsdp_collectives.py; the order as traced on 2 gloo ranks, benchmarks/fsdp_stream_check.py). A unit being
    gathered is held twice: the all-gather output (one flat buffer) and the parameters copied out of it. The forward
    keeps a unit's all-gather output until the next unit has copied out its own; the backward frees it at once and
    prefetches the unit whose forward ran before. The root (what no other unit holds) gathers first; the input
    embeddings next (FULL_SHARD: resharded after their forward, gathered again for their backward); the tail (the
    final norm and lm_head; tied, with the embeddings, gathered as the forward starts) after the last layer, kept
    gathered into the backward until its post-backward, on the final norm's input gradient (on lm_head's alone under
    LoRA; tied, in the backward's final callback, with the root's and the embeddings')."""
    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import fsdp_units

    full = plan.method == "full"
    units = fsdp_units(spec, lora_targets(spec, plan), plan.lora.rank if not full else 0, peft=not full)

    def gathered(listed) -> int:
        return sum(math.prod(shape) * (whole_item if role == "adapter" else num.compute) for shape, role in listed)

    def grads(listed) -> int:
        return sum(math.prod(shape) for shape, role in listed if role != "frozen") if full else 0

    E, T, R = gathered(units.embed), gathered(units.tail), gathered(units.root)
    tied = not units.embed
    first = T if tied else E  # the unit the forward gathers after the root
    kept = T if tied else 0  # the tail, gathered through the decoder when tied
    final = grads(units.root) + grads(units.tail if tied else units.embed)  # reduced in the final callback
    tail = 0 if tied else grads(units.tail) * whole_item
    f = dict(root_grads=final * whole_item, root_grads_sharded=_part(final * g_item, n),
             root_head_grads=grads(units.tail) * whole_item if tied else 0, tail_reduce=tail,
             first_unit_grads=trainable[spec.group_of(0)] * whole_item,
             unit_grads=max(trainable[g] * whole_item for g in spec.layer_groups))
    if plan.fsdp_mixed_precision and final:  # (_fsdp_collectives.py foreach_reduce, _to_dtype_if_needed)
        f["root_reduce"] = final * whole_item + _part(final * whole_item, n) * (1 + num.stored_weights // whole_item)
    L = spec.num_layers
    if plan.zero == 3:
        # FULL_SHARD: inside a layer its parameters and an all-gather output (the previous layer's kept in the
        # forward, the next one prefetched in the backward: the first layer's prefetch is the embeddings'); as a
        # layer gathers, the previous one's output, its own and its parameters; the first beside the embeddings'
        # output (the root's before it); the untied tail beside the last layer's. The tail's pre-backward
        # prefetches the last layer once the logits' gradient exists: after the standard loss's peak (under a
        # chunked or Liger loss, counted at that peak)
        standard = plan.loss == "standard" and not plan.liger_loss
        return _Fsdp2(forward=R + T + (unit if tied else T), backward=R + T + (0 if standard else unit),
                      prefetch=R + T + unit if standard else 0, tail_reduce_gathered=R + unit,
                      layers_forward=R + kept + 2 * unit,
                      layers_backward=(R + kept + unit + (0 if tied else E),) + (R + kept + 2 * unit,) * (L - 1),
                      end=R + first, decoder_end=R + kept + unit,
                      unshard_first=max(2 * R + 2 * first, R + first + kept + 2 * unit),
                      unshard_last=R + kept + 3 * unit, unshard_tail=0 if tied else R + unit + 2 * T, **f)
    return _shard_grad_op(spec, plan, num, unit, adapters_all, whole_item, trainable, R=R, T=T, first=first,
                          kept=kept, grads=f)


def _shard_grad_op(spec: ModelSpec, plan: Plan, num: Numerics, unit: int, adapters_all: int, whole_item: int,
                   trainable: dict, *, R: int, T: int, first: int, kept: int, grads: dict) -> _Fsdp2:
    """SHARD_GRAD_OP: every unit stays unsharded from its forward to its post-backward, so the forward ends with a
    whole replica gathered, plus the tail's all-gather output (tied: the last layer's); the backward starts with the
    replica, the untied tail's and each layer's post-backward reshard them, and it ends with the root and the
    embeddings (or the tied tail). `R`, `T`: the root's and the tail's gathered bytes; `first`: the unit gathered
    after the root; `kept`: the tied tail (0 untied)."""
    L, tied = spec.num_layers, bool(kept)
    layers = sum(g.params * g.count for g in spec.layer_groups)
    # (a multimodal model's frozen vision tower is the root's: gathered with it, though a text-only step never
    # calls it)
    replica = ((spec.params_total - layers + spec.params_frozen) * num.compute + adapters_all
               + sum(_gathered_layer(g, plan, num.compute) * g.count for g in spec.layer_groups))
    per_layer = [_gathered_layer(spec.group_of(i), plan, num.compute)
                 + (0 if plan.method == "full" else trainable[spec.group_of(i)] * whole_item) for i in range(L)]
    resharded_above = [sum(per_layer[i + 1:]) for i in range(L)]
    return _Fsdp2(forward=replica + (unit if tied else T), backward=replica, layers_forward=replica + unit,
                  layers_backward=tuple(replica - (0 if tied else T) - above for above in resharded_above),
                  end=R + first, tail_reduce_gathered=replica - T,
                  unshard_first=max(2 * R + 2 * first, R + 2 * first + 2 * unit),
                  unshard_last=replica - T + kept + 2 * unit, unshard_tail=0 if tied else replica + unit + T, **grads)


@dataclass(frozen=True)
class _OffloadReduction:
    staging: int  # temp_grad_buffer_for_gpu_offload
    head: int  # lm_head's gradient and the float64 copy of its part, as the first bucket reduces
    layer: int  # the largest decoder-layer gradient's, as it is reduced
    end: int  # the embedding's, as the backward's epilogue reduces it


def _zero_offload_reduction(spec: ModelSpec, plan: Plan, tensors: Tensors, n: int, g_item: int,
                            kept: bool) -> _OffloadReduction:
    """DeepSpeed ZeRO-1/2 with `offload_optimizer` on the GPU (deepspeed/runtime/zero/stage_1_and_2.py): no fp32
    masters, states, step or gradient partition there. What stays: a staging buffer the size of the largest
    trainable parameter in the gradients' dtype (`temp_grad_buffer_for_gpu_offload`, kept for the run; its host twin
    and the fp32 partitions are pinned host memory) and, in the reducing micro-batch, each gradient's moment of
    reduction (`copy_grads_in_partition`): the gradient (in a reduce bucket, or, larger than a bucket, cloned out of
    autograd's - `_offload_gradient_safety_enabled` - and reduced when the next gradient arrives), a float64 copy of
    this rank's part for its norm (`set_norm_for_param_grad_in_gpu`: `get_norm_dtype`), freed before the fp32 copy
    that goes to the host. The copies are of this rank's part only; the most loaded rank holds a whole lm_head or
    embedding where its partition does. `kept`: ZeRO-1 keeping the whole gradients, which count the one reduced
    (the head and layer moments give the float64 copy alone). Measured with `memplan profile --backend cpu` under
    DeepSpeed's CPU accelerator, its pinned buffers and the CPU step counted as host memory
    (benchmarks/results/deepspeed-gloo-2rank.jsonl)."""
    part = _part(tensors.n_trainable, n)
    bucket = deepspeed_reduce_bucket_elems(spec, plan)

    def reducing(numel: int, counted: bool = kept) -> int:
        held = numel * g_item if numel > bucket and not counted else 0  # a bucket's gradients are in the buckets
        return held + 8 * min(numel, part)

    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import fsdp_units

    trained = (lambda role: role != "adapter") if plan.method == "full" else (lambda role: role == "adapter")
    layers = fsdp_units(spec, lora_targets(spec, plan), plan.lora.rank if plan.method != "full" else 0).layers
    layer = max((reducing(math.prod(shape)) for params in layers for shape, role in params if trained(role)),
                default=0)
    # full fine-tuning: the embedding's gradient is the backward's last; an untied lm_head's its first
    vocab = spec.vocab_size * spec.hidden_size if plan.method == "full" else 0
    head = vocab if vocab and spec.params_lm_head and not spec.tie_word_embeddings else 0
    return _OffloadReduction(staging=max(tensors.trainable, default=0) * g_item, head=reducing(head) if head else 0,
                             layer=layer, end=reducing(vocab, counted=False) if vocab else 0)


def _zero_step(plan: Plan, tensors: Tensors, n: int, G: int, g_item: int) -> tuple[int, int, int, int]:
    """DeepSpeed ZeRO-1/2 on the GPU, full fine-tuning or adapters (deepspeed/runtime/zero/stage_1_and_2.py, as
    memplan's ds_config runs it: contiguous_gradients, overlap_comm, torch's AdamW over the fp32 partition): (the
    gradients alive through the layers' backward, those alive in the optimizer phase, the step's temporaries, the
    fp32 masters).

    The trained weights live in one flat 16-bit buffer; this rank's fp32 masters are a copy of its partition
    (`.detach().clone().to(fp32)`, also of fp32 weights). Each gradient autograd makes is copied into a reduce bucket
    and dropped; this rank's part of each reduced bucket is copied into `grads_in_partition`, one buffer of its
    partition allocated at the first copy (`copy_grads_in_partition`) and kept to the step. With accumulation a
    later micro-batch allocates a second one and adds it into the first at its backward's end (ZeRO-1 reduces only
    on the last micro-batch, the others keep every whole gradient, G): from the backward's first reduction - at
    its start on the rank owning lm_head - that buffer is alive beside the others. The step flattens the partition's
    gradients (`get_flat_partition`: a copy) and casts the copy to fp32, frees both 16-bit buffers, and runs the
    optimizer over the fp32 partition beside its fp32 gradient. Measured with `memplan profile --backend cpu`
    under DeepSpeed's CPU accelerator (benchmarks/results/deepspeed-gloo-2rank.jsonl)."""
    part = _part(tensors.n_trainable, n)
    partition = part * g_item  # grads_in_partition, and the step's flat copy of it
    fp32 = 4 * part if g_item < 4 else 0  # the copy cast (an fp32 plan's copy is fp32 already)
    from memplan.estimator.zero_optimizer import step_temporaries

    adam = step_temporaries(plan, part)
    temps = max(partition + fp32, (fp32 or partition) + adam - partition)
    backward = G + partition if plan.grad_accum > 1 else partition
    return backward, partition, temps, 4 * part


def _zero3_step(spec: ModelSpec, plan: Plan, tensors: Tensors, n: int, G: int,
                g_item: int) -> tuple[int, int, int, int]:
    """DeepSpeed ZeRO-3 on the GPU, full fine-tuning or adapters (deepspeed/runtime/zero/stage3.py, as memplan's
    ds_config runs it: contiguous_gradients, torch's AdamW over each fp32 sub-group): (the gradients alive through
    the backward, the step's temporaries, the fp32 masters, the reduce bucket).

    At initialization it allocates one flat buffer for this rank's gradient partition (`grad_partitions_flat_buffer`,
    in the gradients' dtype) and one reduce bucket (`ipg_buckets`), both kept for the run; its fp32 masters are this
    rank's partition (`_create_fp32_partitions`), also of adapters or fp32 weights. The step goes sub-group by
    sub-group: the partition's gradients copied flat in fp32 (`_prepare_fp32_grad_for_sub_group`: a copy for fp32
    gradients too), then torch's AdamW over it with its temporaries. Measured with `memplan profile --backend cpu` under
    DeepSpeed's CPU accelerator (benchmarks/results/deepspeed-gloo-2rank.jsonl)."""
    from memplan.estimator.zero_optimizer import step_temporaries

    part = _part(tensors.n_trainable, n)
    sub = deepspeed_step_fp32_grad_elems(spec, plan, tensors.n_trainable, n, 3)
    temps = 4 * sub + step_temporaries(plan, sub)
    return G, temps, 4 * part, deepspeed_reduce_bucket_elems(spec, plan) * g_item


def _persistent_bytes(spec: ModelSpec, plan: Plan, itemsize: int) -> int:
    """DeepSpeed ZeRO-3's persistent parameters, at most stage3_param_persistence_threshold elements each: never
    partitioned, kept whole (partition_parameters.py ds_persist)."""
    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import module_parameters

    threshold = zero3_gather.persistence_threshold(spec, plan)
    sizes = (math.prod(shape) for shape, _ in module_parameters(spec, lora_targets(spec, plan), plan.lora.rank))
    return sum(numel for numel in sizes if numel <= threshold) * itemsize


def _gathered_layer(group, plan: Plan, compute_itemsize: int) -> int:
    """One decoder layer's frozen or trained weights as a gather moves them: in the compute dtype, a quantized base's
    linears as stored (the packed NF4 parameter, which memplan train keeps in the compute dtype under FSDP so that it
    is sharded at all, without its quantization state; int8 as states.int8_bytes)."""
    if not plan.quantized_base:
        return group.params * compute_itemsize
    from memplan.estimator.states import int8_bytes, nf4_packed_bytes

    quantized = [(lin.d_out, lin.d_in) for lin in group.linears if lin.kind in ("linear", "conv1d")
                 for _ in range(lin.count)]
    plain = group.params - sum(o * i for o, i in quantized)
    packed = (nf4_packed_bytes(o * i) if plan.quantized_base == "nf4" else int8_bytes(o, i) for o, i in quantized)
    return plain * compute_itemsize + sum(packed)


def _trainable_per_layer(spec: ModelSpec, plan: Plan) -> dict:
    """Trainable parameters of one layer of each group: all of them (full FT) or its LoRA tensors."""
    if plan.method == "full":
        return {g: g.params for g in spec.layer_groups}
    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import layer_lora_tensors

    targets = lora_targets(spec, plan)
    return {g: sum(math.prod(t) for t in layer_lora_tensors(g.linears, targets, plan.lora.rank))
            for g in spec.layer_groups}


def checkpoint_bytes(tensors: Tensors, plan: Plan, num: Numerics, p_item: int) -> int:
    """A resumable checkpoint: trainable weights (and frozen ones for full FT: the model is saved whole, a
    multimodal model's frozen vision tower included) + optimizer states + masters."""
    from memplan.estimator.states import master_bytes, optimizer_state_bytes

    trainable = tensors.n_trainable * p_item
    frozen = tensors.frozen_plain * num.stored_weights if plan.method == "full" else 0
    return trainable + frozen + optimizer_state_bytes(tensors, plan, p_item) + master_bytes(tensors, plan)


def artifact_bytes(spec: ModelSpec, tensors: Tensors, plan: Plan) -> int:
    """The final artifact: the full model in 16-bit for full FT (a multimodal model's vision tower too), the
    adapter (fp32 as peft saves it) else."""
    if plan.method == "full":
        return 2 * (spec.params_total + spec.params_frozen)
    return 4 * tensors.n_trainable
