"""Trace the live allocated bytes of real training steps of a Hugging Face causal LM, per phase.

This is memplan's ground truth: the analytic estimator is tested against it, and `memplan profile` runs
the same code (its trace and cpu backends). It runs the real transformers/peft/torch code of a training
step and records every tensor storage that the step allocates, on fake tensors (`backend="trace"`: any
model size, nothing allocated, ~1-2 s for a 7B step) or on real CPU tensors (`backend="cpu"`: small
models only; the same meter, used to check the fake trace).

How each Plan field becomes the traced step: memplan.runtime.model (model, dtype, attention, LoRA, QLoRA,
checkpointing), memplan.runtime.optim (optimizer, bf16 master weights), memplan.profile.run (the loop:
micro-batches, autocast, loss, grad_accum, zero_grad). How bytes are counted and named:
memplan.runtime.meter. Not traced (a GPU-only or multi-process matter, modelled elsewhere):
sharding/zero/offload, gpus/nodes, the CUDA caching allocator (memplan.estimator.allocator replays the
recorded events), context and workspaces, CUDA optimizer kernel choices; the memory of CUDA's kernels where it
differs from the CPU's is traced with kernels="cuda" (cuda_kernel_memory).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from memplan.errors import UserError
from memplan.plan import Plan
from memplan.profile.run import measure
from memplan.runtime.meter import LiveBytes, StepMeasure

IN_PROCESS_BACKENDS = ("trace", "cpu")  # the profile backends that run in this process without a GPU


@dataclass
class TraceResult:
    steps: list[StepMeasure]  # one per optimizer step
    after_load: int  # live bytes after model build (+LoRA) before the first step
    # storage allocations and frees in order (record_events); with kernels="cuda" also ("w", thread): where a
    # fresh process allocates a thread's cuBLAS workspaces (_CudaLiveBytes)
    events: list[tuple] | None = None

    @property
    def steady(self) -> StepMeasure:
        """The last optimizer step (optimizer states exist from step 1 on)."""
        return self.steps[-1]

    @property
    def peak(self) -> int:
        """Max over all phases of all steps (what torch.cuda.max_memory_allocated would report)."""
        return max(s.peak for s in self.steps)


def trace_training(config, plan: Plan, *, backend: str = "trace", steps: int = 2, seed: int = 0,
                   record_events: bool = False, kernels: str = "cpu") -> TraceResult:
    """Run `steps` optimizer steps of `plan` on the model of `config` and return the per-phase peaks.

    `config`: a transformers PretrainedConfig, a config dict with `model_type`, a config.json path or a
    local model directory. `backend`: "trace" (FakeTensorMode, any size) or "cpu" (CPU tensors).
    `record_events`: also return the order of the step's allocations and frees (`events`), which
    memplan.estimator.allocator.replay serves as the CUDA caching allocator would. `kernels="cuda"` (fake
    tensors only) traces the memory of CUDA's kernels where they differ from the CPU's (cuda_kernel_memory).
    """
    if backend not in IN_PROCESS_BACKENDS:
        raise UserError(f"trace backend '{backend}' is not one of: {', '.join(IN_PROCESS_BACKENDS)}")
    if kernels not in ("cpu", "cuda") or (kernels == "cuda" and backend != "trace"):
        raise UserError(f"kernels '{kernels}': 'cpu', or 'cuda' with the trace backend")
    meter = (_CudaLiveBytes if kernels == "cuda" else LiveBytes)(record_events=record_events)
    with cuda_kernel_memory() if kernels == "cuda" else contextlib.nullcontext():
        result = measure(config, plan, backend=backend, steps=steps, seed=seed, meter=meter)
    return TraceResult(steps=result.steps, after_load=result.after_load, events=meter.events)


# ops that call cuBLAS on CUDA (aten/src/ATen/native/cuda/Blas.cpp), so get their thread's cuBLAS workspace
_CUBLAS_OPS = frozenset(getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_addmm_activation"))


class _CudaLiveBytes(LiveBytes):
    """LiveBytes whose events also say where a fresh CUDA process allocates its cuBLAS workspaces: ("w", thread)
    after the first cuBLAS op of each thread. A workspace belongs to a (cuBLAS handle, stream) pair and handles
    are per thread (aten/src/ATen/cuda/CublasHandlePool.cpp: `cublas_handle_stream_to_workspace`, the
    thread-local pool window of `getCurrentCUDABlasHandle`), and the autograd engine runs a CUDA backward on its
    device's own thread (torch/csrc/autograd/engine.cpp: one ReadyQueue and worker thread per device): "main"
    for the forward and the optimizer, "autograd" for every op run by a backward node. The workspaces are
    allocated after the op's output; their sizes are the allocator replay's business."""

    def __init__(self, record_events: bool = False) -> None:
        super().__init__(record_events)
        self.blas_threads: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if func in _CUBLAS_OPS and self.events is not None:
            thread = "main" if torch._C._current_autograd_node() is None else "autograd"
            if thread not in self.blas_threads:
                self.blas_threads.add(thread)
                self.events.append(("w", thread))
        return out


def replayed_reserved(config, plan: Plan, steps: int = 3) -> dict[str, int]:
    """What the plan's step would leave reserved on a GPU, per allocator ("default", "expandable"): the step
    traced with CUDA's kernel memory, its allocations and frees served by the caching allocator model as in a
    fresh process, each thread's cuBLAS workspaces allocated at its first cuBLAS op (allocator.replay)."""
    from memplan.estimator.allocator import ALLOCATORS, replay

    traced = trace_training(config, plan, steps=steps, record_events=True, kernels="cuda")
    return {a: replay(traced.events, a).peak_reserved for a in ALLOCATORS}


@contextlib.contextmanager
def cuda_kernel_memory() -> Iterator[None]:
    """Run the CPU's ops with the memory of CUDA's where the two differ (fake tensors: values do not matter).
    Each rule follows torch's source (torch 2.11-2.13):

    - dropout is CUDA's fused native_dropout, which saves a bool mask (aten/src/ATen/native/Dropout.cpp,
      `dropout`: `is_fused_kernel_acceptable` holds for CUDA tensors only; the CPU's composite saves an
      input-dtype noise tensor).
    - attention dropout runs inside SDPA's fused kernel (CUDA's flash and efficient kernels keep only their RNG
      state; the CPU falls back to the math kernel for dropout, which keeps the probabilities).
    - fp32 (or any not 16-bit) attention with grouped-query heads runs SDPA's math kernel, which keeps the
      b x heads x s x s probabilities for the backward (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp:
      `can_use_flash_attention` and cuDNN's `check_dtypes_low_precision` take fp16/bf16 only, and
      `can_use_mem_efficient_attention` checks `check_batch_size_and_num_heads_dense<false>`: no grouped-query
      heads); the CPU's flash kernel takes both (sdp_utils_cpp.cpp). See `_sdpa_on_cuda`.
    - in the backward (`_CudaBackward`, entered inside every `torch.autograd.backward`):
      autograd sums two gradients of one tensor in place where CUDA does (torch/csrc/autograd/input_buffer.cpp,
      `accumulate`: `old_var.add_(var)` when `can_accumulate_inplace(old_var)` - a dense tensor whose only
      reference, and whose storage's only reference, is the input buffer - and var is not tensor-subclass-like);
      in the trace every such sum was out of place, because `at::isTensorSubclassLike` is true for every tensor
      while a dispatch mode is active (aten/src/ATen/TensorSubclassLikeUtils.h: `dispatch_mode_enabled()`),
      the meter and fake tensors being one. So the residual stream's and an fp32 norm input's gradients are
      summed in place; the gradients of an input that several projections read, and a tied embedding's two
      weight gradients, are not on CUDA either (the first is a view whose base the view keeps alive: the
      storage has two references). A second micro-batch's gradient is added in place on both
      (functions/accumulate_grad.h: `variable_grad += new_grad`).
      softmax's backward allocates `grad * output` after its result, before its kernel runs, and frees it after
      (aten/src/ATen/native/cuda/SoftMax.cu, `softmax_backward_cuda_out`: `Tensor tmp = grad * output;`); the
      CPU kernel has no such temporary. log_softmax's backward has none on either.
      the embedding's backward sorts its indices past 3072 of them and sums per segment in fp32 buffers
      sized by the number of indices (`_embedding_backward_on_cuda`).
    The cuBLAS workspaces are marked in the events where a fresh process allocates them (`_CudaLiveBytes`, used
    by trace_training with kernels="cuda"); their size is the allocator replay's.
    Not emulated: workspaces that CUDA kernels allocate and free inside one op where their size or the kernel
    is not known here (flash / cuDNN attention's backward, cub's sort scratch), and dropout inside SDPA's math
    kernel."""
    import torch.nn.functional as F

    dropout, sdpa, backward = F.dropout, F.scaled_dot_product_attention, torch.autograd.backward

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        return torch.native_dropout(input, p, True)[0]

    F.dropout, F.scaled_dot_product_attention = fused_dropout, _sdpa_on_cuda(sdpa)
    torch.autograd.backward = _backward_on_cuda(backward)
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention, torch.autograd.backward = dropout, sdpa, backward


def _sdpa_on_cuda(sdpa):
    """F.scaled_dot_product_attention with the kernel CUDA would run: a 16-bit or multi-head-equal call keeps
    the CPU's flash kernel (as CUDA's flash / efficient / cuDNN kernels, no s x s tensor), without dropout (it
    happens inside CUDA's kernel); a wider dtype with grouped-query heads runs the math kernel. A value head dim
    other than the query's (MLA) runs CUDA's memory-efficient kernel (sdp_utils.cpp
    `check_head_dim_size_mem_efficient` takes it; flash needs equal dims), which the CPU has no counterpart of
    (its flash kernel refuses them: the math kernel would run): `_MemoryEfficientAttention` keeps its memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cuda_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False):
        grouped = query.size(-3) != key.size(-3)
        if _sdpa_dtype(query) not in (torch.float16, torch.bfloat16) and grouped:
            with sdpa_kernel([SDPBackend.MATH]):
                return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if query.size(-1) != value.size(-1) and not grouped:
            dtype = _sdpa_dtype(query)  # autocast casts the inputs (the function is no autocast op)
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # SDPA's convert_boolean_attn_mask
                attn_mask = torch.where(attn_mask, 0.0, float("-inf")).to(dtype)
            return _MemoryEfficientAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), attn_mask)
        return sdpa(query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)

    return cuda_sdpa


class _MemoryEfficientAttention(torch.autograd.Function):
    """The memory of CUDA's memory-efficient attention (aten/src/ATen/native/transformers/cuda/attention.cu,
    `_efficient_attention_forward` and its backward; values are not computed: fake tensors): the output, laid out
    (b, s, heads, d) and returned as its (b, heads, s, d) view, and the fp32 log-sum-exp (b, heads, s); q, k, v,
    the mask, the output and the log-sum-exp saved; the backward makes the gradients of q, k and v."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask):
        b, heads, s = query.shape[:3]
        out = query.new_empty((b, s, heads, value.size(-1))).transpose(1, 2)
        lse = query.new_empty((b, heads, s), dtype=torch.float32)
        ctx.save_for_backward(query, key, value, attn_mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value = ctx.saved_tensors[:3]
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


def _sdpa_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype SDPA's kernel gets: autocast casts its inputs to the autocast dtype (aten/src/ATen/autocast_mode.cpp:
    `KERNEL_CUDA(scaled_dot_product_attention, lower_precision_fp)`; the trace's CPU autocast stands for CUDA's)."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def _backward_on_cuda(backward):
    """torch.autograd.backward running `_CudaBackward` on top of the active dispatch modes; every node of the
    graph gets a post hook, which runs after the node and before the engine adds its outputs to the input
    buffers of the nodes they feed (torch/csrc/autograd/engine.cpp: `call_function`, then
    `InputBuffer::add` in `evaluate_function`)."""

    def cuda_backward(tensors, *args, **kwargs):
        mode = _CudaBackward(_unique_use_counts(backward))
        roots = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        handles = _hook_nodes(roots, mode)
        try:
            with mode:
                return backward(tensors, *args, **kwargs)
        finally:
            mode.summing = None
            for handle in handles:
                handle.remove()

    return cuda_backward


def _hook_nodes(roots, mode) -> list:
    def ran(grad_inputs, grad_outputs):  # the engine sums this node's outputs next, as this node
        mode.summing = torch._C._current_autograd_node()

    handles, seen = [], set()
    stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.next_functions:  # AccumulateGrad has no outputs
            handles.append(node.register_hook(ran))
        stack.extend(f for f, _ in node.next_functions if f is not None)
    return handles


class _CudaBackward(TorchDispatchMode):
    """The backward's ops as CUDA runs them (see cuda_kernel_memory): the engine's sum of two gradients in place
    where InputBuffer::accumulate would do it on CUDA; softmax's backward temporary. `unique`: the (tensor,
    storage) use counts a gradient held by the input buffer alone shows here (_unique_use_counts); None
    records the counts of each sum in `seen` instead."""

    def __init__(self, unique: tuple[int, int] | None) -> None:
        super().__init__()
        self.unique = unique
        self.summing = None  # the node whose outputs the engine is adding to input buffers now
        self.seen: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.add.Tensor and self._engine_sum(args, kwargs):
            old, new = args
            counts = (old._use_count(), _storage_use_count(old))
            if self.unique is None:
                self.seen.append(counts)
            elif _accumulates_in_place(old, new) and counts[0] <= self.unique[0] and counts[1] <= self.unique[1]:
                return torch.ops.aten.add_.Tensor(old, new)
        if func is torch.ops.aten.embedding_dense_backward.default:
            return _embedding_backward_on_cuda(func, args, kwargs)
        out = func(*args, **kwargs)
        if func is torch.ops.aten._softmax_backward_data.default:
            grad, output = args[0], args[1]
            tmp = grad * output  # allocated after grad_input, freed when the kernel returns
            del tmp
        return out

    def _engine_sum(self, args, kwargs) -> bool:
        """InputBuffer::accumulate's `old_var + var`: an add right after a node ran, as that node, with grad
        mode off (with it on, the engine always adds out of place)."""
        return (self.summing is not None and len(args) == 2 and kwargs.get("alpha", 1) == 1
                and not torch.is_grad_enabled() and torch._C._current_autograd_node() is self.summing)


def _embedding_backward_on_cuda(func, args, kwargs):
    """embedding_dense_backward as CUDA runs it past 3072 indices (aten/src/ATen/native/cuda/Embedding.cu,
    `embedding_dense_backward_cuda`): the indices sorted into two index arrays alive through the op, after an
    arange freed once sorted; then `embedding_backward_cuda_kernel` (EmbeddingBackwardKernel.cu) allocates the
    zeroed result and, sized by the number of indices so that it needs no device sync, four index arrays, two
    scalars and the partial sums per segment (indices x embedding width, fp32 for a 16-bit gradient), all freed
    when it returns. cub's own scratch buffers for the sort and scans are not counted."""
    grad, indices, scale_by_freq = args[0], args[1], args[4]
    n = indices.numel()
    if n <= 3072 and not scale_by_freq:
        return func(*args, **kwargs)
    like = {"dtype": indices.dtype, "device": indices.device}
    sorting = [grad.contiguous(), torch.empty(n, **like), torch.empty(n, **like)]
    torch.arange(n, **like)
    if scale_by_freq:
        sorting.append(torch.empty(n, **like))
    out = func(*args, **kwargs)
    partial = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
    scalar = {"dtype": torch.int64, "device": indices.device}
    kernel = [torch.empty(n, **like), torch.empty((), **scalar), torch.empty(n, **like), torch.empty(n, **like),
              torch.empty((), **scalar), torch.empty(n, **like),
              torch.empty(n, grad.size(-1), dtype=partial, device=grad.device)]
    del kernel, sorting  # a list drops its items last first: C++'s order of destruction
    return out


def _accumulates_in_place(old: torch.Tensor, new: torch.Tensor) -> bool:
    """`can_accumulate_inplace(old)` but for the use counts: a plain strided, non-overlapping and dense tensor
    of the sum's shape and dtype."""
    if old.layout != torch.strided or new.layout != torch.strided or old.is_nested or old._is_zerotensor():
        return False
    if old.shape != new.shape or old.dtype != new.dtype:
        return False
    return _non_overlapping_and_dense(old)


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """c10's `compute_non_overlapping_and_dense`: some permutation of t's dims is contiguous."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _storage_use_count(t: torch.Tensor) -> int:
    with _disable_current_modes():
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


@functools.cache
def _unique_use_counts(backward) -> tuple[int, int]:
    """The (tensor, storage) use counts `_CudaBackward` sees for a gradient that only the input buffer holds (the
    dispatcher, the Python object and this lookup add their own references): the first of two fresh gradients
    of `h` summed, on a two-branch graph of plain tensors, outside every other mode."""
    with _disable_current_modes():
        x = torch.ones(2, requires_grad=True)
        h = x * 1.0
        loss = (h.sin() + h.cos()).sum()
        mode = _CudaBackward(None)
        handles = _hook_nodes([loss], mode)
        with mode:
            backward(loss)
        mode.summing = None
        for handle in handles:
            handle.remove()
    return mode.seen[0]
