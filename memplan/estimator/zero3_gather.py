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

import math
from collections import deque
from dataclasses import dataclass

from memplan.catalog.spec import ModelSpec
from memplan.plan import Plan

#: DeepSpeed's defaults (deepspeed/runtime/zero/config.py), which memplan's ds_config leaves:
#: stage3_max_reuse_distance and stage3_max_live_parameters, in elements.
MAX_REUSE_DISTANCE = 1_000_000_000
MAX_LIVE_PARAMETERS = 1_000_000_000


def persistence_threshold(spec: ModelSpec) -> int:
    """HF "auto" (memplan's ds_config): stage3_param_persistence_threshold = 10 * hidden_size."""
    return 10 * spec.hidden_size


def prefetch_bucket(spec: ModelSpec) -> int:
    """HF "auto" (memplan's ds_config): stage3_prefetch_bucket_size = 0.9 * hidden_size**2."""
    return int(0.9 * spec.hidden_size ** 2)


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
    """Per event of the trace: the elements the coordinator counts as gathered (its __n_available_params) and the
    bytes the gathers hold (the parameters and any coalesced buffer)."""

    available: tuple[int, ...]
    held: tuple[int, ...]


def replay(trace: Trace, *, world: int, itemsize: int, persistent: int, bucket: int,
           reuse: int = MAX_REUSE_DISTANCE, live: int = MAX_LIVE_PARAMETERS) -> Replay:
    """Run the coordinator's fetch and release rules over the trace, from its second step (the trace complete)."""
    numel, modules = trace.numel, trace.modules
    persist = [n <= persistent for n in numel]
    order = [e.module for e in trace.events if e.kind == "fetch"]  # the recorded submodule order
    queue = deque((p, step) for step, m in enumerate(order) for p in sorted(set(modules[m].params)))
    status = ["A" if persist[p] else "N" for p in range(len(numel))]
    most_recent = [-10 ** 10] * len(numel)
    active: list[set[int]] = [set() for _ in numel]
    active_backward: dict[int, None] = {}
    recompute: dict[int, set[int]] = {}
    registry: dict[int, list] = {}  # param -> its handle [params, flat bytes, waited]
    data = [0] * len(numel)  # bytes of each gathered parameter's own tensor
    state = {"available": 0, "flat": 0, "data": 0}
    step = 0
    release_cache: dict[tuple[int, int], set[int]] = {}

    def set_data(p: int, nbytes: int) -> None:
        state["data"] += nbytes - data[p]
        data[p] = nbytes

    def aligned(p: int) -> int:
        return math.ceil(numel[p] / world) * world

    def gather(params: list[int]) -> None:
        params = [p for p in params if status[p] == "N"]
        if not params:
            return
        state["available"] += sum(numel[p] for p in params)
        if len(params) == 1:
            handle = [params, 0, True]
            set_data(params[0], aligned(params[0]) * itemsize)
        else:
            flat = sum(math.ceil(numel[p] / world) for p in params) * world * itemsize
            handle = [params, flat, False]
            state["flat"] += flat
        for p in params:
            status[p] = "I"
            registry[p] = handle

    def wait(p: int) -> None:
        handle = registry.pop(p)
        if not handle[2]:  # the first wait copies every parameter out of the flat buffer
            handle[2] = True
            for q in handle[0]:
                set_data(q, numel[q] * itemsize)
        for q in handle[0]:
            status[q] = "A" if status[q] == "I" else status[q]
        if handle[1] and not any(registry.get(q) is handle for q in handle[0]):
            state["flat"] -= handle[1]

    def release_param(p: int) -> None:
        if status[p] == "A" and not active[p] and not persist[p]:
            status[p] = "N"
            state["available"] -= numel[p]
            set_data(p, 0)

    def to_release(m: int, at: int) -> set[int]:
        key = (m, at)
        if key not in release_cache:
            params = {p for p in modules[m].params if not persist[p]}
            params -= {p for p in modules[m].params if most_recent[p] > at}
            traversed = 0
            for later in order[at:]:
                if traversed >= reuse or not params:
                    break
                for p in modules[later].params:
                    params.discard(p)
                    traversed += numel[p]
            release_cache[key] = params
        return set(release_cache[key])

    available, held = [], []
    for e in trace.events:
        if e.kind == "fetch":
            m = e.module
            params = sorted(set(modules[m].params))
            if not e.forward:
                active_backward[m] = None
            gather([p for p in params if status[p] == "N"])
            for p in params:
                active[p].add(m)
                if e.recompute and active_backward and not trace.trainable[p] and not persist[p]:
                    recompute.setdefault(next(reversed(active_backward)), set()).add(p)
                if p in registry:
                    wait(p)
            waiting = {p for p in params if most_recent[p] < step}
            popped: set[int] = set()
            while queue and len(popped) < len(waiting):
                p, at = queue.popleft()
                most_recent[p] = at
                popped.add(p)
            cap, prefetching, chosen = min(live - state["available"], bucket), 0, []
            while queue and prefetching < cap:
                p, at = queue.popleft()
                most_recent[p] = max(most_recent[p], at)
                if status[p] == "N" and p not in chosen:
                    chosen.append(p)
                    prefetching += numel[p]
            gather(chosen)
            step += 1
        elif e.kind == "release":
            m = e.module
            params = set(modules[m].params)
            release = to_release(m, step)
            if not e.forward:
                extra = recompute.pop(m, set())
                release |= extra
                params |= extra
                active_backward.pop(m, None)
            for p in sorted(params):
                active[p].discard(m)
                if p in release:
                    release_param(p)
        else:  # the backward's leftovers: modules whose post-backward hook never ran
            while active_backward:
                m, _ = active_backward.popitem()
                for p in set(modules[m].params) | recompute.pop(m, set()):
                    active[p].discard(m)
                    release_param(p)
        available.append(state["available"])
        held.append(state["data"] + state["flat"])
    return Replay(available=tuple(available), held=tuple(held))




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
    inputs' gradients are made, children in the reverse order. A layer's tree comes from its parameters' paths
    (self_attn.q_proj), norms where their names put them, the activation a module of its own; peft's LoRA module
    runs its base layer, its dropout, lora_A and lora_B. Under checkpointing (non-reentrant, memplan's default) a
    layer's backward starts at its last module, whose backward makes the layer run its forward again up to that
    module's fetch, where the recompute stops (torch/utils/checkpoint.py). `wrappers`: modules around the model
    (memplan profile's loss module)."""
    from memplan.estimator.activations import lora_targets
    from memplan.estimator.states import layer_lora_tensors, model_parts

    adapters = plan.trains_adapters
    targets = lora_targets(spec, plan)
    rank = plan.lora.rank if adapters else 0
    front, _, back = model_parts(spec, targets, rank)

    def linear(lin, layer: int) -> list[_Node]:
        shapes = layer_lora_tensors((lin,), targets, rank) if targets else []
        if lin.kind == "experts":
            weights = [[((lin.count, lin.d_out, lin.d_in), "other")]]
        else:
            weights = [[((lin.d_out, lin.d_in), "linear")] + ([((lin.d_out,), "other")] if lin.bias else [])
                       for _ in range(lin.count)]
        per = len(shapes) // len(weights)
        out = []
        for k, params in enumerate(weights):
            own = shapes[k * per:(k + 1) * per]
            if not own:
                out.append(_leaf(params, layer))
                continue
            base = _leaf(params, layer)
            lora = [_leaf([(shape, "adapter")], layer) for shape in own]
            # peft's forward reads lora_A's weight for its dtype: DeepSpeed registers it as the wrapper's
            # external parameter (parameter_offload.py ZeROOrderedDict), fetched and released with the wrapper
            out.append(_Node(params=[], children=[base, _leaf([], layer)] + lora, layer=layer, kind="lora",
                             external=lora[0]))
        return out

    def decoder_layer(i: int) -> _Node:
        group = spec.group_of(i)
        blocks: dict[str, list[_Node]] = {}
        for lin in group.linears:
            blocks.setdefault(lin.path.split(".")[0], []).extend(linear(lin, i))
        block_nodes = []
        for name, nodes in blocks.items():
            if len(nodes) > 1 and name != list(blocks)[0]:  # the MLP's activation, a module of its own
                nodes.insert(1, _leaf([], i))
            block_nodes.append(_Node(params=[], children=nodes, layer=i, kind="block"))
        before: dict[int, list[_Node]] = {}
        after: dict[int, list[_Node]] = {}
        for item in group.items[len(group.linears):]:
            name = item.path.rsplit(".", 1)[-1]
            node = _leaf([((item.params,), "other")], i)
            if "." in item.path:  # q_norm / k_norm, after the projection they normalize
                block = block_nodes[0].children
                at = 1 if name.startswith("q") else 3 if name.startswith("k") else len(block)
                block.insert(min(at, len(block)), node)
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
            children += before.get(k, []) + [block] + after.get(k, [])
        return _Node(params=[], children=children, layer=i)

    embedding = _leaf([front[0]])
    model_children = [embedding] + [_leaf([p]) for p in front[1:]]
    if not spec.position_embeddings:
        model_children.append(_Node(params=[], children=[], kind="rotary"))  # cos/sin: no gradient
    layers = [decoder_layer(i) for i in range(spec.num_layers)]
    final = [_leaf([p]) for p in back if p[0] != (spec.vocab_size, spec.params_lm_head // spec.vocab_size)] \
        if spec.params_lm_head else [_leaf([p]) for p in back]
    lm_head = _leaf([back[-1]]) if spec.params_lm_head else _leaf([])
    root = _Node(params=[], children=[_Node(params=[], children=model_children + layers + final), lm_head])
    for _ in range(wrappers + (2 if adapters else 0)):  # peft's PeftModelForCausalLM and LoraModel
        root = _Node(params=[], children=[root])

    numel: list[int] = []
    trainable: list[bool] = []
    modules: list[Module] = []
    index: dict[int, int] = {}

    def register(node: _Node) -> int:
        if id(node) not in index:
            if node.external is not None:
                ids = list(modules[register(node.external)].params)
                modules.append(Module(params=tuple(ids), layer=node.layer))
                index[id(node)] = len(modules) - 1
                return index[id(node)]
            ids = []
            for shape, role in node.params:
                numel.append(math.prod(shape))
                trainable.append(role == "adapter" if adapters else True)
                ids.append(len(numel) - 1)
            modules.append(Module(params=tuple(ids), layer=node.layer))
            index[id(node)] = len(modules) - 1
        return index[id(node)]

    for node in _walk(root):
        register(node)
    if not spec.params_lm_head:  # tied: lm_head's module holds the embedding's weight
        modules[index[id(lm_head)]] = Module(params=modules[index[id(embedding)]].params, layer=None)

    # which outputs need a gradient: a trained module's, and one whose input needs one; the embeddings' output
    # needs one under checkpointing too (enable_input_require_grads)
    def own(node: _Node) -> bool:
        return any(trainable[p] for p in modules[register(node)].params)

    def flow(node: _Node, needs: bool) -> bool:
        node.input_grad = needs
        if node.kind == "rotary":
            node.grad = False
        elif not node.children:
            node.grad = needs or own(node) or (node is embedding and adapters and plan.grad_ckpt)
        elif node.kind in ("block", "lora"):
            # the last module reads what the others made (o_proj, down_proj; lora_B reads lora_A's output); the
            # others read the block's input, a module without parameters the output before it (the activation)
            made, previous = False, needs
            for k, child in enumerate(node.children):
                last = k == len(node.children) - 1
                reads = needs or made if last else previous if not _has_params(child) else needs
                previous = flow(child, reads)
                made = made or previous
            node.grad = made
        else:  # a layer or the model: each child reads the residual stream
            stream = needs
            for child in node.children:
                got = flow(child, stream)
                stream = stream or got
            node.grad = stream
        return node.grad

    flow(root, False)
    events: list[Event] = []

    def forward(node: _Node, region: str = "forward", recompute: bool = False, stop: _Node | None = None) -> bool:
        m = register(node)
        region = "head" if node is lm_head and region == "forward" else region
        events.append(Event("fetch", m, True, recompute, region))
        if node is stop:
            return True
        for child in node.children:
            if forward(child, region, recompute, stop):
                return True
        events.append(Event("release", m, True, recompute, region))
        return False

    def backward(node: _Node, region: str = "backward") -> None:
        if not node.grad:
            return
        m = register(node)
        if plan.grad_ckpt and any(node is layer for layer in layers):
            last = _last_leaf(node)
            events.append(Event("fetch", m, False, region=region))
            for container in _path_to(node, last)[1:-1]:
                events.append(Event("fetch", register(container), False, region=region))
            events.append(Event("fetch", register(last), False, region=region))
            for child in node.children:
                if forward(child, region, True, stop=last):
                    break
            events.append(Event("release", register(last), False, region=region))
            _backward_rest(node, last, region)
            return
        events.append(Event("fetch", m, False, region=region if node is not embedding else "end"))
        for child in reversed(node.children):
            backward(child, region)
        if node.input_grad:  # else no post-backward hook: the embedding (token ids), frozen layer 0's inputs
            events.append(Event("release", m, False, region=region))

    def _backward_rest(node: _Node, last: _Node, region: str) -> None:
        """A checkpointed layer's backward after its last module's: the rest in reverse order, the containers on
        the way to that module released as their children finish."""
        for child in reversed(node.children):
            if any(n is last for n in _walk(child)):
                if child is not last:
                    _backward_rest(child, last, region)
            else:
                backward(child, region)
        if node is not last:
            events.append(Event("release", register(node), False, region=region))

    forward(root)
    backward(root)
    events.append(Event("end", region="end"))
    return Trace(numel=tuple(numel), trainable=tuple(trainable), modules=tuple(modules), events=tuple(events))


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
    """The coordinator's replay (`replay`) on the step's trace (`step_trace`), with memplan's ds_config values, read
    at the estimate's moments."""
    targets = plan.lora.targets if isinstance(plan.lora.targets, str) else tuple(plan.lora.targets)
    key = (spec, plan.trains_adapters, targets, plan.lora.rank, plan.grad_ckpt, world, itemsize)
    if key not in _MOMENTS:
        _MOMENTS[key] = _moments(spec, plan, world, itemsize)
    return _MOMENTS[key]


_MOMENTS: dict[tuple, Moments] = {}


def _moments(spec: ModelSpec, plan: Plan, world: int, itemsize: int) -> Moments:
    trace = step_trace(spec, plan)
    held = replay(trace, world=world, itemsize=itemsize, persistent=persistence_threshold(spec),
                  bucket=prefetch_bucket(spec)).held
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
