"""The order in which a training step allocates and frees its tensors on one GPU, built from the estimator's own
terms, for the caching allocator model (`memplan.estimator.allocator`) to serve: what `reserved` becomes.

The stream follows what the step keeps alive, tensor by tensor:

- loading: every parameter tensor in the model's order (`states.parameter_shapes`), then the adapters and the
  fp32 master copies;
- the forward: the batch, the embedding's output, each decoder layer as its replay creates and drops tensors
  (`layers.LayerReplay` on the symbolic tape, written as transformers and peft write the modules, names rebound
  where theirs are: each tensor is freed when the replay drops its last reference, as CPython's reference counting
  frees a torch tensor; the ones autograd saves stay, and autocast's casts of trainable weights stay in its cache
  until the forward ends), the final norm, autocast's copies of lm_head's weight and input, the logits and the
  loss's fp32 tensors (transformers `loss_utils.ForCausalLMLoss`);
- the backward, node by node in reverse: each gradient computed before the one it came from is freed, each saved
  tensor released as its node runs (torch/csrc/autograd/engine.cpp `release_variables`), each weight gradient
  kept (`AccumulateGrad` steals the first, adds the next micro-batches' in place); a sum hands its gradient to
  both inputs, and the residual stream's gradient runs through every layer, each branch's added to it in place;
  under gradient checkpointing each layer's forward runs again (torch/utils/checkpoint.py): reentrant first,
  non-reentrant when the first node that unpacks a saved tensor runs, and only up to the last tensor the layer
  saves;
- the optimizer step: states created at the first step (torch/optim/adamw.py `_init_group`), the temporaries of
  each implementation (`states.optimizer_step_temporaries`), then `zero_grad(set_to_none=True)`;
- on several GPUs under DDP: the module states' broadcast as it wraps the model, its gradient buckets, and their
  rebuild in the second step's first forward (`memplan.estimator.reducer`);
- under FSDP2: the sharded load (a 4-bit base loaded whole, then sharded), each unit's gathers and reduce-scatters
  on FSDP's own streams, the whole gradients of a unit until its reduce-scatter, the optimizer on the shards; with
  CPU offload the shards' copies to the GPU and nothing of the step (`memplan.estimator.fully_shard`);
- under DeepSpeed ZeRO-1/2: the flat weights and fp32 masters, each gradient copied into a reduce bucket, the
  gradient partitions on the reduction stream, DeepSpeed's step; with optimizer offload its staging buffer and each
  reduced gradient's float64 copy instead (`memplan.estimator.zero_optimizer`);
- under DeepSpeed ZeRO-3: zero.Init's partitions, the parameters its coordinator gathers and releases module by
  module on the all-gather stream, the reduce bucket and gradient partition, its step per sub-group
  (`memplan.estimator.zero3_optimizer`).

The replay keeps the tensors the estimate counts, not every kernel's scratch: it is checked against the stream a
real step traced at full size allocates (`benchmarks/allocator_check.py`). Plans it does not follow
(DeepSpeed over a quantized base or offloading parameters, ZeRO-3 offloading, FSDP without sharded parameters,
offloaded activations, families calibrated by trace) return None and keep the measured ratio
(`overhead.reserved_bytes`). FSDP on one GPU without offload is a plain process (Plan.fully_shards).
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from dataclasses import dataclass

from memplan.catalog.spec import ModelSpec
from memplan.estimator import activations as act_mod
from memplan.estimator import autograd, fully_shard, reducer, states, zero3_optimizer, zero_optimizer
from memplan.estimator.autograd import T, Tape
from memplan.estimator.layers import LayerReplay
from memplan.plan import Plan

# The steady state: the second step reserves what every later one does (each stored H100 plan, both allocators,
# replayed to the fourth step); the first step creates the optimizer states
STEPS = 2
# Micro-batches replayed per step: the first creates the gradients, the second adds to them as every later one
# does (the same allocations in the same order, served from the same cache)
MICRO_BATCHES = 2
# Optimizers keeping two state tensors per parameter (exp_avg, exp_avg_sq); the others one (SGD's momentum;
# Adafactor's factored row and column statistics, counted as one)
TWO_STATES = ("adamw", "adamw-fused", "adamw-forloop", "adamw-8bit", "paged-adamw-8bit")


def supported(spec: ModelSpec, plan: Plan) -> str | None:
    """None where the stream follows the plan; else why not (the estimate keeps the measured ratio)."""
    if plan.device != "cuda":
        return "no caching allocator on the CPU"
    if plan.offload_activations:
        return "offloading activations is not replayed"
    if plan.sharding == "deepspeed":  # on one GPU too: its own buffers and step, not torch's plain step
        why = zero3_optimizer.replayable(plan) if plan.zero == 3 else zero_optimizer.replayable(plan)
        if why:
            return why
    if plan.sharding == "fsdp" and (plan.world_size > 1 or plan.fully_shards):
        why = fully_shard.replayable(plan)
        if why:
            return why
    if spec.traits.calibrated:
        return "the family is calibrated by trace, not replayed layer by layer"
    return None


class _Recorder:
    """Told by the symbolic tape of each tensor it creates and each trainable weight a linear reads."""

    def __init__(self, tokens: int, grad_itemsize: int) -> None:
        self.events: list[tuple] = []
        self.tokens, self.grad_itemsize = tokens, grad_itemsize
        self.matmuls = 0
        self.cache: set[int] = set()

    def created(self, t: T) -> None:
        if t.nbytes > 0:
            self.events.append(("a", t.uid, t.nbytes, t.rg))
            weakref.finalize(t, self.events.append, ("f", t.uid))

    def matmul(self) -> None:
        """A cuBLAS call, after its output was allocated: the running thread makes its workspaces at its first."""
        if not self.matmuls:
            self.events.append(("w", "matmul"))
        self.matmuls += 1

    def cached(self, t: T) -> None:
        self.cache.add(t.uid)

    def weight_used(self, in_numel: int, out_numel: int, in_itemsize: int) -> None:
        self.weight_grad((in_numel // self.tokens) * (out_numel // self.tokens), in_itemsize)

    def weight_grad(self, numel: int, in_itemsize: int) -> None:
        self.events.append(("g", numel * self.grad_itemsize, numel * in_itemsize))

    def parametrized(self, w: T) -> None:
        self.events.append(("leaf", w.uid))

    def backward_scratch(self, x: T, nbytes: int) -> None:
        self.events.append(("m", x.uid, nbytes))

    def released_with(self, out: T, x: T) -> None:
        self.events.append(("o", out.uid, x.uid))

    def multiplied(self, out: T, a: T, b: T) -> None:
        self.events.append(("*", out.uid, ((a.uid, a.nbytes), (b.uid, b.nbytes))))

    def added(self, out: T, a: T, b: T) -> None:
        self.events.append(("+", out.uid, tuple((t.uid, t.nbytes) for t in (a, b) if t.rg)))


@dataclass(frozen=True)
class _Template:
    """One replayed module's events with its own tensor ids: ("a", id, bytes, requires_grad), ("f", id) when the
    replay dropped it, ("g", bytes, bytes as computed) a trainable weight read (its gradient, computed in the input's
    dtype: autocast's cast copy gets it in the compute dtype, and its ToCopy backward casts it to the weight's),
    ("+", id, ((id, bytes), ...)) a sum and its inputs that need a gradient."""

    events: tuple
    saved: frozenset
    cached: frozenset  # autocast's cached casts: held until the forward ends
    x: int  # the input's id
    x_bytes: int
    out: int
    # what custom Functions keep as ctx attributes (`Tape.keep_as_attribute`): kept by the module's nodes, which
    # non-reentrant checkpointing's hooks cannot discard
    attributes: frozenset = frozenset()

    def canonical(self) -> tuple:
        """The template with its tensor ids numbered in the order they appear (the input first): two recordings
        of equal modules compare equal. Ids that no event names (nothing the stream allocates) become -1."""
        ids = {self.x: 0}

        def num(uid: int) -> int:
            return ids.setdefault(uid, len(ids))

        def renumbered(ev: tuple) -> tuple:
            if ev[0] in ("a", "f", "leaf", "m"):  # a tensor, then sizes
                return (ev[0], num(ev[1]), *ev[2:])
            if ev[0] in ("+", "*"):  # a sum or product, and its inputs' (id, bytes)
                return (ev[0], num(ev[1]), tuple((num(u), n) for u, n in ev[2]))
            if ev[0] == "o":  # a saved result and its op's input
                return (ev[0], num(ev[1]), num(ev[2]))
            return ev

        events = tuple(renumbered(ev) for ev in self.events)
        return (events, frozenset(ids.get(u, -1) for u in self.saved), frozenset(ids.get(u, -1) for u in self.cached),
                ids.get(self.out, -1), self.x_bytes, frozenset(ids.get(u, -1) for u in self.attributes))

    @functools.cached_property
    def recompute_events(self) -> tuple[tuple, tuple]:
        """Non-reentrant checkpointing's recompute: the events up to the one that makes the last tensor the module
        saves, where it stops (torch/utils/checkpoint.py: _StopRecomputationError once every saved tensor is back),
        and the tensors made by then and neither freed nor saved, which the stop drops (the latest first)."""
        last = max((i for i, ev in enumerate(self.events) if ev[0] == "a" and ev[1] in self.saved), default=-1)
        events = self.events[:last + 1]
        freed = {ev[1] for ev in events if ev[0] == "f"}
        dropped = tuple(ev[1] for ev in reversed(events) if ev[0] == "a" and ev[1] not in freed
                        and ev[1] not in self.saved)
        return events, dropped

    @functools.cached_property
    def sums(self) -> dict[int, tuple]:
        """Each sum's inputs that need a gradient, (id, bytes) each, by the sum's id."""
        return {ev[1]: ev[2] for ev in self.events if ev[0] == "+"}

    @functools.cached_property
    def products(self) -> dict[int, tuple]:
        """Each product of two tensors that both need a gradient (a * b, a matmul): its inputs, (id, bytes) each, by
        the product's id."""
        return {ev[1]: ev[2] for ev in self.events if ev[0] == "*"}

    @functools.cached_property
    def released_with(self) -> dict[int, tuple]:
        """The saved results each tensor's gradient node releases (`Tape.unary_saving_output`): by the input's id.
        Such a result outlives its own gradient, until the node that made it has run."""
        out: dict[int, tuple] = {}
        for ev in self.events:
            if ev[0] == "o":
                out[ev[2]] = out.get(ev[2], ()) + (ev[1],)
        return out

    @functools.cached_property
    def results_saved(self) -> frozenset:
        return frozenset(u for outs in self.released_with.values() for u in outs)

    @functools.cached_property
    def leaves(self) -> frozenset:
        """The tensors made from parameters alone (`Tape.parametrized`)."""
        return frozenset(ev[1] for ev in self.events if ev[0] == "leaf")

    @functools.cached_property
    def scratch(self) -> dict[int, int]:
        """The most a node reading each tensor allocates beside the gradient it makes for it (`Tape.backward_scratch`):
        by the tensor's id."""
        out: dict[int, int] = {}
        for ev in self.events:
            if ev[0] == "m":
                out[ev[1]] = max(out.get(ev[1], 0), ev[2])
        return out

    @functools.cached_property
    def first_unpack(self) -> int:
        """The index of the event whose backward node is the first to unpack a saved tensor: a weight's gradient
        (its linear's node, which saves the input or the weight), or the gradient of a tensor made before the last
        saved one. The nodes before it (the casts, sums and scalar multiplies after the last saved tensor) run
        before a checkpointed module's recompute."""
        last = max((i for i, ev in enumerate(self.events) if ev[0] == "a" and ev[1] in self.saved), default=-1)
        return max((i for i, ev in enumerate(self.events) if ev[0] == "g" or (ev[0] == "a" and i <= last)), default=-1)


def _record(tokens: int, grad_itemsize: int, x: T, run) -> _Template:
    rec = _Recorder(tokens, grad_itemsize)
    tape = Tape(kernels="cuda")
    autograd._recorder = rec
    try:
        out = run(tape, x)
        events = tuple(rec.events)  # the replay's locals are gone; `out` is still referenced here
    finally:
        autograd._recorder = None
    return _Template(events, frozenset(tape.saved), frozenset(rec.cache), x.uid, x.nbytes, out.uid,
                     frozenset(tape.attributes))


class _Step:
    """Builds the event stream for `allocator.replay`."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self._ids = itertools.count(1)
        self.micro = 0
        self.grads: list[int] = []
        self.threads: set[str] = set()
        self.fsdp: fully_shard.FullyShard | None = None  # FSDP2 keeps the whole gradients per unit
        # DeepSpeed copies them into its buckets
        self.zero: zero_optimizer.ZeroOptimizer | zero3_optimizer.Zero3 | None = None

    def alloc(self, nbytes: int, stream: int = fully_shard.DEFAULT_STREAM) -> int:
        gid = next(self._ids)
        self.events.append(("a", gid, int(nbytes), stream) if stream else ("a", gid, int(nbytes)))
        return gid

    def free(self, *gids: int | None) -> None:
        self.events += [("f", g) for g in gids if g]

    def weight_grad(self, nbytes: int, computed: int | None = None) -> None:
        if computed and computed != nbytes:
            first = self.alloc(computed)
            g = self.alloc(nbytes)
            self.free(first)
            self.keep_grad(g, nbytes)
        else:
            self.keep_grad(self.alloc(nbytes), nbytes)

    def keep_grad(self, g: int, nbytes: int) -> None:
        """A parameter's gradient (`nbytes`): kept as .grad on the first micro-batch, added in place on the others;
        under FSDP2 its unit reduce-scatters it; under DeepSpeed its hook copies it into a reduce bucket."""
        if self.zero is not None:
            if not self.zero.keep_grad(self, g, nbytes):
                self.free(g)
        elif self.fsdp is not None:
            if not self.fsdp.keep_grad(g):
                self.free(g)
        elif self.micro == 0:
            self.grads.append(g)
        else:
            self.free(g)

    def forward(self, tp: _Template, x: int, keep_saved: bool, thread: str = "main",
                cache: list | None = None, keep_attributes: bool = False) -> tuple[int, dict[int, int]]:
        """The module's forward; what autocast caches goes to `cache` (freed when the autocast region ends).
        `keep_attributes`: what custom Functions keep as ctx attributes stays where nothing else is saved
        (non-reentrant checkpointing; reentrant runs the forward without a graph)."""
        return self._run(tp, tp.events, x, keep_saved, thread, cache, keep_attributes)

    def recompute(self, tp: _Template, x: int) -> dict[int, int]:
        """Non-reentrant checkpointing's recompute in the backward: the forward up to the last saved tensor, then
        the exception that stops it drops the frames' other tensors (the latest first)."""
        events, dropped = tp.recompute_events
        ids = self._run(tp, events, x, True, "autograd", None)[1]
        self.free(*[ids[uid] for uid in dropped])
        return ids

    def _run(self, tp: _Template, events, x: int, keep_saved: bool, thread: str,
             cache: list | None, keep_attributes: bool = False) -> tuple[int | None, dict[int, int]]:
        ids = {tp.x: x}
        for ev in events:
            if ev[0] == "a":
                ids[ev[1]] = self.alloc(ev[2])
            elif ev[0] == "f" and (keep_saved and ev[1] in tp.saved or keep_attributes and ev[1] in tp.attributes):
                continue
            elif ev[0] == "f" and cache is not None and ev[1] in tp.cached:
                cache.append(ids[ev[1]])
            elif ev[0] == "f":
                self.free(ids.get(ev[1]))
            elif ev[0] == "w":
                self.first_matmul(thread)
        return ids.get(tp.out), ids

    def first_matmul(self, thread: str) -> None:
        """("w", thread) at the thread's first cuBLAS call (allocator.replay makes its workspaces there)."""
        if thread not in self.threads:
            self.threads.add(thread)
            self.events.append(("w", thread))

    def backward(self, tp: _Template, ids: dict[int, int] | None, grad: int, recompute=None) -> int:
        """The module's nodes in reverse (`_Gradients`); returns the input's gradient. `recompute` (a checkpointed
        module): called when the first node that unpacks a saved tensor runs (torch/utils/checkpoint.py, the unpack
        hook), it returns the ids of the recomputed tensors."""
        flow, attributes = _Gradients(self, tp, grad), {}
        for i in reversed(range(len(tp.events))):
            ev = tp.events[i]
            if recompute is not None and i <= tp.first_unpack:
                # the forward's ctx attributes stay with its nodes, beside the recomputed tensors
                attributes = {u: ids[u] for u in tp.attributes if u in ids and u != tp.x}
                ids, recompute = recompute(), None
            if ev[0] == "g":
                self.weight_grad(ev[1], ev[2])
                self.free(flow.leaf)  # a parametrized weight's gradient, reduced to its factors' (made first)
                flow.leaf = None
            elif ev[0] == "a" and ev[1] in tp.leaves:
                self.free(flow.leaf)
                flow.leaf = self.alloc(ev[2])
                if ev[1] in tp.saved:
                    self.free(ids[ev[1]])
            elif ev[0] == "a" and ev[1] != tp.out:
                g = flow.gradient(ev[1], ev[2], ev[3])
                if g and ev[1] in tp.scratch:
                    self.free(self.alloc(tp.scratch[ev[1]]))
                if ev[1] in tp.saved and ev[1] not in tp.results_saved:
                    self.free(ids[ev[1]], attributes.pop(ev[1], None))
                self.free(*[ids.get(u) for u in tp.released_with.get(ev[1], ())])
                flow.running(ev[1], g)
        self.free(flow.leaf, *attributes.values())
        g = flow.end()
        self.free(*[ids.get(u) for u in tp.released_with.get(tp.x, ())])
        if tp.x in tp.saved:
            self.free(ids[tp.x])
        return g


class _Gradients:
    """The gradients flowing back through one module: a chain, each tensor's gradient computed by the node after
    it, which then frees the gradient it came from. A sum hands its gradient to both of its inputs, cast where an
    input's dtype differs (AddBackward0); what it hands on waits for its branch, where a branch's gradient meeting
    it is added to it in place (the engine's input buffer, torch/csrc/autograd/input_buffer.cpp). A layer's output
    is a residual sum: its gradient, the residual stream's, runs through the layer, every sum on it adding a
    branch's in place, and is the input's gradient the layer returns."""

    def __init__(self, st: _Step, tp: _Template, grad: int) -> None:
        self.st, self.tp = st, tp
        self.refs: dict[int, int] = {}
        self.waiting: dict[int, int] = {}
        self.sizes = {ev[1]: ev[2] for ev in tp.events if ev[0] == "a"}
        self.residual = grad if tp.out in tp.sums else None
        self.grad: int | None = grad
        self.leaf: int | None = None  # a parametrized weight's gradient, until its factors' are made
        if self.residual is not None:
            self._sum(tp.out, grad)

    def gradient(self, uid: int, nbytes: int, requires_grad: bool) -> int | None:
        """The gradient of `uid`: handed on by a sum, else made by the node after it (where it needs one)."""
        if uid in self.waiting:
            return self.waiting.pop(uid)
        return self._made(nbytes) if requires_grad else None

    def running(self, uid: int, g: int | None) -> None:
        """`g` flows on: the one it came from is freed; a sum's or a product's node runs at once."""
        if g:
            self._drop(self.grad)
            self.grad = g
            if uid in self.tp.sums:
                self._sum(uid, g)
            elif uid in self.tp.products:
                self._product(uid, g)

    def end(self) -> int:
        """The input's gradient, once the module's nodes have run."""
        tp = self.tp
        if tp.x in self.waiting:
            g = self.waiting.pop(tp.x)
        elif self.residual is not None:  # the input needs no gradient: the residual stream's ends here
            g = self.residual
        else:
            g = self.st.alloc(tp.x_bytes)
        self._drop(self.grad)
        for w in self.waiting.values():  # handed to an input that needs none
            self._drop(w)
        return g

    def _sum(self, out: int, g: int) -> None:
        for uid, nbytes in self.tp.sums[out]:
            if nbytes == self.sizes.get(out, nbytes):
                self.refs[g] = self.refs.get(g, 1) + 1
                self.waiting[uid] = g
            else:
                self.waiting[uid] = self._made(nbytes)
        self._drop(g)
        self.grad = None

    def _product(self, out: int, g: int) -> None:
        """A product's node makes both inputs' gradients, the second input's first (MulBackward0, BmmBackward0, as
        traced), before it frees the product's; each waits for its branch."""
        for uid, nbytes in reversed(self.tp.products[out]):
            if uid not in self.waiting:
                self.waiting[uid] = self._made(nbytes)
        self._drop(g)
        self.grad = None

    def _made(self, nbytes: int) -> int:
        g = self.st.alloc(nbytes)
        self.refs[g] = 1
        return g

    def _drop(self, g: int | None) -> None:
        if g is not None and g != self.residual:
            self.refs[g] = self.refs.get(g, 1) - 1
            if not self.refs[g]:
                self.st.free(g)


def stream_plan(plan: Plan) -> Plan:
    """The plan with what its stream does not depend on set to one value, so that plans differing only there (a
    search's accumulation steps, GPU counts, schedules) share one replay: the micro-batches past MICRO_BATCHES,
    how many GPUs beyond one (DDP allocates the same on each rank), sync_each_batch where nothing defers, the
    hyperparameters but weight decay (which splits DeepSpeed's optimizer groups) and the output."""
    # FSDP's shards and DeepSpeed's partitions depend on it
    gpus = plan.world_size if plan.sharding in ("fsdp", "deepspeed") else min(plan.world_size, 2)
    return plan.model_copy(update={"grad_accum": min(plan.grad_accum, MICRO_BATCHES), "gpus": gpus, "nodes": 1,
                                   "sync_each_batch": not plan.defers_gradient_reduction,
                                   "hparams": type(plan.hparams)(weight_decay=plan.hparams.weight_decay),
                                   "output_dir": None, "target": None})


def with_attention_as_streamed(spec: ModelSpec, plan: Plan) -> Plan:
    """The plan with SDPA in place of FlashAttention-2 where the two give it the same stream, so that both share
    one stream without the second being built: the same activations, and the same template for every kind of
    layer (their tensor ids renumbered). FlashAttention-2 saves what SDPA's fused kernels save on most models;
    they differ where SDPA takes a mask, repeats the key/value heads or falls back to its math kernel. Kept for
    the process, by plan."""
    if plan.attn != "flash":
        return plan
    key = (spec, plan.model_dump_json())
    if key not in _SAME_AS_SDPA:
        sdpa = plan.model_copy(update={"attn": "sdpa"})
        flash_model, sdpa_model = (_Model(spec, act_mod.as_one_row(p), layers_only=True) for p in (plan, sdpa))
        layers = {flash_model.layer_key(i) for i in range(spec.num_layers)}
        _SAME_AS_SDPA[key] = (flash_model.acts == sdpa_model.acts and all(
            flash_model.template(k).canonical() == sdpa_model.template(k).canonical() for k in layers))
        while len(_SAME_AS_SDPA) > 4096:
            del _SAME_AS_SDPA[next(iter(_SAME_AS_SDPA))]
    return plan.model_copy(update={"attn": "sdpa"}) if _SAME_AS_SDPA[key] else plan


_SAME_AS_SDPA: dict[tuple, bool] = {}


def layer_backward_walk(spec: ModelSpec, plan: Plan, i: int) -> tuple[int, int]:
    """Layer i's backward walked alone, node by node, as the stream walks it (under checkpointing, its recompute
    first): (the most it holds at once, its incoming gradient and its own weights' gradients included as its nodes
    make them, and its input where it saved that, not where the checkpoint keeps it; those gradients, whole). What
    a layer saved is released, and its transients come and go, while its gradients accumulate: at no moment are all
    three at their largest. Kept for the process, by plan and layer."""
    key = (spec, plan.model_dump_json(), i)
    if key not in _WALKS:
        model = _Model(spec, act_mod.as_one_row(plan), layers_only=True)
        tp = model.layer(i)
        st = _Step()
        x = st.alloc(tp.x_bytes)
        ckpt, reentrant = plan.grad_ckpt, plan.ckpt_reentrant
        out, ids = st.forward(tp, x, keep_saved=not ckpt, keep_attributes=not reentrant)
        st.free(out)
        if not ckpt and tp.x not in tp.saved:
            st.free(x)
        x_kept = tp.x_bytes if ckpt else 0  # the checkpoint keeps it (the estimate counts it there)
        recompute = functools.partial(st.recompute, tp, x) if ckpt and not reentrant else None
        start = len(st.events)
        if ckpt and reentrant:
            _, ids = st.forward(tp, x, keep_saved=True, thread="autograd")
            st.free(ids[tp.out])
        st.backward(tp, ids, st.alloc(tp.x_bytes), recompute)
        sizes: dict[int, int] = {}
        live = peak = 0
        for k, ev in enumerate(st.events):
            if ev[0] == "a":
                sizes[ev[1]] = ev[2]
                live += ev[2]
            elif ev[0] == "f" and ev[1] in sizes:
                live -= sizes.pop(ev[1])
            if k >= start:
                peak = max(peak, live)
        _WALKS[key] = (peak - x_kept, sum(sizes.get(g, 0) for g in st.grads))
        while len(_WALKS) > 4096:
            del _WALKS[next(iter(_WALKS))]
    return _WALKS[key]


_WALKS: dict[tuple, tuple[int, int]] = {}


def allocation_stream(spec: ModelSpec, plan: Plan, steps: int = STEPS) -> list[tuple] | None:
    """The events of `steps` optimizer steps of the plan on one GPU, as `allocator.replay` reads them; None where
    `supported` says the stream does not follow the plan."""
    if supported(spec, plan):
        return None
    model = _Model(spec, act_mod.as_one_row(plan))
    st = _Step()
    st.fsdp, st.zero = model.fsdp, model.zero
    if model.fsdp:
        model.fsdp.load(st)
        sharded = model.fsdp.sharded_tensors
        on_gpu = not model.fsdp.offload  # offloaded, the optimizer keeps its masters and states on the host
        for n in sharded.trainable if on_gpu and states.master_bytes(sharded, plan) else ():  # fp32 masters
            st.alloc(4 * n)
    else:
        model.load(st)
    ddp = model.ddp() if reducer.wraps(plan) else None
    if ddp:
        ddp.wrap(st)
    for step in range(steps):
        st.events.append(("s",))
        micro_batches = min(plan.grad_accum, MICRO_BATCHES)
        for micro in range(micro_batches):
            st.micro = micro
            for sharded in (model.fsdp, model.zero):
                if sharded:
                    sharded.start_micro_batch(micro, last=micro == micro_batches - 1)
            if ddp and step == 1 and micro == 0:  # the first forward after a synchronised backward
                ddp.rebuild(st)
            model.micro_batch(st)
        st.events.append(("p", "optimizer"))
        tensors = model.fsdp.sharded_tensors if model.fsdp else model.tensors
        if model.zero:
            model.zero.step(st, first=step == 0, per_state=2 if plan.optimizer in TWO_STATES else 1)
        elif model.fsdp and model.fsdp.offload:
            pass  # the step runs on the host
        else:
            _optimizer_step(st, model.plan, tensors, model.opt_item, first=step == 0)
        st.free(*st.grads)  # zero_grad(set_to_none=True)
        st.grads = []
        if model.fsdp:
            model.fsdp.zero_grad(st)
        st.events.append(("p", None))
    return st.events


def ddp_events(spec: ModelSpec, plan: Plan, ids_step: int = 1) -> tuple[list[tuple], list[tuple]]:
    """DistributedDataParallel's own events for the plan: what its wrap allocates once the model is loaded, and its
    buckets' rebuild before the second step's first forward. `ids_step=-1` numbers them -1, -2, ...: apart from
    a trace's own ids, for splicing into it."""
    st = _Step()
    st._ids = itertools.count(ids_step, ids_step)
    ddp = _Model(spec, act_mod.as_one_row(plan)).ddp()
    ddp.wrap(st)
    wrap, st.events = st.events, []
    ddp.rebuild(st)
    return wrap, st.events


class _Model:
    """What the stream needs of the model and plan: sizes, the layer templates, the loss."""

    def __init__(self, spec: ModelSpec, plan: Plan, layers_only: bool = False) -> None:
        """`layers_only`: the activations and layer templates alone (no sharding, no final norm)."""
        self.spec, self.plan = spec, plan
        self.num = num = act_mod.numerics(plan, spec)
        self.tensors = states.parameter_tensors(spec, plan, act_mod.lora_targets(spec, plan))
        self.p_item = states.trainable_itemsize(plan, num.weights, num.adapter)  # as autograd makes the gradients
        self.opt_item = states.trainable_itemsize(plan, num.stored_weights, num.stored_adapter)  # as the step keeps
        self.full = plan.method == "full"
        self.h, self.V, self.tok = spec.hidden_size, spec.vocab_size, plan.micro_batch * plan.seq_len
        self.acts = act_mod.activations(spec, plan, "cuda")
        ropes = spec.traits.rope_layers or (True,) * spec.num_layers
        self.kinds = [(spec.group_of(i), t, r) for i, (t, r) in enumerate(zip(spec.traits.layer_types, ropes))]
        self._templates: dict = {}
        if layers_only:
            return
        self.fsdp = fully_shard.FullyShard(spec, plan, num.weights, self.p_item, act_mod.lora_targets(spec, plan),
                                           num.shards, num.compute) if plan.fully_shards else None
        ds = plan.sharding == "deepspeed"
        self.zero3 = zero3_optimizer.Zero3(spec, plan, num.compute, self.p_item) if ds and plan.zero == 3 else None
        self.zero = self.zero3 or (zero_optimizer.ZeroOptimizer(spec, plan, self.tensors, self.p_item) if ds else None)
        checkpointed = plan.loss == "chunked" and not plan.liger_loss
        casts = checkpointed and num.autocast
        self.head = _Head(
            self.V, self.h, num.compute, self.tok, self.full, checkpointed, bool(spec.traits.final_softcap),
            spec.traits.logits_scaled, weight_cast=self.V * self.h * num.compute if casts and num.weights != num.compute
            else 0, cached=self.full, input_cast=num.residual if casts and num.residual != num.compute else 0)
        norm_spec = act_mod.layer_spec(spec, plan)
        self.final_norm = _record(self.tok, self.p_item, T(self.tok * self.h, num.residual, True),
                                  lambda tape, x: LayerReplay(tape, norm_spec, num).norm(x, patched=True))

    def ddp(self) -> reducer.DDP:
        return reducer.DDP(self.spec, self.plan, self.tensors, self.num.weights, self.p_item,
                           act_mod.lora_targets(self.spec, self.plan))

    def layer_key(self, i: int) -> tuple:
        """Layer i's kind, and whether its input needs a gradient (layer 0's only with trainable embeddings or
        checkpointing): one template each."""
        return self.kinds[i], True if i else self.full or self.plan.grad_ckpt

    def layer(self, i: int) -> _Template:
        return self.template(self.layer_key(i))

    def template(self, key: tuple) -> _Template:
        """The template of a `layer_key`."""
        if key not in self._templates:
            (group, layer_type, rope), rg = key
            ls = act_mod.layer_spec(self.spec, self.plan, layer_type, rope, group)
            self._templates[key] = _record(self.tok, self.p_item, T(self.tok * self.h, self.num.residual, rg),
                                           lambda tape, x: LayerReplay(tape, ls, self.num).layer(x))
        return self._templates[key]

    def load(self, st: _Step) -> None:
        """Parameters in module order (a quantized base: the embedding, the quantized linears, the rest), the
        adapters, the fp32 master copies."""
        t, w, V, h = self.tensors, self.num.weights, self.V, self.h
        if self.zero3:
            self.zero3.load(st)
            return
        if t.frozen_quantized:
            st.alloc(V * h * w)
            for o, i in t.frozen_quantized:
                st.alloc(states.quantized_bytes(self.plan.quantized_base, o, i))
            st.alloc(max(0, t.frozen_plain - V * h) * w)
        else:
            params = [st.alloc(math.prod(shape) * (self.p_item if self.full else w))
                      for shape in states.parameter_shapes(self.spec)]
            if self.spec.params_frozen:
                st.alloc(self.spec.params_frozen * w)
        if not self.full:
            params = [st.alloc(math.prod(shape) * self.p_item) for shape in t.trainable_shapes]
        if self.zero:  # DeepSpeed: one flat buffer of the trained parameters, its own fp32 masters
            self.zero.load(st, params, t.n_trainable * self.p_item)
            return
        for n in t.trainable if states.master_bytes(t, self.plan) else ():
            st.alloc(4 * n)

    def micro_batch(self, st: _Step) -> None:
        """One forward and backward: the batch, the embedding, the decoder, the loss, then all of it in reverse."""
        acts, tok, h = self.acts, self.tok, self.h
        st.events.append(("p", "forward"))
        batch = [st.alloc(8 * tok), st.alloc(8 * tok)]  # input ids, labels
        fsdp, FS = self.fsdp, fully_shard.FullyShard
        if fsdp:
            fsdp.forward_start(st)
        zero3 = self.zero3
        if zero3:
            zero3.gather(st, ("forward", None))
        shared = st.alloc(acts.shared) if acts.shared else None
        x = st.alloc(tok * h * self.num.residual)  # the embedding's output
        if fsdp:
            fsdp.embedded(st)
        masks = st.alloc(acts.forward_masks) if acts.forward_masks else None
        layers, cache = [], []
        for i in range(self.spec.num_layers):
            x, ids, kept = self._layer_forward(st, i, x, cache)
            layers.append((ids, kept))
        st.free(masks)
        st.first_matmul("main")  # lm_head, where no layer ran a matmul
        if zero3:
            zero3.gather(st, ("tail", None))
        if fsdp and fsdp.tail_norm:
            fsdp.pre_forward(st, FS.TAIL)
        hidden, norm_ids = st.forward(self.final_norm, x, keep_saved=True)
        if self.final_norm.x not in self.final_norm.saved:
            st.free(x)
        if zero3:
            zero3.gather(st, ("head", None), before=True)
        if fsdp:
            fsdp.pre_forward(st, FS.TAIL)  # where the tail's forward starts at lm_head
        loss, kept_hidden = self._head_forward(st, hidden)
        st.free(*cache)  # the autocast region (model and loss) ends
        if fsdp:  # the root's post-forward: transformers computes the loss inside the model's forward
            fsdp.forward_end(st)
        if zero3:
            zero3.gather(st, ("head", None), before=False)
        st.events.append(("p", "backward"))
        grad, pending = self._head_backward(st, loss, hidden, kept_hidden, norm_ids)
        for i in reversed(range(self.spec.num_layers)):
            grad = self._layer_backward(st, i, *layers[i], grad)
        st.free(grad)
        self._embedding_backward(st, pending)
        if self.zero:  # engine.backward's epilogue
            self.zero.backward_end(st)
        st.free(shared, *batch)

    def _head_backward(self, st: _Step, loss: dict, hidden: int, kept_hidden: bool, norm_ids: dict) -> tuple[int, list]:
        """The loss's backward, lm_head's and the final norm's: (the decoder output's gradient, a tied lm_head's
        weight gradient waiting for the embedding's)."""
        fsdp, FS, zero3, V, h = self.fsdp, fully_shard.FullyShard, self.zero3, self.V, self.h
        if fsdp:  # the root's pre-backward, on the loss; the tail's, on the logits' gradient, prefetches a layer
            fsdp.pre_backward(st, FS.ROOT)
            fsdp.backward_start(st)
            fsdp.running(FS.TAIL)
        if zero3:
            zero3.gather(st, ("backward", None), before=True)
        hooks = dict(on_logits_grad=lambda: fsdp.pre_backward(st, FS.TAIL),
                     on_recompute=lambda: fsdp.regather(st, FS.TAIL)) if fsdp else {}
        grad, w_grad = _loss_backward(st, self.acts, loss, self.head, self.p_item, **hooks)
        tied = self.full and self.spec.tie_word_embeddings
        pending = [w_grad] if tied and w_grad else []  # waits in the tied weight's input buffer
        if w_grad and not tied:
            st.keep_grad(w_grad, V * h * self.p_item)
        if kept_hidden:
            st.free(hidden)
        if fsdp:  # a tail of lm_head alone: its post-backward on lm_head's input gradient
            if not (fsdp.tail_norm or fsdp.tied):
                fsdp.post_backward(st, FS.TAIL)
            fsdp.running(FS.TAIL if fsdp.tail_norm else FS.ROOT)
        grad = st.backward(self.final_norm, norm_ids, grad)
        if fsdp and fsdp.tail_norm and not fsdp.tied:  # on the final norm's input gradient
            fsdp.post_backward(st, FS.TAIL)
        if self.zero and self.full:  # the final norm's weight gradient: its hook reduces a waiting lm_head gradient
            st.keep_grad(st.alloc(h * self.p_item), h * self.p_item)
        if zero3:
            zero3.gather(st, ("backward", None), before=False)
        return grad, pending

    def _head_forward(self, st: _Step, hidden: int) -> tuple[dict, bool]:
        """lm_head and the loss: (what the loss keeps for its backward, whether the final hidden states stay)."""
        tok, h, V, c = self.tok, self.h, self.V, self.num.compute
        # autocast's copies of lm_head's weight (made first) and of its input, for the standard loss: saved for the
        # backward where the other needs a gradient (the input always does; the weight when trained), else dropped
        # once the logits exist
        casts = self.num.autocast and not (self.plan.liger_loss or self.head.checkpointed)
        head_w = st.alloc(V * h * c) if casts and self.num.weights != c else None
        head_x = st.alloc(tok * h * c) if casts and self.num.residual != c else None
        # the model's forward drops the final hidden states as it returns, unless lm_head saved them (a trainable
        # weight, given them uncast) or the loss runs lm_head again (chunked, Liger)
        kept_hidden = ((self.full and head_x is None) or "lm_head" in act_mod.lora_targets(self.spec, self.plan)
                       or self.plan.liger_loss or self.head.checkpointed)
        loss = _loss_forward(st, self.plan, self.acts, self.head, None if kept_hidden else hidden,
                             drop=None if self.full else head_x)
        if casts:
            loss.update(head=(head_w, head_x if self.full else None),
                        input_cast=self.num.residual if head_x else None)
        return loss, kept_hidden

    def _embedding_backward(self, st: _Step, pending: list) -> None:
        """The embedding's gradient (full FT; a tied weight's two summed), then under FSDP2 the backward's final
        callback."""
        V, h = self.V, self.h
        fsdp, FS = self.fsdp, fully_shard.FullyShard
        if fsdp:  # the embeddings' pre-backward, on their output's gradient where it has one (tied, the tail's ran)
            if self.layer_key(0)[1] and not fsdp.tied:
                fsdp.pre_backward(st, FS.EMBED)
            fsdp.running(FS.TAIL if fsdp.tied else FS.EMBED)
        if self.zero3:
            self.zero3.gather(st, ("end", None), before=True)
        if self.full:
            emb = st.alloc(V * h * self.p_item)  # embedding_dense_backward
            if pending and not (self.fsdp or act_mod.head_grad_is_view(self.plan, self.num)):
                # a tied weight: lm_head's gradient waits alone in the weight's input buffer, a tensor of its own,
                # so the engine adds the embedding's into it in place (input_buffer.cpp can_accumulate_inplace)
                st.free(emb)
                st.keep_grad(pending[0], V * h * self.p_item)
            elif pending:  # summed out of place (under FSDP2 the tail unit's whole gradient)
                total = st.alloc(V * h * self.p_item)
                st.free(emb, *pending)
                st.keep_grad(total, V * h * self.p_item)
            else:
                st.keep_grad(emb, V * h * self.p_item)
        if self.fsdp:
            self.fsdp.backward_end(st)
        if self.zero3:
            self.zero3.gather(st, ("end", None), before=False)

    def _layer_forward(self, st: _Step, i: int, x: int, cache: list) -> tuple[int, dict, int | None]:
        """(the output, the ids of what the layer made, the input when it is kept: checkpointing keeps each
        layer's input, and a layer may save its own)."""
        tp = self.layer(i)
        if self.fsdp:
            self.fsdp.pre_forward(st, i)
        if self.zero3:
            self.zero3.gather(st, ("forward", i), before=True)
        out, ids = st.forward(tp, x, keep_saved=not self.plan.grad_ckpt, cache=cache,
                              keep_attributes=not self.plan.ckpt_reentrant)
        if self.fsdp:
            self.fsdp.post_forward(st, i)
        if self.zero3:
            self.zero3.gather(st, ("forward", i), before=False)
        if self.plan.grad_ckpt or tp.x in tp.saved:
            return out, ids, x
        st.free(x)
        return out, ids, None

    def _layer_backward(self, st: _Step, i: int, ids: dict, kept: int | None, grad: int) -> int:
        tp = self.layer(i)
        if self.fsdp:
            self.fsdp.pre_backward(st, i)
        if self.zero3:
            self.zero3.gather(st, ("backward", i), before=True)
        recompute = None
        if self.plan.grad_ckpt and not self.plan.ckpt_reentrant:
            recompute = functools.partial(st.recompute, tp, kept)
        elif self.plan.grad_ckpt:  # reentrant: the whole forward again, keeping what it saves
            _, ids = st.forward(tp, kept, keep_saved=True, thread="autograd")
            st.free(ids[tp.out])
        grad = st.backward(tp, ids, grad, recompute)
        if self.plan.grad_ckpt and tp.x not in tp.saved:
            st.free(kept)
        # FSDP2 runs a unit's post-backward from a hook on its inputs' gradients; the first layer's input has none
        # without trained embeddings or checkpointing, and the backward's final callback runs it
        # (FSDPState._root_post_backward_final_callback: every state from the root down, FullyShard.backward_end)
        if self.fsdp and (i or self.layer_key(0)[1]):
            self.fsdp.post_backward(st, i)
        if self.zero3:
            self.zero3.gather(st, ("backward", i), before=False)
        return grad


def _chunks(plan: Plan, tok: int) -> list[int]:
    """Tokens per chunk of the loss: one chunk for the standard loss (memplan.runtime.loss for the chunked one)."""
    n = act_mod.CHUNKED_LOSS_TOKENS if plan.loss == "chunked" else tok
    return [min(n, tok - start) for start in range(0, tok, n)]


@dataclass(frozen=True)
class _Head:
    """lm_head and the loss, as the stream allocates them. `checkpointed`: memplan.runtime.loss's chunked loss, each
    chunk under non-reentrant checkpoint (one chunk too), in its own code; else transformers' ForCausalLM and
    ForCausalLMLoss. `weight_cast`: the bytes of autocast's copy of lm_head's weight, where the chunked loss makes one
    (the standard loss's casts are _Model._head_forward's); `cached`: autocast's cache keeps it (a trained weight)
    until the forward leaves autocast; `input_cast`: the hidden states' itemsize where autocast casts each chunk."""

    V: int
    h: int
    c: int
    tokens: int
    trained: bool
    checkpointed: bool
    softcap: bool
    scaled: bool
    weight_cast: int = 0
    cached: bool = False
    input_cast: int = 0

    def logits(self, st: _Step, n: int, keep: bool, hidden: int | None = None, drop: int | None = None,
               thread: str | None = None) -> tuple | None:
        """A chunk of `n` tokens: lm_head's logits (then `drop`, a temporary of the call), what the model does to them
        (Granite's division by logits_scaling; Gemma-2's soft-capping), their fp32 copy (logits.float()),
        cross_entropy's log_softmax: the logits and the copy freed once the log-softmax exists (the copy as the loss
        function returns, then `hidden` as the model's forward returns, then the logits). When `keep` (saved for the
        backward: the standard loss, a chunk's recomputation), returns the log-softmax, the soft-capping's tanh
        result and autocast's copies mm saved (None where there are none); else frees them too. `thread`: the
        thread running it, if lm_head may be its first cuBLAS call."""
        nv, c = n * self.V, self.c
        weight = st.alloc(self.weight_cast) if self.weight_cast and (keep or not self.cached) else None
        x = st.alloc(n * self.h * c) if self.input_cast else None
        logits = st.alloc(c * nv)
        if thread:
            st.first_matmul(thread)
        st.free(drop)
        if not keep or not self.trained:  # mm saves the input's copy for the weight's gradient, the weight's always
            st.free(x)
            x = None
        if not keep:
            st.free(weight)
            weight = None
        if self.scaled:  # logits = logits / logits_scaling: a new tensor, the one before freed as the name is bound
            quotient = st.alloc(c * nv)
            st.free(logits)
            logits = quotient
        tanh = None
        if self.softcap:
            # Gemma2ForCausalLM.forward: logits / cap, tanh (which saves its result), * cap, each statement a new
            # tensor, the one before freed as the name is bound again; the chunked loss's one expression keeps the
            # logits until it is done
            scaled = st.alloc(c * nv)
            if not self.checkpointed:
                st.free(logits)
            tanh = st.alloc(c * nv)
            st.free(scaled)
            capped = st.alloc(c * nv)
            if not keep:
                st.free(tanh)
                tanh = None
            if self.checkpointed:
                st.free(logits)
            logits = capped
        upcast = st.alloc(4 * nv) if c != 4 else None
        log_probs = st.alloc(4 * nv)
        if not keep:
            st.free(log_probs)
        st.free(upcast, hidden, logits)
        return (log_probs, tanh, weight, x) if keep else None

    def logits_backward(self, st: _Step, n: int, saved: tuple) -> int:
        """nll_loss_backward and _log_softmax_backward_data (fp32), the cast back to the logits' dtype, then the
        soft-capping's product, tanh (its saved result released after it) and quotient, and the scaling's
        quotient, each a new tensor: the gradient of lm_head's output."""
        log_probs, tanh, _, _ = saved
        nv = n * self.V
        g_nll = st.alloc(4 * nv)
        grad = st.alloc(4 * nv)
        st.free(log_probs, g_nll)
        steps = [()] if self.c != 4 else []
        steps += [(), (tanh,), ()] if tanh else []
        steps += [()] if self.scaled else []
        for release in steps:
            g = st.alloc(self.c * nv)
            st.free(grad, *release)
            grad = g
        return grad


    def mm_backward(self, st: _Step, n: int, saved: tuple, g_logits: int, sums: dict[str, list]) -> None:
        """lm_head's mm backward for a chunk of `n` tokens: the weight's gradient first where it has one, then
        grad_input (the backward thread makes its cuBLAS workspaces at its first call, once that call's output
        exists, as traced), then the node releases autocast's copies it saved, the input's first, and its input
        gradient. The weight's gradients are summed in `sums["w"]`; grad_input, cast back to the hidden states'
        dtype and, for the chunked loss, made a full (tokens, h) tensor by slice_backward, in `sums["h"]`."""
        h, c = self.h, self.c
        w = st.alloc(self.V * h * c) if self.trained else None
        if w:
            st.first_matmul("autograd")
        g_hidden = st.alloc(n * h * c)
        st.first_matmul("autograd")
        st.free(saved[3], saved[2], g_logits)
        if w:
            _accumulate(st, sums["w"], w, self.V * h * c)
        if self.input_cast:  # the chunk's ToCopy back to the hidden states' dtype
            cast = st.alloc(n * h * self.input_cast)
            st.free(g_hidden)
            g_hidden = cast
        if self.checkpointed:  # slice_backward: a new (tokens, h) tensor, summed in place from the second on
            whole = st.alloc(self.tokens * h * (self.input_cast or c))
            st.free(g_hidden)
            if sums["h"]:
                st.free(whole)
                return
            g_hidden = whole
        sums["h"].append(g_hidden)


def _loss_forward(st: _Step, plan: Plan, acts, head: _Head, hidden: int | None, drop: int | None = None) -> dict:
    """ForCausalLMLoss: the shifted int64 labels, then the logits and log-softmax (transformers loss_utils); the
    chunked loss runs each chunk under checkpoint, which keeps none of them, within autocast where its cache keeps a
    trained weight's copy for every chunk. The Liger loss: its forward peak as one transient and what it saves."""
    if plan.liger_loss:
        st.free(st.alloc(acts.loss_forward_peak))
        return {"saved": st.alloc(acts.loss_saved) if acts.loss_saved else None}
    labels = st.alloc(8 * head.tokens)
    chunks = _chunks(plan, head.tokens)
    cached = st.alloc(head.weight_cast) if head.weight_cast and head.cached else None
    saved = [head.logits(st, n, keep=not head.checkpointed, hidden=hidden, drop=drop) for n in chunks]
    st.free(cached)
    return {"labels": labels, "saved": saved, "chunks": chunks}


def _loss_backward(st: _Step, acts, loss: dict, head: _Head, p_item: int, on_logits_grad=lambda: None,
                   on_recompute=lambda: None) -> tuple[int, int | None]:
    """Per chunk, last first: the checkpointed chunk's logits again (chunked loss), their gradient
    (`_Head.logits_backward`), lm_head's weight gradient and grad_input, the latter cast back to the hidden states'
    dtype and, for the chunked loss, made a full (tokens, h) tensor by slice_backward. The chunks' gradients are
    summed in their nodes' input buffers: the weight's transposed views out of place for the second, in place after;
    the hidden states' full tensors in place. Returns the final hidden states' gradient and lm_head's weight gradient
    (in the parameter's dtype; None for a frozen lm_head). `on_logits_grad` runs where the forward's first logits'
    gradient exists (hooks on lm_head's output: FSDP2's pre-backward; the first chunk's comes last), `on_recompute`
    before a chunk's recomputation calls lm_head first."""
    V, h, c, tok = head.V, head.h, head.c, head.tokens
    if "labels" not in loss:  # the Liger loss: its gradients were computed in the forward
        on_logits_grad()
        st.first_matmul("autograd")
        peak = st.alloc(acts.loss_backward_peak)
        w_grad = st.alloc(V * h * p_item) if head.trained else None
        g_hidden = st.alloc(tok * h * c)
        st.free(peak, loss["saved"])
        return g_hidden, w_grad
    sums: dict[str, list] = {"w": [], "h": []}
    chunks = loss["chunks"]
    for k, (n, saved) in enumerate(reversed(list(zip(chunks, loss["saved"])))):
        if saved is None:
            if k == 0:
                on_recompute()
            saved = head.logits(st, n, keep=True, thread="autograd")
        g_logits = head.logits_backward(st, n, saved)
        if k == len(chunks) - 1:  # the forward's first chunk, which the backward reaches last
            on_logits_grad()
        head.mm_backward(st, n, saved, g_logits, sums)
    st.free(loss["labels"], *loss.get("head", ()))  # lm_head's node releases autocast's copies it saved
    g_hidden, w_grad = sums["h"][0], sums["w"][0] if sums["w"] else None
    # the ToCopy nodes of autocast's casts, the input's first (made after the weight's: a later node runs first)
    if loss.get("input_cast"):  # the hidden states' gradient, back to their dtype
        cast = st.alloc(tok * h * loss["input_cast"])
        st.free(g_hidden)
        g_hidden = cast
    if w_grad and p_item != c:  # the weight's gradient, to the weight's dtype
        cast = st.alloc(V * h * p_item)
        st.free(w_grad)
        w_grad = cast
    return g_hidden, w_grad


def _accumulate(st: _Step, acc: list, g: int, nbytes: int) -> None:
    """A node's input buffer summing gradients (torch/csrc/autograd/input_buffer.cpp): the first kept, the second
    added out of place into a new tensor, the later ones in place."""
    if not acc:
        acc.append(g)
        return
    if len(acc) == 1:
        total = st.alloc(nbytes)
        st.free(acc[0], g)
        acc[0] = total
        acc.append(None)  # from now on, in place
        return
    st.free(g)


def _optimizer_step(st: _Step, plan: Plan, tensors, p_item: int, first: bool) -> None:
    """States at the first step, parameter by parameter (states.optimizer_state_bytes of each); the step's
    temporaries as each implementation makes them (states.optimizer_step_temporaries)."""
    per_state = 2 if plan.optimizer in TWO_STATES else 1
    if first:
        for shape in tensors.trainable_shapes:
            nbytes = states.optimizer_state_bytes(states.Tensors((shape,), (), 0), plan, p_item)
            for _ in range(per_state):
                st.alloc(nbytes // per_state)
    sb = states.state_itemsize(plan, p_item)
    temps = []
    if states.master_bytes(tensors, plan):
        temps += [st.alloc(4 * n) for n in tensors.trainable]  # the fp32 gradients of the master step
    if plan.optimizer == "adamw":
        temps += [st.alloc(sb * n) for n in tensors.trainable]  # _foreach_sqrt(exp_avg_sqs)
    elif plan.optimizer == "adamw-forloop":
        for n in tensors.trainable:
            st.free(st.alloc(sb * n), st.alloc(sb * n))
    elif plan.optimizer == "adafactor":  # one parameter at a time: grad**2 + eps, the factored estimate, and for
        for n in tensors.trainable:     # 16-bit parameters grad.float() and p.float(), all fp32
            st.free(*[st.alloc(4 * n) for _ in range(2 + (2 if p_item < 4 else 0))])
    st.free(*temps)
