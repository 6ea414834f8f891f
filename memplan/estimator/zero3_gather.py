"""The parameters DeepSpeed ZeRO-3 holds gathered over a training step, on several GPUs: its parameter coordinator
(deepspeed/runtime/zero/partitioned_param_coordinator.py) replayed on the step's module trace.

ZeRO-3 gathers a module's parameters as the module runs, forward or backward, and at every module it runs - one
without parameters too (a decoder layer, its attention, the activation) - prefetches the next parameters of the
trace (recorded in the first step) not yet gathered, whole parameters until `stage3_prefetch_bucket_size` elements
(`_fetch_sub_module_impl`). There are more modules than parameters to gather, so the prefetch runs ahead layer
after layer until `stage3_max_live_parameters` (1e9 elements by default) stops it: at full size some 1e9 elements
stay gathered through the forward and much of the backward. After a module runs it releases its parameters,
except:

- persistent ones (at most `stage3_param_persistence_threshold` elements: norms, biases), never partitioned;
- those the trace uses again within `stage3_max_reuse_distance` elements of parameters (`__params_to_release`
  walks the trace from the next module, counting every parameter's elements until it reaches the distance): with
  DeepSpeed's default of 1e9, the last layers and lm_head stay gathered from their forward to their backward;
- those whose later use a prefetch scan already passed while they were gathered
  (`__most_recent_step_id_param_fetched_for`);
- and it keeps a parameter some other running module uses (`ds_active_sub_modules`).

Under checkpointing the frozen parameters a recompute gathers are released with the backward module that
triggered it (`update_recompute_parameters`). The embedding's backward has no post-backward hook (its input, the
token ids, needs no gradient): its parameters wait for `release_backward_leftovers` at the backward's end.

The trace is the model's module tree as transformers and peft build it (`step_trace`). Bytes: a parameter gathered
alone is an all-gather buffer of its partition times the ranks (`_all_gather_sequential`);
several gathered at once share one flat buffer, and the first wait copies each out of it (`AllGatherCoalescedHandle
.wait`: torch.cat), the buffer alive until the last of them is waited on. Checked event by event against DeepSpeed's
own count of gathered elements and by `memplan profile --backend cpu` on two ranks
(benchmarks/results/deepspeed-gloo-2rank.jsonl, benchmarks/results/zero3-trace.jsonl).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from dataclasses import dataclass

from memplan.catalog.spec import ModelSpec
from memplan.plan import Plan

#: DeepSpeed's defaults (deepspeed/runtime/zero/config.py), which memplan's ds_config leaves unless the plan sets
#: them (Plan.deepspeed): stage3_max_reuse_distance and stage3_max_live_parameters, in elements.
MAX_REUSE_DISTANCE = 1_000_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000


#: DeepSpeed's default leaf modules (deepspeed/runtime/zero/leaf_module_config.py DEFAULT_LEAF_MODULE_CLASSES): these
#: families' sparse MoE blocks are fetched and released whole, router and experts together, their children unhooked.
LEAF_MOE_BLOCKS = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})


def persistence_threshold(spec: ModelSpec, plan: Plan) -> int:
    """The plan's stage3_param_persistence_threshold, else HF "auto" (memplan's ds_config): 10 * hidden_size."""
    value = plan.deepspeed.stage3_param_persistence_threshold
    return 10 * spec.hidden_size if value is None else value


def prefetch_bucket(spec: ModelSpec, plan: Plan) -> int:
    """The plan's stage3_prefetch_bucket_size, else HF "auto" (memplan's ds_config): 0.9 * hidden_size**2."""
    value = plan.deepspeed.stage3_prefetch_bucket_size
    return int(0.9 * spec.hidden_size ** 2) if value is None else value


def reuse_and_live(plan: Plan) -> tuple[int, int]:
    """The plan's stage3_max_reuse_distance and stage3_max_live_parameters, else DeepSpeed's defaults."""
    ds = plan.deepspeed
    reuse, live = ds.stage3_max_reuse_distance, ds.stage3_max_live_parameters
    return (MAX_REUSE_DISTANCE if reuse is None else reuse), (MAX_LIVE_PARAMETERS if live is None else live)


@dataclass(frozen=True)
class Module:
    """A module with parameters of its own, as the trace runs it."""

    params: tuple[int, ...]  # parameter ids
    layer: int | None  # the decoder layer it belongs to (None: the embeddings, lm_head)


@dataclass(frozen=True)
class Event:
    kind: str  # "fetch", "release", or "end" (release_backward_leftovers)
    module: int = -1
    forward: bool = True
    recompute: bool = False  # a checkpointed layer's forward run again inside the backward
    region: str = ""  # "forward", "head" (lm_head's forward), "backward", or "end"


@dataclass(frozen=True)
class Trace:
    numel: tuple[int, ...]  # per parameter id
    trainable: tuple[bool, ...]
    modules: tuple[Module, ...]
    events: tuple[Event, ...]


@dataclass(frozen=True)
class Replay:
    """Per event of the trace: the elements the coordinator counts as gathered (its __n_available_params), the
    bytes the gathers hold (the parameters and any coalesced buffer), and the storages the event made and freed
    (("a", id, bytes), ("f", id)), in order."""

    available: tuple[int, ...]
    held: tuple[int, ...]
    storages: tuple[tuple[tuple, ...], ...]


def replay(trace: Trace, *, world: int, itemsize: int, persistent: int, bucket: int,
           reuse: int = MAX_REUSE_DISTANCE, live: int = MAX_LIVE_PARAMETERS) -> Replay:
    """Run the coordinator's fetch and release rules over the trace, from its second step (the trace complete)."""
    coordinator = _Coordinator(trace, world=world, itemsize=itemsize, persistent=persistent, bucket=bucket,
                               reuse=reuse, live=live)
    available, held, storages = [], [], []
    for e in trace.events:
        if e.kind == "fetch":
            coordinator.fetch(e)
        elif e.kind == "release":
            coordinator.release(e)
        else:
            coordinator.release_leftovers()
        available.append(coordinator.available)
        held.append(coordinator.data + coordinator.flat)
        storages.append(tuple(coordinator.storages))
        coordinator.storages.clear()
    return Replay(available=tuple(available), held=tuple(held), storages=tuple(storages))


class _Handle:
    """One all-gather: its parameters, the flat buffer several share (0 for one), whether waited on yet."""

    def __init__(self, params: list[int], flat: int, storage: int | None) -> None:
        self.params, self.flat, self.waited = params, flat, flat == 0
        self.storage = storage  # the flat buffer's id


class _Coordinator:
    """PartitionedParameterCoordinator's state over parameter ids: each parameter not gathered ("N"), in flight
    ("I") or gathered ("A"), the trace's parameter queue, the step each parameter was last fetched for."""

    def __init__(self, trace: Trace, *, world: int, itemsize: int, persistent: int, bucket: int, reuse: int,
                 live: int) -> None:
        self.trace, self.world, self.itemsize, self.bucket, self.reuse, self.live = \
            trace, world, itemsize, bucket, reuse, live
        n = len(trace.numel)
        self.persist = [k <= persistent for k in trace.numel]
        self.order = [e.module for e in trace.events if e.kind == "fetch"]  # the recorded submodule order
        self.queue = deque((p, step) for step, m in enumerate(self.order) for p in sorted(set(trace.modules[m].params)))
        self.status = ["A" if self.persist[p] else "N" for p in range(n)]
        self.most_recent = [-10 ** 10] * n
        self.active: list[set[int]] = [set() for _ in range(n)]
        self.active_backward: dict[int, None] = {}
        self.recompute: dict[int, set[int]] = {}
        self.registry: dict[int, _Handle] = {}
        self.own = [0] * n  # bytes of each gathered parameter's own tensor
        self.available = self.flat = self.data = self.step = 0
        self._release: dict[tuple[int, int], set[int]] = {}
        # for the reuse distance: where each parameter is fetched in `order`, and the numel fetched before each point
        self._uses: list[list[int]] = [[] for _ in range(n)]
        self._numel_before = [0]
        for j, m in enumerate(self.order):
            for p in trace.modules[m].params:
                self._uses[p].append(j)
            self._numel_before.append(self._numel_before[-1] + sum(trace.numel[p] for p in trace.modules[m].params))
        self.storages: list[tuple] = []  # what the current event made and freed
        self._ids = itertools.count(1)
        self._storage: list[int | None] = [None] * n  # the id of each gathered parameter's own tensor

    def _new(self, nbytes: int) -> int:
        sid = next(self._ids)
        self.storages.append(("a", sid, nbytes))
        return sid

    def _set(self, p: int, nbytes: int) -> None:
        self.data += nbytes - self.own[p]
        self.own[p] = nbytes
        if self._storage[p] is not None:
            self.storages.append(("f", self._storage[p]))
        self._storage[p] = self._new(nbytes) if nbytes else None

    def _gather(self, params: list[int]) -> None:
        """One all-gather (`__all_gather_params`): alone into a buffer of its aligned size, several into one flat
        buffer."""
        params = [p for p in params if self.status[p] == "N"]
        if not params:
            return
        numel = self.trace.numel
        self.available += sum(numel[p] for p in params)
        parts = sum(math.ceil(numel[p] / self.world) for p in params) * self.world * self.itemsize
        handle = _Handle(params, 0 if len(params) == 1 else parts, None if len(params) == 1 else self._new(parts))
        if len(params) == 1:
            self._set(params[0], parts)
        self.flat += handle.flat
        for p in params:
            self.status[p] = "I"
            self.registry[p] = handle

    def _wait(self, p: int) -> None:
        handle = self.registry.pop(p)
        if not handle.waited:  # the first wait copies every parameter out of the flat buffer
            handle.waited = True
            for q in handle.params:
                self._set(q, self.trace.numel[q] * self.itemsize)
        for q in handle.params:
            self.status[q] = "A" if self.status[q] == "I" else self.status[q]
        if handle.flat and not any(self.registry.get(q) is handle for q in handle.params):
            self.flat -= handle.flat
            self.storages.append(("f", handle.storage))

    def fetch(self, e: Event) -> None:
        """`_fetch_sub_module_impl`: gather the module's parameters, wait for them, pop their queue entries, then
        prefetch the next ones not gathered until the bucket (or the live cap) is reached."""
        m, params = e.module, sorted(set(self.trace.modules[e.module].params))
        if not e.forward:
            self.active_backward[m] = None
        self._gather(params)
        for p in params:
            self.active[p].add(m)
            if e.recompute and self.active_backward and not self.trace.trainable[p] and not self.persist[p]:
                self.recompute.setdefault(next(reversed(self.active_backward)), set()).add(p)
            if p in self.registry:
                self._wait(p)
        waiting = {p for p in params if self.most_recent[p] < self.step}
        popped: set[int] = set()
        while self.queue and len(popped) < len(waiting):
            p, at = self.queue.popleft()
            self.most_recent[p] = at
            popped.add(p)
        cap, prefetching, chosen = min(self.live - self.available, self.bucket), 0, []
        while self.queue and prefetching < cap:
            p, at = self.queue.popleft()
            self.most_recent[p] = max(self.most_recent[p], at)
            if self.status[p] == "N" and p not in chosen:
                chosen.append(p)
                prefetching += self.trace.numel[p]
        self._gather(chosen)
        self.step += 1

    def _to_release(self, m: int) -> set[int]:
        """`__params_to_release`: the module's parameters but those reused within the distance, or whose later use
        a prefetch scan passed."""
        key = (m, self.step)
        if key not in self._release:
            own = self.trace.modules[m].params
            params = {p for p in own if not self.persist[p] and self.most_recent[p] <= self.step}
            # the scan over the modules from this step discards a parameter at its next use, while fewer than
            # `reuse` elements lie before that use
            start = self._numel_before[self.step]
            for p in list(params):
                uses = self._uses[p]
                j = bisect.bisect_left(uses, self.step)
                if j < len(uses) and self._numel_before[uses[j]] - start < self.reuse:
                    params.discard(p)
            self._release[key] = params
        return set(self._release[key])

    def _release_param(self, p: int) -> None:
        if self.status[p] == "A" and not self.active[p] and not self.persist[p]:
            self.status[p] = "N"
            self.available -= self.trace.numel[p]
            self._set(p, 0)

    def release(self, e: Event) -> None:
        """`release_sub_module`; in the backward, with the frozen parameters its recompute gathered."""
        m = e.module
        params, release = set(self.trace.modules[m].params), self._to_release(m)
        if not e.forward:
            extra = self.recompute.pop(m, set())
            release |= extra
            params |= extra
            self.active_backward.pop(m, None)
        for p in sorted(params):
            self.active[p].discard(m)
            if p in release:
                self._release_param(p)

    def release_leftovers(self) -> None:
        """`release_backward_leftovers`: the modules whose post-backward hook never ran."""
        while self.active_backward:
            m, _ = self.active_backward.popitem()
            for p in set(self.trace.modules[m].params) | self.recompute.pop(m, set()):
                self.active[p].discard(m)
                self._release_param(p)


@dataclass(eq=False)  # identity: two alike modules are two modules
class _Node:
    """A module as DeepSpeed hooks it: its own parameters (shape, role), its children in the order its forward
    calls them, and whether its output needs a gradient (the backward fetches it)."""

    params: list
    children: list
    grad: bool = False
    layer: int | None = None
    kind: str = ""  # "lora" (peft's wrapper), "block" (self_attn, mlp), "rotary", "" otherwise
    input_grad: bool = False  # its input needs a gradient: its post-backward hook runs
    external: _Node | None = None  # a child whose parameters its forward reads itself (DeepSpeed fetches them)


def _leaf(params: list, layer: int | None = None) -> _Node:
    return _Node(params=params, children=[], layer=layer)


def step_trace(spec: ModelSpec, plan: Plan, *, wrappers: int = 0) -> Trace:
    """The module trace of one forward and backward, as DeepSpeed's hooks see it (parameter_offload.py): every
    module is fetched before its forward (which prefetches, whether it has parameters or not) and released after
    it; in the backward the modules whose output needs a gradient are fetched as it arrives and released once their
    inputs' gradients are made, children in the reverse order. Under checkpointing (non-reentrant, memplan's
    default) a layer's backward starts at its last module, whose backward makes the layer run its forward again up
    to that module's fetch, where the recompute stops (torch/utils/checkpoint.py). `wrappers`: modules around the
    model (memplan profile's loss module)."""
    tree = _ModelTree(spec, plan, wrappers)
    return _Recording(tree, plan).trace()


class _ModelTree:
    """The model's modules as transformers and peft build them: a layer's tree from its parameters' paths
    (self_attn.q_proj), its norms where their names put them, the MLP's activation a module of its own; peft's LoRA
    module runs its base layer, its dropout, lora_A and lora_B, around the model peft's two wrappers."""

    def __init__(self, spec: ModelSpec, plan: Plan, wrappers: int) -> None:
        from memplan.estimator.activations import lora_targets
        from memplan.estimator.states import model_parts

        self.spec, self.adapters = spec, plan.trains_adapters
        self.targets, self.rank = lora_targets(spec, plan), plan.lora.rank if plan.trains_adapters else 0
        front, _, back = model_parts(spec, self.targets, self.rank)
        self.embedding = _Node(params=[front[0]], children=[], kind="embedding")
        children = [self.embedding] + [_Node(params=[p], children=[], kind="embedding") for p in front[1:]]
        if "embeddings" in spec.traits.dropout_modules:
            children.append(_leaf([]))
        if not spec.position_embeddings:
            children.append(_Node(params=[], children=[], kind="rotary"))  # cos/sin: no gradient
        self.layers = [self._decoder_layer(i) for i in range(spec.num_layers)]
        tied = not spec.params_lm_head
        self.lm_head = _leaf([]) if tied else _leaf([back[-1]])  # tied: it holds the embedding's weight
        final = back if tied else back[:-1]
        if sum(math.prod(shape) for shape, _ in final) == sum(item.params for item in spec.final_items):
            final = [((item.params,), "other") for item in spec.final_items]  # a LayerNorm: one module, two tensors
        final = [_leaf([p]) for p in final]
        self.root = _Node(params=[], children=[_Node(params=[], children=children + self.layers + final),
                                               self.lm_head])
        for _ in range(wrappers + (2 if self.adapters else 0)):  # peft's PeftModelForCausalLM and LoraModel
            self.root = _Node(params=[], children=[self.root])

    def _linear(self, lin, layer: int) -> list[_Node]:
        from memplan.estimator.states import layer_lora_tensors

        shapes = layer_lora_tensors((lin,), self.targets, self.rank) if self.targets else []
        if lin.kind == "experts":
            weights = [[((lin.count, lin.d_out, lin.d_in), "other")]]
        else:
            weights = [[((lin.d_out, lin.d_in), "linear")] + ([((lin.d_out,), "other")] if lin.bias else [])
                       for _ in range(lin.count)]
        per = len(shapes) // len(weights)
        out = []
        for k, params in enumerate(weights):
            base, own = _leaf(params, layer), shapes[k * per:(k + 1) * per]
            if not own:
                out.append(base)
                continue
            lora = [_leaf([(shape, "adapter")], layer) for shape in own]
            # peft's forward reads lora_A's weight for its dtype: DeepSpeed registers it as the wrapper's
            # external parameter (parameter_offload.py ZeROOrderedDict), fetched and released with the wrapper
            out.append(_Node(params=[], children=[base, _leaf([], layer)] + lora, layer=layer, kind="lora",
                             external=lora[0]))
        return out

    def _decoder_layer(self, i: int) -> _Node:
        group = self.spec.group_of(i)
        blocks: dict[str, list[_Node]] = {}
        # the attention's output projection runs last, wherever the module registers it (Phi3Attention: first)
        out = dict(self.spec.traits.role_names).get("o", "o_proj")
        for lin in sorted(group.linears, key=lambda lin: lin.name == out):
            blocks.setdefault(lin.path.split(".")[0], []).extend(self._linear(lin, i))
        block_nodes = []
        dropouts = self.spec.traits.dropout_modules
        for k, (name, nodes) in enumerate(blocks.items()):
            if self.spec.model_type in LEAF_MOE_BLOCKS and any(lin.kind == "experts" for lin in group.linears
                                                                if lin.path.split(".")[0] == name):
                params = [p for node in nodes for n in _walk(node) for p in n.params]
                block_nodes.append(_Node(params=params, children=[], layer=i))
                continue
            if len(nodes) > 1 and k:  # the MLP's activation, a module of its own
                nodes.insert(1, _leaf([], i))
            if ("attention", "mlp")[min(k, 1)] in dropouts:
                nodes.append(_leaf([], i))
            block_nodes.append(_Node(params=[], children=nodes, layer=i, kind="block"))
        before: dict[int, list[_Node]] = {}
        after: dict[int, list[_Node]] = {}
        for item in group.items[len(group.linears):]:
            name, node = item.path.rsplit(".", 1)[-1], _leaf([((item.params,), "other")], i)
            if "." in item.path:  # q_norm / k_norm, after the projection they normalize
                block = block_nodes[0].children
                block.insert(min(1 if name.startswith("q") else 3 if name.startswith("k") else len(block),
                                 len(block)), node)
            elif "post_attention" in name:
                after.setdefault(0, []).append(node)
            elif "pre_feedforward" in name or name == "ln_2":
                before.setdefault(1, []).append(node)
            elif "post_feedforward" in name:
                after.setdefault(1, []).append(node)
            else:  # input_layernorm, ln_1
                before.setdefault(0, []).append(node)
        children = []
        for k, block in enumerate(block_nodes):
            dropout = [_leaf([], i)] if ("after_attention", "after_mlp")[min(k, 1)] in dropouts else []
            children += before.get(k, []) + [block] + dropout + after.get(k, [])
        return _Node(params=[], children=children, layer=i)


class _Recording:
    """The tree's modules numbered, which outputs need a gradient, and the events of one step."""

    def __init__(self, tree: _ModelTree, plan: Plan) -> None:
        self.tree, self.ckpt = tree, plan.grad_ckpt
        # the embeddings' output needs a gradient under checkpointing too (enable_input_require_grads)
        self.input_grads = tree.adapters and plan.grad_ckpt
        self.numel: list[int] = []
        self.trainable: list[bool] = []
        self.modules: list[Module] = []
        self.index: dict[int, int] = {}
        self.events: list[Event] = []

    def register(self, node: _Node) -> int:
        if id(node) not in self.index:
            if node.external is not None:
                ids = list(self.modules[self.register(node.external)].params)
            elif node is self.tree.lm_head and not self.tree.spec.params_lm_head:
                ids = list(self.modules[self.register(self.tree.embedding)].params)
            else:
                ids = []
                for shape, role in node.params:
                    self.numel.append(math.prod(shape))
                    self.trainable.append(role == "adapter" if self.tree.adapters else True)
                    ids.append(len(self.numel) - 1)
            self.modules.append(Module(params=tuple(ids), layer=node.layer))
            self.index[id(node)] = len(self.modules) - 1
        return self.index[id(node)]

    def flow(self, node: _Node, needs: bool) -> bool:
        """Whether the node's output needs a gradient: a trained module's, and one whose input needs one."""
        node.input_grad = needs and node.kind != "embedding"  # token and position ids need none
        if node.kind == "rotary":
            node.grad = False
        elif not node.children:
            trained = any(self.trainable[p] for p in self.modules[self.register(node)].params)
            node.grad = needs or trained or (node is self.tree.embedding and self.input_grads)
        elif node.kind in ("block", "lora"):
            # the last module reads what the others made (o_proj, down_proj; lora_B reads lora_A's output); the
            # others read the block's input, a module without parameters the output before it (the activation)
            made, previous = False, needs
            for k, child in enumerate(node.children):
                last = k == len(node.children) - 1
                previous = self.flow(child, needs or made if last else previous if not _has_params(child) else needs)
                made = made or previous
            node.grad = made
        else:  # a layer or the model: each child reads the residual stream
            stream = needs
            for child in node.children:
                stream = self.flow(child, stream) or stream
            node.grad = stream
        return node.grad

    def trace(self) -> Trace:
        for node in _walk(self.tree.root):
            self.register(node)
        self.flow(self.tree.root, False)
        self.forward(self.tree.root)
        self.backward(self.tree.root)
        self.events.append(Event("end", region="end"))
        return Trace(numel=tuple(self.numel), trainable=tuple(self.trainable), modules=tuple(self.modules),
                     events=tuple(self.events))

    def forward(self, node: _Node, region: str = "forward", recompute: bool = False,
                stop: _Node | None = None) -> bool:
        """The node's forward; True where it reached `stop` (checkpointing's recompute ends at its fetch)."""
        m = self.register(node)
        region = "head" if node is self.tree.lm_head and region == "forward" else region
        self.events.append(Event("fetch", m, True, recompute, region))
        if node is stop:
            return True
        for child in node.children:
            if self.forward(child, region, recompute, stop):
                return True
        self.events.append(Event("release", m, True, recompute, region))
        return False

    def backward(self, node: _Node) -> None:
        if not node.grad:
            return
        if self.ckpt and any(node is layer for layer in self.tree.layers):
            self.recomputed_backward(node)
            return
        m = self.register(node)
        self.events.append(Event("fetch", m, False, region="end" if node is self.tree.embedding else "backward"))
        for child in reversed(node.children):
            self.backward(child)
        if node.input_grad:  # else no post-backward hook: the embeddings (ids), frozen layer 0's inputs
            self.events.append(Event("release", m, False, region="backward"))

    def recomputed_backward(self, layer: _Node) -> None:
        """A checkpointed layer: the containers down to its last module and that module fetched, the layer's
        forward again up to it, then the rest of the backward."""
        last = _last_leaf(layer)
        for node in _path_to(layer, last):
            self.events.append(Event("fetch", self.register(node), False, region="backward"))
        for child in layer.children:
            if self.forward(child, "backward", True, stop=last):
                break
        self.events.append(Event("release", self.register(last), False, region="backward"))
        self.backward_rest(layer, last)

    def backward_rest(self, node: _Node, last: _Node) -> None:
        """After a checkpointed layer's last module: the rest in reverse order, the containers on the way to that
        module released as their children finish."""
        for child in reversed(node.children):
            if any(n is last for n in _walk(child)):
                if child is not last:
                    self.backward_rest(child, last)
            else:
                self.backward(child)
        if node is not last:
            self.events.append(Event("release", self.register(node), False, region="backward"))


def _walk(node: _Node):
    yield node
    for child in node.children:
        yield from _walk(child)


def _last_leaf(node: _Node) -> _Node:
    while node.children:
        node = node.children[-1]
    return node


def _path_to(node: _Node, target: _Node) -> list[_Node]:
    if node is target:
        return [node]
    for child in node.children:
        path = _path_to(child, target)
        if path:
            return [node] + path
    return []


def _has_params(node: _Node) -> bool:
    return bool(node.params) or any(_has_params(c) for c in node.children)


@dataclass(frozen=True)
class Moments:
    """Bytes the gathers hold on one GPU at the moments the estimate's phases look at."""

    decoder_end: int  # from the last decoder layer's end to lm_head's forward
    forward_end: int  # at the loss, lm_head's forward done
    last_layer_forward: int  # inside the last decoder layer's forward
    backward_start: int  # the loss's backward and lm_head's, up to the last layer's
    layers_backward: tuple[int, ...]  # [i]: inside decoder layer i's backward (its recompute included)
    end: int  # the embeddings' backward, to the backward's end


def moments(spec: ModelSpec, plan: Plan, world: int, itemsize: int) -> Moments:
    """The coordinator's replay (`replay`) on the step's trace (`step_trace`), with the plan's ds_config values, read
    at the estimate's moments."""
    key = _key(spec, plan, world, itemsize)
    if key not in _MOMENTS:
        _MOMENTS[key] = _moments(spec, plan, world, itemsize)
    return _MOMENTS[key]


_MOMENTS: dict[tuple, Moments] = {}


def _key(spec: ModelSpec, plan: Plan, world: int, itemsize: int) -> tuple:
    """What the trace and its replay depend on."""
    targets = plan.lora.targets if isinstance(plan.lora.targets, str) else tuple(plan.lora.targets)
    sizes = (persistence_threshold(spec, plan), prefetch_bucket(spec, plan), *reuse_and_live(plan))
    return spec, plan.trains_adapters, targets, plan.lora.rank, plan.grad_ckpt, world, itemsize, sizes


def replayed(spec: ModelSpec, plan: Plan, world: int, itemsize: int) -> tuple[Trace, Replay]:
    """The step's trace and the coordinator's replay of it, with the plan's ds_config values (one per model, method
    and checkpointing: a search's plans share it)."""
    key = _key(spec, plan, world, itemsize)
    if key not in _REPLAYS:
        if len(_REPLAYS) >= 16:  # a search over many models: the oldest go
            del _REPLAYS[next(iter(_REPLAYS))]
        trace = step_trace(spec, plan)
        reuse, live = reuse_and_live(plan)
        _REPLAYS[key] = trace, replay(trace, world=world, itemsize=itemsize,
                                      persistent=persistence_threshold(spec, plan), bucket=prefetch_bucket(spec, plan),
                                      reuse=reuse, live=live)
    return _REPLAYS[key]


_REPLAYS: dict[tuple, tuple[Trace, Replay]] = {}


def _moments(spec: ModelSpec, plan: Plan, world: int, itemsize: int) -> Moments:
    trace, replay_ = replayed(spec, plan, world, itemsize)
    held = replay_.held
    layer_of = [trace.modules[e.module].layer if e.kind != "end" else None for e in trace.events]
    forward = [k for k, e in enumerate(trace.events) if e.region in ("forward", "head")]
    backward = [k for k, e in enumerate(trace.events) if e.region in ("backward", "end")]
    head = min(k for k in forward if trace.events[k].region == "head")
    last = spec.num_layers - 1
    last_forward = max(k for k in forward if layer_of[k] == last)
    first_backward = min(k for k in backward if layer_of[k] == last)
    last_backward = max(k for k in backward if layer_of[k] == 0)
    layers = [0] * spec.num_layers
    for k in backward:
        if layer_of[k] is not None and first_backward <= k <= last_backward:
            layers[layer_of[k]] = max(layers[layer_of[k]], held[k])
    return Moments(
        decoder_end=max(held[k] for k in forward if last_forward <= k < head),
        forward_end=held[forward[-1]],
        last_layer_forward=max(held[k] for k in forward if layer_of[k] == last),
        backward_start=max(held[k] for k in backward if k < first_backward),
        layers_backward=tuple(layers),
        end=max(held[k] for k in backward if k > last_backward),
    )
