"""The run's own peak memory, measured, next to the plan's estimate.

CUDA: `torch.cuda.max_memory_allocated()` over the run (the figure memplan's estimate predicts), and
`max_memory_reserved()` for the caching allocator.
CPU: there is no allocator statistic for tensors, so live tensor bytes are counted for the first
`steps` optimizer steps only (step 1 creates the optimizer states; step 2 is the steady state), then
the counting stops so it does not slow the run: a TorchDispatchMode sees every op's output, each
distinct storage is counted once at its size until it is freed (a weakref callback on the storage), and
the parameters, buffers, gradients and optimizer states alive at the start are counted from the start.
Not seen on the CPU: memory a kernel allocates and frees inside one op, and buffers that DDP/gloo
allocate outside torch's dispatcher.
"""

from __future__ import annotations

import weakref
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

GAP_FLAG = 0.10  # a measured peak more than 10 % away from the estimate is flagged


class LiveTensorBytes(TorchDispatchMode):
    """Running total and peak of live tensor storage bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        nbytes = storage.nbytes()
        old = self._sizes.get(key)
        if old is not None:
            if old != nbytes:  # grown by an out= op
                self.live += nbytes - old
                self._sizes[key] = nbytes
            return
        self._sizes[key] = nbytes
        self._refs[key] = weakref.ref(storage, self._freer(key))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _freer(self, key: int):
        def free(_ref) -> None:
            self.live -= self._sizes.pop(key, 0)
            self._refs.pop(key, None)

        return free

    def _visit(self, out) -> None:
        if isinstance(out, torch.Tensor):
            self._add(out.untyped_storage())
        elif isinstance(out, (tuple, list)):
            for item in out:
                self._visit(item)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._visit(out)
        self.peak = max(self.peak, self.live)
        return out

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        # Storage lookups with the mode disabled keep one Python object per storage (see memplan.trace).
        with _disable_current_modes():
            for t in tensors:
                self._add(t.untyped_storage())


def existing_tensors(model, optimizer) -> list[torch.Tensor]:
    """Parameters, buffers, gradients, optimizer states and 4-bit quantization states alive now."""
    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p.data if not hasattr(p, "to_local") else p.to_local())
        if p.grad is not None:
            out.append(p.grad)
        state = getattr(p, "quant_state", None)
        while state is not None:
            out += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            state = getattr(state, "state2", None)
    out += list(model.buffers())
    for st in getattr(optimizer, "state", {}).values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return [t for t in out if t.device.type != "meta"]


class PeakMemory:
    """Measures the peak over the first `steps` optimizer steps (CPU) or the whole run (CUDA)."""

    def __init__(self, device: torch.device, steps: int = 2) -> None:
        self.cuda = device.type == "cuda"
        self.steps = steps
        self.mode: Optional[LiveTensorBytes] = None
        self.peak_bytes: Optional[int] = None
        self.reserved_bytes: Optional[int] = None
        self.measured_steps = 0
        self.max_tokens_per_row = 0

    def start(self, model, optimizer) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        self.mode = LiveTensorBytes()
        self.mode.register(existing_tensors(model, optimizer))
        self.mode.__enter__()

    def step_done(self, rows_len: int) -> None:
        """Called after each optimizer step with the longest sequence of its micro-batches."""
        if self.cuda:
            self.measured_steps += 1
            self.max_tokens_per_row = max(self.max_tokens_per_row, rows_len)
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.reserved_bytes = torch.cuda.max_memory_reserved()
            return
        if self.mode is None:
            return
        self.measured_steps += 1
        self.max_tokens_per_row = max(self.max_tokens_per_row, rows_len)
        self.peak_bytes = self.mode.peak
        if self.measured_steps >= self.steps:
            self.stop()

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None


def compare(measured: int, estimated: int) -> dict:
    """Measured vs estimated peak: relative gap (measured / estimated - 1) and whether it is over 10 %."""
    gap = measured / estimated - 1 if estimated else float("inf")
    return {"measured_bytes": measured, "estimated_bytes": estimated, "gap": gap, "flag": abs(gap) > GAP_FLAG}
