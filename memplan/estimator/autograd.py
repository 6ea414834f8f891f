"""A small symbolic autograd: which tensors a forward pass keeps alive for the backward.

The estimator replays a decoder layer's forward as transformers writes it, op by op, on symbolic
tensors (element count, bytes per element, requires_grad). Each op records what torch's autograd
formula for it saves (torch/csrc/autograd/FunctionsManual.cpp, tools/autograd/derivatives.yaml):

    linear(x, W)      saves x if W is trainable, W if x needs grad (W is a parameter: no new bytes)
    mul(a, b)         saves b if a needs grad and a if b needs grad
    pow(x, 2)         saves x;  rsqrt(x) saves its result;  silu/gelu(x) save x;  relu saves its result
    softmax           saves its result;  log_softmax (inside cross_entropy) saves its result
    tanh, sigmoid     save their result
    sdpa (flash/efficient kernels) saves q, k, v, out, the fp32 log-sum-exp (b*heads*s*4 B) and the
                      attention mask it was given (converted to the query dtype)
    dropout(p > 0)    saves its mask: a bool (1 B/element) on CUDA (native_dropout),
                      an input-dtype noise tensor on the CPU (bernoulli * input)
    embedding, index, topk, gather: save the int64 indices
    casts, views, adds, scalar multiplies save nothing;  add(a, b) hands each input the sum's gradient,
                      cast to the input's dtype where it differs (AddBackward0)

A view (a slice of a fused projection, a transpose) shares its base's storage: the replay passes the
base T itself, so saving several views of one output counts it once.

A tensor saved by several ops is counted once. Nothing is saved when no input needs a gradient,
which is why a LoRA model's first layer keeps less: its input comes from a frozen embedding.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field

_ids = itertools.count()
# Set by memplan.estimator.stream while it records a replay's allocations: told of every tensor created, of
# every trainable weight a linear uses (whose gradient the backward allocates) and of every sum of two tensors
# (whose gradient the backward hands to both).
_recorder = None


@dataclass(frozen=True)
class T:
    """A symbolic tensor: numel elements of `nbytes_per` bytes; `rg` = requires grad."""

    numel: int
    itemsize: int
    rg: bool
    uid: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        if _recorder is not None:
            _recorder.created(self)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class Tape:
    """Records the saved tensors of one forward; `kernels` is 'cuda' or 'cpu' (dropout masks differ)."""

    kernels: str = "cuda"
    saved: dict[int, int] = field(default_factory=dict)
    # of `saved`, what a custom autograd.Function keeps as a ctx attribute rather than through save_for_backward:
    # out of reach of the saved-tensor hooks that non-reentrant checkpointing discards saved tensors with
    attributes: dict[int, int] = field(default_factory=dict)
    # moments of the backward inside the module (`backward_moment`), in bytes: the most it holds there
    backward_moments: list[int] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    def save(self, *tensors: T) -> None:
        for t in tensors:
            self.saved.setdefault(t.uid, t.nbytes)

    def cache(self, t: T) -> None:
        """autocast's cast of a trainable leaf (a weight): held in autocast's cache until the autocast region exits
        (aten/src/ATen/autocast_mode.cpp `cached_cast`), whatever autograd saves. Counted by the estimate as
        `Activations.forward_extra`; the allocation stream frees it when the forward ends."""
        if _recorder is not None:
            _recorder.cached(t)

    def backward_moment(self, transient: int) -> None:
        """A moment of the backward when it is back at this point of the forward: what was saved up to here is
        alive (the nodes after it have run and released theirs), with `transient` bytes of gradients."""
        self.backward_moments.append(self.saved_bytes + transient)

    def keep_as_attribute(self, t: T) -> None:
        """ctx.A = A in a custom Function's forward: saved for the backward, bypassing saved-tensor hooks."""
        self.save(t)
        self.attributes.setdefault(t.uid, t.nbytes)

    # ---------------------------------------------------------------- ops
    def new(self, numel: int, itemsize: int, rg: bool) -> T:
        return T(numel, itemsize, rg)

    def cast(self, x: T, itemsize: int) -> T:
        return x if itemsize == x.itemsize else T(x.numel, itemsize, x.rg)

    def linear(self, x: T, out_numel: int, w_trainable: bool, out_itemsize: int | None = None,
               w_numel: int | None = None) -> T:
        """x @ W: saves x where W is trained. `w_numel`: W's elements where they are not the input's features times
        the output's (a stack of weights, one per batch of torch.bmm)."""
        if w_trainable:
            self.save(x)
            if _recorder is not None and w_numel:
                _recorder.weight_grad(w_numel, x.itemsize)
            elif _recorder is not None:
                _recorder.weight_used(x.numel, out_numel, x.itemsize)
        out = T(out_numel, out_itemsize or x.itemsize, x.rg or w_trainable)
        if _recorder is not None:
            _recorder.matmul()
        return out

    def add(self, a: T, b: T, out_itemsize: int | None = None) -> T:
        """a + b (a residual add, peft's base + adapter): saves nothing."""
        out = T(max(a.numel, b.numel), out_itemsize or max(a.itemsize, b.itemsize), a.rg or b.rg)
        if _recorder is not None:
            _recorder.added(out, a, b)
        return out

    def weight_read(self, numel: int, in_itemsize: int) -> None:
        """A trainable weight of `numel` elements read by an op other than `linear` (a router's F.linear on a weight
        it holds, a grouped expert stack): the backward makes its gradient, computed in the input's dtype."""
        if _recorder is not None:
            _recorder.weight_grad(numel, in_itemsize)

    def backward_scratch(self, x: T, nbytes: int) -> None:
        """A node reading `x` allocates `nbytes` beside the gradient it makes for x, and frees them as it returns (a
        kernel's temporaries, no tensor of the graph)."""
        if _recorder is not None and x.rg:
            _recorder.backward_scratch(x, nbytes)

    def parametrized(self, w: T) -> None:
        """`w` is made from parameters alone (peft's W + BA for an expert stack, W + delta for a router): the node
        that reads it makes its whole gradient, which the parametrization's backward reduces to the factors' and
        frees; it flows into no activation's gradient."""
        if _recorder is not None:
            _recorder.parametrized(w)

    def mul(self, a: T, b: T, out_itemsize: int | None = None, out_numel: int | None = None) -> T:
        """a * b (or a matmul of a and b): each factor is saved for the other's gradient.
        `out_numel` when a factor is a view of a larger storage (a chunk of a fused projection)."""
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        numel = out_numel or max(a.numel, b.numel)
        out = T(numel, out_itemsize or max(a.itemsize, b.itemsize), a.rg or b.rg)
        if a.rg and b.rg and _recorder is not None:
            _recorder.multiplied(out, a, b)
        return out

    def scale_by_param(self, x: T, param_trainable: bool) -> T:
        """weight * x with a 1-D weight (RMSNorm, LayerNorm affine)."""
        if param_trainable:
            self.save(x)
        return T(x.numel, x.itemsize, x.rg or param_trainable)

    def unary_saving_input(self, x: T, out_itemsize: int | None = None) -> T:
        if x.rg:
            self.save(x)
        return T(x.numel, out_itemsize or x.itemsize, x.rg)

    def unary_saving_output(self, x: T, out_itemsize: int | None = None) -> T:
        """An op that saves its result (rsqrt, tanh, sigmoid, softmax): its node, which makes x's gradient, releases
        the result as it returns, after the node that made the result's gradient."""
        out = T(x.numel, out_itemsize or x.itemsize, x.rg)
        if x.rg:
            self.save(out)
            if _recorder is not None:
                _recorder.released_with(out, x)
        return out

    def softmax(self, x: T, out_itemsize: int | None = None) -> T:
        """softmax(x, dim, dtype) as at::softmax runs it (aten/src/ATen/native/SoftMax.cpp): an input of another
        dtype is first copied to it (`input_.toType(dtype)`, freed when the op returns; only CUDA's fp16 input to
        fp32 takes the fused half_to_float kernel, which none of memplan's regimes reaches: autocast's fp32 policy
        copies first too). Saves its result. On CUDA its backward allocates `grad * output`, the result's size,
        beside the input's gradient (SoftMax.cu, softmax_backward_cuda_out); the CPU kernel has no temporary."""
        x = self.cast(x, out_itemsize or x.itemsize)
        out = self.unary_saving_output(x)
        if self.kernels == "cuda":
            self.backward_scratch(x, out.nbytes)
        return out

    def index(self, x: T, out_numel: int, idx_numel: int) -> T:
        """x[idx] (advanced indexing): saves the int64 index tensor when x needs grad."""
        if x.rg:
            self.save(T(idx_numel, 8, False))
        return T(out_numel, x.itemsize, x.rg)

    def dropout(self, x: T, p: float) -> T:
        if p <= 0:
            return x
        out = T(x.numel, x.itemsize, x.rg)
        if x.rg:
            mask_itemsize = 1 if self.kernels == "cuda" else x.itemsize
            self.save(T(x.numel, mask_itemsize, False))
        return out


class _Lifetimes:
    """A recorder (see `_recorder`) of each tensor's allocation and the moment the replay drops it."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.cache: set[int] = set()

    def created(self, t: T) -> None:
        if t.nbytes > 0:
            self.events.append((t.uid, t.nbytes))
            weakref.finalize(t, self.events.append, (t.uid, -t.nbytes))

    def cached(self, t: T) -> None:
        self.cache.add(t.uid)

    def matmul(self) -> None:
        pass

    def weight_used(self, in_numel: int, out_numel: int, in_itemsize: int) -> None:
        pass

    def weight_grad(self, numel: int, in_itemsize: int) -> None:
        pass

    def parametrized(self, w: T) -> None:
        pass

    def backward_scratch(self, x: T, nbytes: int) -> None:
        pass

    def released_with(self, out: T, x: T) -> None:
        pass

    def multiplied(self, out: T, a: T, b: T) -> None:
        pass

    def added(self, out: T, a: T, b: T) -> None:
        pass


def live_peak(run, x: T, keep: Tape | None = None) -> int:
    """The most bytes alive at once while `run(x)` replays a module's forward, beyond its input x: each tensor freed
    when the replay drops its last reference (as CPython's reference counting frees a torch tensor), nothing kept
    for the backward (what non-reentrant checkpointing's forward does: its pack hook keeps no saved tensor,
    torch/utils/checkpoint.py). autocast's cached casts are left out: they stay until the forward ends, and
    `Activations.forward_extra` counts them for every layer.
    `keep`: the tape `run` saves into, whose saved tensors stay alive once made, up to the one made last: the
    recompute of a checkpointed module in the backward, which keeps all it saves for the module's backward nodes and
    stops there (torch/utils/checkpoint.py: _StopRecomputationError once every saved tensor is back). The casts
    autocast caches there are counted: the recompute makes them again."""
    global _recorder
    rec = _Lifetimes()
    _recorder = rec
    try:
        out = run(x)
        del out  # its bytes were counted when it was made
    finally:
        _recorder = None
    live = peak = 0
    kept = keep.saved if keep is not None else {}
    events = rec.events
    if kept:
        events = events[:max(i for i, (uid, nbytes) in enumerate(events) if nbytes > 0 and uid in kept) + 1]
    for uid, nbytes in events:
        if (keep is not None or uid not in rec.cache) and not (nbytes < 0 and uid in kept):
            live += nbytes
            peak = max(peak, live)
    return peak
