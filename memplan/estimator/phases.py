"""Composes the terms into per-phase memory for one GPU, and the peak over phases."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from functools import cached_property

from memplan.catalog.spec import ModelSpec
from memplan.estimator import activations as act_mod
from memplan.estimator import allocator, overhead, sharding, states, stream
from memplan.estimator import host as host_mod
from memplan.plan import Plan

PHASES = ("forward", "backward", "optimizer")

# Term names of the breakdown: a public interface (--json), keep them stable.
TERMS = (
    "weights", "master_weights", "gradients", "optimizer_states", "optimizer_temporaries",
    "activations", "logits_loss", "gathered_params", "comm_buffers", "workspace",
)


@dataclass
class Estimate:
    spec: ModelSpec
    plan: Plan
    params_trainable: int
    phases: dict[str, dict[str, int]]  # phase -> term -> bytes at that phase's peak
    host_bytes: int  # host RAM per node at its peak phase (memplan.estimator.host): what must fit the node
    disk: dict[str, int]
    gpu_memory: int | None = None
    notes: list[str] = field(default_factory=list)
    host: host_mod.HostEstimate | None = None  # host RAM by phase
    host_offload_bytes: int = 0  # of it, offloaded optimizer states / parameters per node
    # the load's allocated peak where it is known without replaying the stream (`loading_peak`), else 0
    load_allocated: int = 0

    @property
    def phase_peaks(self) -> dict[str, int]:
        return {p: sum(t.values()) for p, t in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        peaks = self.phase_peaks
        return max(peaks, key=peaks.get)

    @property
    def peak_allocated(self) -> int:
        return max(self.phase_peaks.values())

    @property
    def breakdown(self) -> dict[str, int]:
        return dict(self.phases[self.peak_phase])

    @cached_property
    def replayed(self) -> allocator.Replay | None:
        """The step's allocations (memplan.estimator.stream) served by the plan's caching allocator; None where the
        stream does not follow the plan (`reserved_basis` says why)."""
        return _replayed(self.spec, self.plan)

    @property
    def reserved_basis(self) -> str:
        """How `reserved` was found: "replayed" (the caching allocator model), else why the measured ratio."""
        why = stream.supported(self.spec, self.plan)
        if self.plan.device == "cpu":
            return why
        return "replayed" if self.replayed else f"measured ratio ({why})"

    @property
    def setup_allocated(self) -> int | None:
        """The allocated peak before the first step where it passes the steps' (DDP's broadcast as it wraps the
        model: the weights and two flat buckets; DeepSpeed's initialization: the flat weights and this rank's
        partition cloned beside them), which torch.cuda.max_memory_allocated over the whole run reports; None where
        the steps' peak is the run's, or nothing is replayed."""
        r = self.replayed
        if r is None or r.setup_allocated <= r.steps_allocated:
            return None
        return r.setup_allocated

    @property
    def least_total(self) -> int:
        """The least `total` can be, without replaying anything: reserved is never below the allocated peak, the
        steps' or the load's."""
        return max(self.peak_allocated, self.load_allocated) + overhead.cuda_context_bytes(self.plan)

    @property
    def reserved(self) -> int:
        """torch.cuda.max_memory_reserved(): the replayed allocator's peak, plus whatever the estimate counts that
        the stream does not allocate (the stream keeps the tensors the estimate names, not each kernel's scratch),
        both as requested (the remainders of blocks handed out whole are the allocator's, in its reserve already);
        the measured ratio where the stream does not follow the plan."""
        if self.plan.device == "cpu":  # no caching allocator: freed tensors go back to the heap
            return self.peak_allocated
        if self.replayed is None:
            return overhead.reserved_bytes(self.peak_allocated)
        unreplayed = self.peak_allocated - self.replayed.steps_requested
        return max(self.peak_allocated, self.replayed.peak_reserved + unreplayed)

    @property
    def total(self) -> int:
        return self.reserved + overhead.cuda_context_bytes(self.plan)

    def replayed_within(self, usable: int) -> allocator.Replay | None:
        """The step replayed by an allocator that may reserve only what a device of `usable` bytes leaves it: less
        the CUDA context and what the estimate holds beyond the stream's tensors. None where nothing is replayed."""
        if self.replayed is None:
            return None
        unreplayed = self.peak_allocated - self.replayed.steps_allocated
        return _replayed(self.spec, self.plan, max(0, usable - overhead.cuda_context_bytes(self.plan) - unreplayed))

    def total_within(self, usable: int) -> int:
        """The total on a device of `usable` bytes. Where `total` is over them but the allocated peak is not, a
        caching allocator with no more to reserve releases its cache and tries again before it reports out of
        memory (CUDACachingAllocator.cpp `malloc`: `release_cached_blocks`, then `alloc_block`): the step replayed
        so (`replayed_within`) is the total, within `usable` where it serves every request, else `total` still.
        Where even the allocated peak is over `usable`, that lower bound (`least_total`), replaying nothing."""
        least = self.least_total
        if least > usable:
            return least
        total = self.total
        if total <= usable or self.replayed is None:
            return total
        capped = self.replayed_within(usable)
        if capped.oom:
            return total
        unreplayed = self.peak_allocated - self.replayed.steps_allocated
        return max(self.peak_allocated, capped.peak_reserved + unreplayed) + overhead.cuda_context_bytes(self.plan)

    def cache_releases(self, usable: int) -> tuple[int, int]:
        """How often the allocator releases its cache to stay within `usable` bytes: (in the first step, in each
        step after it, the last replayed), (0, 0) where `total` is within them. Each release frees every cached
        segment (a synchronizing cudaFree) to cudaMalloc again: the step runs, more slowly; DeepSpeed warns of
        it, torch counts num_alloc_retries. The first step makes the optimizer's states, often the only one."""
        if self.least_total > usable or self.total <= usable or self.replayed is None:
            return 0, 0
        capped = self.replayed_within(usable)
        if capped.oom or not capped.step_releases:
            return 0, 0
        return capped.step_releases[0], capped.step_releases[-1]

    def to_json(self) -> dict:
        return {
            "plan": self.plan.model_dump(mode="json"),
            "params_trainable": self.params_trainable,
            "peak_allocated_bytes": self.peak_allocated,
            "reserved_bytes": self.reserved,
            "reserved_basis": self.reserved_basis,
            "total_bytes": self.total,
            "host_bytes": self.host_bytes,
            "host_peak_bytes": self.host_bytes,
            "host_peak_phase": self.host.peak_phase if self.host else None,
            "host_phases": self.host.to_json() if self.host else None,
            "host_offload_bytes": self.host_offload_bytes,
            "host_notes": self.host.notes if self.host else [],
            "setup_peak_allocated_bytes": self.setup_allocated,
            "peak_phase": self.peak_phase,
            "breakdown": self.breakdown,
            "overheads": {
                "allocator_reserve": self.reserved - self.peak_allocated,
                "cuda_context": overhead.cuda_context_bytes(self.plan),
            },
            "phase_peaks": self.phase_peaks,
            "disk": self.disk,
            "gpu_memory_bytes": self.gpu_memory,
        }


def _replayed(spec: ModelSpec, plan: Plan, capacity: int | None = None) -> allocator.Replay | None:
    """Replays by plan (and the allocator's `capacity`, None for none), for the process: a search and its report
    ask for the same plans again, and for plans that differ only where the stream does not (`stream.stream_plan`,
    and FlashAttention-2 where it saves what SDPA does: `stream.with_attention_as_streamed`).
    The stream is the same for both allocators; the last few are kept. Plans whose streams come out equal all the
    same share one replay: streams are told apart by a digest of their events."""
    plan = stream.with_attention_as_streamed(spec, stream.stream_plan(plan))
    key = (spec, plan.model_dump_json(), capacity)
    if key not in _REPLAYS:
        events, digest = _events(spec, plan)
        if events:
            by_events = (digest, plan.allocator, capacity)
            if by_events not in _BY_EVENTS:
                _BY_EVENTS[by_events] = allocator.replay(events, plan.allocator, capacity)
            _REPLAYS[key] = _BY_EVENTS[by_events]
        else:
            _REPLAYS[key] = None
        for kept in (_REPLAYS, _BY_EVENTS):
            while len(kept) > 1024:
                del kept[next(iter(kept))]
    return _REPLAYS[key]


def _events(spec: ModelSpec, plan: Plan) -> tuple[list | None, bytes | None]:
    """The stream of a `stream_plan`'s step and its digest; the last few kept (tens of thousands of events each)."""
    events_key = (spec, plan.model_copy(update={"allocator": "default"}).model_dump_json())
    if events_key not in _STREAMS:
        events = stream.allocation_stream(spec, plan)
        digest = hashlib.blake2b(pickle.dumps(events), digest_size=16).digest() if events else None
        _STREAMS[events_key] = (events, digest)
        while len(_STREAMS) > 4:
            del _STREAMS[next(iter(_STREAMS))]
    return _STREAMS[events_key]


_REPLAYS: dict[tuple, allocator.Replay | None] = {}
_BY_EVENTS: dict[tuple, allocator.Replay] = {}
_STREAMS: dict[tuple, tuple[list | None, bytes | None]] = {}


def clear_replays() -> None:
    """Forget the kept replays (a benchmark timing searches from cold)."""
    _REPLAYS.clear()
    _BY_EVENTS.clear()
    _STREAMS.clear()


def _terms(**kw: int) -> dict[str, int]:
    return {name: int(kw.get(name, 0)) for name in TERMS}


def estimate(spec: ModelSpec, plan: Plan, gpu_memory: int | None = None, kernels: str | None = None) -> Estimate:
    """Peak allocated bytes per phase on the most-loaded GPU.

    `kernels` = "cuda" models CUDA kernels; "cpu" models the CPU kernels the trace runs on (they differ
    only in dropout masks: bool on CUDA, input-dtype noise on the CPU). Default: the plan's device.
    """
    kernels = kernels or plan.device
    num = act_mod.numerics(plan, spec)
    targets = act_mod.lora_targets(spec, plan)
    tensors = states.parameter_tensors(spec, plan, targets)
    p_item = states.trainable_itemsize(plan, num.stored_weights, num.stored_adapter)

    weights = states.weight_bytes(tensors, plan, num.stored_weights, num.stored_adapter)
    grads = states.gradient_bytes(tensors, p_item)
    master = states.master_bytes(tensors, plan)
    opt_states = states.optimizer_state_bytes(tensors, plan, p_item)
    opt_temps = states.optimizer_step_temporaries(tensors, plan, p_item)
    acts = act_mod.activations(spec, plan, kernels)

    shard = sharding.per_gpu(spec, plan, tensors, num, weights=weights, grads=grads, master=master,
                             opt_states=opt_states, opt_temps=opt_temps)
    W, G, M, S, TMP = shard.weights, shard.grads, shard.master, shard.opt_states, shard.opt_temps
    base = dict(weights=W, master_weights=M, optimizer_states=S,
                workspace=overhead.workspace_bytes(kernels))
    accum = plan.grad_accum > 1
    # the gradients a micro-batch after the first starts with: the sharded ones it adds into, or deferring FSDP's
    # reduce-scatter, every unit's whole ones (no sharded gradients exist before the last micro-batch's)
    deferred = shard.deferred_grads
    G_fwd = deferred or shard.resting_grads or (G if accum else 0)

    # ---- forward: everything saved, plus the loss transient (which includes the saved log-softmax)
    saved_no_loss = acts.saved_total - acts.loss_saved
    offload = plan.offload_activations
    if offload:
        # OffloadActivations: the layers' and shared saved tensors are on the host once copied; the last five
        # copied stay on the GPU until their copy is done (its forward stash, max_fwd_stash_size 5): at the loss
        # those are the final norm's and the loss's, which the head counts; the output layer's are never copied
        saved_no_loss = acts.head - acts.loss_saved
    fwd_buffers = shard.buffers if shard.forward_buffers is None else shard.forward_buffers
    at_loss_fwd = _terms(**base, gradients=G_fwd, activations=saved_no_loss + acts.forward_extra,
                         logits_loss=acts.loss_forward_peak,
                         gathered_params=shard.gathered_forward, comm_buffers=fwd_buffers)
    # ... or at the end of the decoder, before it frees the attention masks (they can outweigh the
    # logits with a small vocabulary and long sequences). Under checkpointing the masks are saved and
    # counted above, and the peak can be inside the last layer's forward: every kept input, autocast's cache.
    fwd = at_loss_fwd
    if acts.grad_ckpt:
        in_layer = _terms(**base, gradients=G_fwd,
                          # offloading: the stash holds the last packed: this layer's and the previous input
                          activations=(acts.ckpt_input + acts.ckpt_kept_inputs) * (min(2, acts.num_layers) if offload
                                                                                   else acts.num_layers) + acts.shared
                          + acts.ckpt_layer_forward + acts.autocast_cache,
                          gathered_params=shard.gathered_layers_forward, comm_buffers=fwd_buffers)
        fwd = max(fwd, in_layer, key=lambda t: sum(t.values()))
    if not acts.grad_ckpt:
        # at the end of the decoder, before the masks go (offloading: the last layer's, the stash's at most)
        in_layers = acts.last_layer if offload else acts.first_layer + acts.layer * (acts.num_layers - 1)
        end_of_decoder = _terms(**base, gradients=G_fwd,
                                activations=in_layers + (0 if offload else acts.shared) + acts.forward_masks
                                + acts.forward_extra,
                                gathered_params=shard.gathered_forward if shard.gathered_decoder_end is None
                                else shard.gathered_decoder_end, comm_buffers=fwd_buffers)
        fwd = max(at_loss_fwd, end_of_decoder, key=lambda t: sum(t.values()))
    if shard.unshard_first:
        # FSDP2: as the first layer gathers (the embedding's output and the masks exist) ...
        first = _terms(**base, gradients=G_fwd, activations=acts.ckpt_input + acts.forward_masks + acts.shared,
                       gathered_params=shard.unshard_first, comm_buffers=fwd_buffers)
        fwd = max(fwd, first, key=lambda t: sum(t.values()))
    if shard.unshard_last:
        # ... and as the last one does: what the layers below saved, its input (the masks; under checkpointing
        # the inputs kept)
        below = spec.num_layers - 1
        if acts.grad_ckpt:
            saved = (acts.ckpt_input + acts.ckpt_kept_inputs) * (min(2, below) if offload else below) + acts.ckpt_input
        else:
            saved = ((acts.last_layer if offload else acts.first_layer + acts.layer * (below - 1)) + acts.ckpt_input
                     + acts.forward_masks)
        last = _terms(**base, gradients=G_fwd, activations=saved + (0 if offload else acts.shared),
                      gathered_params=shard.unshard_last, comm_buffers=fwd_buffers)
        fwd = max(fwd, last, key=lambda t: sum(t.values()))
    if shard.unshard_tail:
        # ... and as the tail gathers after them: every layer's saved tensors, the decoder's output
        tail = _terms(**base, gradients=G_fwd, activations=saved_no_loss + acts.forward_extra,
                      gathered_params=shard.unshard_tail, comm_buffers=fwd_buffers)
        fwd = max(fwd, tail, key=lambda t: sum(t.values()))

    # ---- backward: the loss backward with all activations alive, then layer by layer
    head_grads = shard.head_grads
    candidates = []
    # A tied lm_head's gradient waits in the shared weight's AccumulateGrad input buffer until the embedding's
    # backward adds its own (torch/csrc/autograd/engine.cpp: a node runs once all its inputs arrived). Without
    # accumulation that buffer is the gradient the layers' candidates count (head_grads); with it, .grad already
    # holds last micro-batch's sum, and the waiting V x h is one more.
    # (DeepSpeed ZeRO-3 reduces each whole gradient into its partition buffer as its hook fires, so the tied
    # lm_head's waits there too without accumulation)
    pending = 0
    if plan.method == "full" and spec.tie_word_embeddings and (accum or shard.resting_grads) and not shard.reduce_end:
        pending = spec.vocab_size * spec.hidden_size * states.trainable_itemsize(plan, num.weights, num.adapter)
    at_loss = _terms(**base, gradients=G_fwd, activations=saved_no_loss,
                     logits_loss=acts.loss_backward_peak, gathered_params=shard.gathered_backward,
                     comm_buffers=fwd_buffers)  # (DeepSpeed makes its reduce buckets at the first gradient)
    candidates.append(at_loss)
    if shard.gathered_prefetch:
        # FSDP2: the last layer prefetched once the logits' gradient exists (the loss's fp32 tensors freed): that
        # gradient, lm_head's weight gradient (trained) and its input's
        tok, c = plan.micro_batch * plan.seq_len, num.compute
        grads_now = c * tok * spec.vocab_size + tok * spec.hidden_size * c
        if plan.method == "full":
            grads_now += spec.vocab_size * spec.hidden_size * c
        candidates.append(_terms(**base, gradients=G_fwd, activations=saved_no_loss, logits_loss=grads_now,
                                 gathered_params=shard.gathered_prefetch, comm_buffers=fwd_buffers))
    if shard.reduce_head:
        # DeepSpeed ZeRO-Offload: lm_head's gradient reduced as the final norm's arrives, every layer's saved
        # tensors alive
        candidates.append(_terms(**base, gradients=shard.reduce_head, activations=saved_no_loss,
                                 comm_buffers=shard.buffers))
    # FSDP2's reduce-scatter holds a unit's whole gradients beside their copy as its input (`foreach_reduce` keeps
    # them referenced until the collective is issued), and gloo copies that input again (distributed_c10d.py
    # reduce_scatter_single; NCCL makes none)
    reducing = 3 if kernels == "cpu" else 2
    if shard.tail_reduce:
        # the untied tail's, on the final norm's input gradient (every layer's saved tensors alive), the last layer
        # prefetched
        candidates.append(_terms(**base, gradients=G_fwd, activations=saved_no_loss + reducing * shard.tail_reduce,
                                 gathered_params=shard.gathered_tail_reduce, comm_buffers=shard.buffers))
    L = spec.num_layers
    # Memory is linear in the layer index within a run of alike layers: the ends, and the lowest layer of
    # the last layer's kind (below it, smaller layers: DeepSeek's dense first layers); and the second layer, the
    # lowest that FSDP2's backward prefetches beside (the first has nothing left to prefetch), and the one below the
    # last, the first beside a reduce-scatter input (FSDP2: the last layer's)
    last_kind = min(spec.group_of(L - 1).indices)
    for i in dict.fromkeys((L - 1, max(0, L - 2), last_kind, min(1, L - 1), 0)):
        # the gradients that exist while layer i runs its backward: those of layers i..L-1
        g_now = shard.backward_grads or (G_fwd if accum else min(G, head_grads + shard.grads_from[i]))
        # offloading: only layer i's saved tensors are brought back (each when its node runs; the stash keeps
        # them until the next node is done), the layers below wait on the host
        below = 0 if offload else i
        kept = (0 if offload else acts.shared) + pending
        if acts.grad_ckpt:
            kept += acts.ckpt_input * (below + 1)
            # lora-8bit: the int8 linears' inputs of the layers below i, still referenced by their graphs (layer
            # i's are in its recomputed saved bytes: int8_inputs_kept)
            kept += acts.ckpt_kept_inputs * below
            kept += acts.ckpt_recompute_held  # reentrant: the recomputed layer output (reentrant_recompute_held)
            # layer i's recomputed saved tensors; its input among them (an fp32 input's fp32 "copy"), when saved,
            # is the one the checkpoint keeps
            saved = (acts.first_layer if i == 0 else acts.last_layer) - acts.input_saved
        else:
            saved = (acts.first_layer if i == 0 else acts.layer) if offload else acts.first_layer + acts.layer * i
        transient = acts.first_layer_backward_transient if i == 0 else acts.layer_backward_transient
        candidates.append(_terms(**base, gradients=g_now, activations=kept + saved + transient,
                                 gathered_params=shard.gathered_layers_backward[i], comm_buffers=shard.buffers))
        if acts.grad_ckpt:
            # as layer i's recompute ends, before any of its own gradients: those of the layers above
            g_above = shard.backward_grads or (G_fwd if accum else min(G, head_grads + (
                shard.grads_from[i + 1] if i + 1 < L else 0)))
            recompute = acts.first_ckpt_recompute if i == 0 else acts.ckpt_recompute
            candidates.append(_terms(**base, gradients=g_above, activations=kept + recompute,
                                     gathered_params=shard.gathered_layers_backward[i], comm_buffers=shard.buffers))
        if shard.unshard_first and plan.method == "full":
            # FSDP2, as layer i's last gradients are made (most of its saved tensors, released by the nodes that
            # run last, still alive): its gradients whole, the reduce-scatter input of the unit above (the layer's,
            # or the untied tail's; freed by this layer's reduce-scatter), the sharded gradients above, the tail's
            # (sharded; tied, whole until the final callback)
            above = min(G, shard.grads_from[i + 1]) if i + 1 < L else 0  # G = 0: offloaded to the host
            head_now = shard.root_head_grads or (head_grads if G else 0)
            g_end = (max(0, G - head_grads) if accum else above) + head_now + shard.unit_grads
            if deferred:  # the last micro-batch: whole below and in layer i, the root's whole, sharded above
                g_end = deferred - (shard.deferred_from[i + 1] if i + 1 < L else 0) + above
            rs_input = shard.unit_grads if i + 1 < L else shard.tail_reduce
            in_layer = saved + transient
            if kernels == "cuda" and not accum:
                # the layer's own part walked node by node (stream.layer_backward_walk): its saved tensors go and
                # its gradients come, so the whole gradients and the largest transient never meet (with
                # accumulation a later micro-batch adds each new gradient to the whole ones: not walked here)
                own = saved if acts.grad_ckpt or offload else (acts.first_layer if i == 0 else acts.layer)
                walk, walk_grads = stream.layer_backward_walk(spec, plan, i)
                in_layer = min(in_layer, saved - own + walk - walk_grads)
            candidates.append(_terms(**base, gradients=g_end, activations=kept + in_layer + rs_input,
                                     gathered_params=shard.gathered_layers_backward[i], comm_buffers=shard.buffers))
    # End of the backward: every gradient exists. The embedding's dense gradient (embedding_dense_backward)
    # is a new V x h tensor, added to what waits for it: a tied lm_head's gradient in the shared weight's input
    # buffer, in place unless that gradient is a view of mm's output (head_grad_is_view: then the sum is a third
    # V x h, traced; not counted under DeepSpeed ZeRO-1/2, whose stream holds less there and no trace settles it),
    # or last micro-batch's .grad (accumulation), in place on CUDA (measured: gpu-h100-run1 case 7). (On the CPU
    # the sum is formed out of place: both copies.)
    emb_transient = 0
    if plan.method == "full" and (spec.tie_word_embeddings or accum) and not shard.reduce_end:
        emb_grad = shard.emb_grad
        if deferred:  # added into the unsharded embedding's whole gradient
            emb_grad = spec.vocab_size * spec.hidden_size * states.trainable_itemsize(plan, num.weights, num.adapter)
        out_of_place = kernels == "cpu" or (spec.tie_word_embeddings and act_mod.head_grad_is_view(plan, num)
                                            and plan.sharding != "deepspeed")
        emb_transient = (2 if out_of_place else 1) * emb_grad
    end_pending = pending
    if shard.unshard_first and plan.method == "full" and not deferred:
        # FSDP2: each reduce-scatter takes the whole gradient off the parameter, so no earlier one waits in .grad;
        # a tied weight's lm_head gradient waits whole in the input buffer until the embedding's is added to it,
        # out of place (the sum is the tail's whole gradient, below)
        vh = spec.vocab_size * spec.hidden_size * states.trainable_itemsize(plan, num.weights, num.adapter)
        emb_transient = end_pending = vh if spec.tie_word_embeddings else 0
    # (DeepSpeed ZeRO-Offload: every .grad left for the host as it was reduced; the embedding's is reduced last)
    end_grads = shard.reduce_end or shard.backward_grads or G
    end_acts = (0 if offload else acts.shared) + emb_transient + end_pending
    if deferred:
        # a micro-batch before the last: every whole gradient, the root still gathered (it reshards after)
        candidates.append(_terms(**base, gradients=deferred, activations=end_acts,
                                 gathered_params=shard.gathered_end, comm_buffers=shard.buffers))
    if shard.unshard_first:
        # FSDP2: the gradients the final callback reduces are whole until then, the first layer's reduce-scatter
        # input waits for it, and the embeddings (or the tied tail) and the root are still gathered
        end_grads += shard.root_grads - (shard.root_grads_sharded if G else 0)
        end_acts += shard.first_unit_grads
        if shard.root_grads:  # as the final callback reduce-scatters them (resharded), beside the sharded ones
            candidates.append(_terms(**base, gradients=G, activations=(0 if offload else acts.shared)
                                     + reducing * shard.root_grads, comm_buffers=shard.buffers))
    candidates.append(_terms(**base, gradients=end_grads, activations=end_acts,
                             gathered_params=shard.gathered_end, comm_buffers=shard.buffers))
    if shard.root_reduce:
        # FSDP2 under a mixed-precision policy, as the final callback reduce-scatters (resharded: nothing
        # gathered): the other units' sharded gradients, the whole ones as its input, its output and that output
        # cast to fp32
        others = max(0, G - shard.root_grads_sharded)
        candidates.append(_terms(**base, gradients=others, activations=(0 if offload else acts.shared) + pending
                                 + shard.root_reduce, comm_buffers=shard.buffers))
    bwd = max(candidates, key=lambda t: sum(t.values()))

    # ---- optimizer step: all gradients, states and the step's temporaries
    opt = _terms(**base, gradients=shard.step_grads, optimizer_temporaries=TMP,
                 comm_buffers=shard.buffers if shard.step_buffers is None else shard.step_buffers)

    disk = {
        "checkpoint_bytes": sharding.checkpoint_bytes(tensors, plan, num, p_item),
        "artifact_bytes": sharding.artifact_bytes(spec, tensors, plan),
    }
    phases = {"forward": fwd, "backward": bwd, "optimizer": opt}
    run = host_mod.Run(trainable=tensors.n_trainable, largest_trainable=max(tensors.trainable, default=0),
                       p_item=p_item, w_item=num.stored_weights, opt_states=opt_states, offloaded=shard.host_bytes,
                       offloaded_activations=acts.offloaded if offload else 0,
                       weights=opt["weights"], device_phases=phases)
    host = host_mod.host_estimate(spec, plan, run)
    return Estimate(spec=spec, plan=plan, params_trainable=tensors.n_trainable, phases=phases,
                    host_bytes=host.peak, disk=disk, gpu_memory=gpu_memory, notes=shard.notes, host=host,
                    host_offload_bytes=shard.host_bytes, load_allocated=loading_peak(tensors, plan, weights, W))


def loading_peak(tensors: states.Tensors, plan: Plan, weights: int, sharded: int) -> int:
    """The load's allocated peak where it passes the steps' by construction: a 4-bit base under FSDP on GPUs,
    loaded whole on every GPU (`weights`: the model as stored) beside the shards fully_shard makes of it
    (`sharded`: this rank's weights, less the quantization states, which are among the whole ones; offloaded,
    each shard leaves for the host as it is made) - memplan.estimator.fully_shard.FullyShard.load_whole. 0 where
    the stream alone knows it."""
    if not (plan.sharding == "fsdp" and plan.zero in (2, 3) and plan.quantized_base and plan.device == "cuda"):
        return 0
    return weights + sharded - states.unsharded_quantization_bytes(tensors, plan)
