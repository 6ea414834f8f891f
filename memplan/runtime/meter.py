"""The live-bytes meter that `memplan profile` (its trace and cpu backends, and the breakdown on cuda) and
`memplan train` (its measured peak on the CPU) both count memory with.

`LiveBytes` is a TorchDispatchMode that sees the outputs of every op (aten and custom ops such as
bitsandbytes') and counts each distinct untyped storage once (views share it) at its nbytes, from the op
that creates it until the storage is freed (a weakref callback on the Python storage object). torch keeps
one Python storage object per storage for as long as the storage lives only if that object was made while
no dispatch mode was active - as inside `__torch_dispatch__`; lookups from the driver disable the modes. A
storage grown by an out= op is re-read when it is an op's output again; `UntypedStorage.resize_` (FSDP
frees and re-allocates parameters that way) is followed while the meter is active. Kernel workspaces
allocated and freed inside one op are not seen (on fake tensors they do not exist): the estimate's
`workspace` term is the one term the meter does not measure (METERED_TERMS).

Every byte lands in one of the estimate's term names (memplan.estimator.phases.TERMS):
weights (parameters, buffers, 4-bit quantization state), master_weights (fp32 copies the optimizer
steps), gradients, optimizer_states, optimizer_temporaries (anything else alive in the optimizer phase),
logits_loss (the logits - the output embedding's output - and the floating-point tensors the loss computes
from them in the forward, their fp32 copy and the log-softmax; in the backward, what is created until the
gradient reaches the logits; memplan.profile.run), gathered_params (FSDP's all-gather buffers and unsharded
parameters), comm_buffers (DDP's gradient buckets), activations (everything else, the output embedding's
own saved inputs and the labels included). A storage is classified when it becomes known as a gradient /
state (end of each backward / optimizer step); the phase peaks it was alive at are corrected then, so a
gradient produced at the backward peak counts as a gradient there.

`memplan train` reads the run's peak (`PeakMemory`): on CUDA `torch.cuda.max_memory_allocated()` over the
run (the figure memplan's estimate predicts) and `max_memory_reserved()` for the caching allocator; on the
CPU, which has no allocator statistic for tensors, a `LiveBytes` over the first `steps` optimizer steps only
(step 1 creates the optimizer states; step 2 is the steady state), then the counting stops so it does not
slow the run. Not seen on the CPU: buffers that DDP/gloo allocate outside torch's dispatcher.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from memplan.estimator.phases import PHASES, TERMS

METERED_TERMS = tuple(t for t in TERMS if t != "workspace")
# Storages still in one of these may be re-classified when they turn out to be gradients or states.
UNCLASSIFIED = ("activations", "logits_loss", "optimizer_temporaries")
GAP_FLAG = 0.10  # a measured peak more than 10 % away from the estimate is flagged


@dataclass
class StepMeasure:
    """One optimizer step, per phase: peak bytes, the allocator's reserved peak, the breakdown at the peak."""

    peaks: dict[str, int]  # phase -> peak allocated bytes (cuda: allocator; cpu/trace: live tensor bytes)
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> term -> bytes
    reserved: dict[str, int | None] = field(default_factory=dict)  # phase -> max_memory_reserved (cuda)
    tensor_peaks: dict[str, int] = field(default_factory=dict)  # phase -> LiveBytes peak (cuda: beside the allocator)

    @property
    def forward(self) -> int:
        return self.peaks.get("forward", 0)

    @property
    def backward(self) -> int:
        return self.peaks.get("backward", 0)

    @property
    def optimizer(self) -> int:
        return self.peaks.get("optimizer", 0)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)

    def to_json(self) -> dict:
        return {"phase_peaks": dict(self.peaks), "breakdown": self.breakdown,
                "reserved": self.reserved or None, "tensor_peaks": self.tensor_peaks or None}

    @classmethod
    def from_json(cls, d: dict) -> StepMeasure:
        return cls(peaks=d["phase_peaks"], breakdown=d.get("breakdown") or {},
                   reserved=d.get("reserved") or {}, tensor_peaks=d.get("tensor_peaks") or {})


# ---------------------------------------------------------------- live tensor bytes


def _tensors(out) -> Iterator[torch.Tensor]:
    """The tensors an op returned: itself, or those in its (nested) tuple or list."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage that holds t's bytes: a DTensor's (FSDP2) is its local shard's."""
    return getattr(t, "_local_tensor", t).untyped_storage()


class _Storage:
    __slots__ = ("nbytes", "cat", "born", "ref", "uid", "host")

    def __init__(self, nbytes: int, cat: str, born: int, uid: int, host: bool = False) -> None:
        self.nbytes = nbytes
        self.cat = cat
        self.born = born
        self.ref: weakref.ref | None = None
        self.uid = uid
        self.host = host  # host memory in a run that stands in for a GPU on the CPU: known, never counted


class _Peak:
    __slots__ = ("total", "clock", "breakdown")

    def __init__(self) -> None:
        self.total = -1
        self.clock = -1
        self.breakdown = dict.fromkeys(METERED_TERMS, 0)


class LiveBytes(TorchDispatchMode):
    """Running total of live storage bytes, per term, its peak, and per-phase maxima per optimizer step."""

    def __init__(self, record_events: bool = False, device_type: str | None = None) -> None:
        super().__init__()
        # Count only storages on this device type (a CUDA run's CPU tensors are host memory); None: every one
        self.device_type = device_type
        # With record_events, the order in which storages are allocated and freed, for the allocator model
        # (memplan.estimator.allocator.replay): ("a", uid, nbytes), ("f", uid), ("p", phase), ("s",) a new step.
        self.events: list[tuple] | None = [] if record_events else None
        self._uids = itertools.count(1)
        self._storages: dict[int, _Storage] = {}  # id(untyped storage object) -> record
        self.totals = dict.fromkeys(METERED_TERMS, 0)
        self.live = 0
        self.peak = 0  # the most bytes alive at once since the meter started
        self.clock = 0  # counts ops; a storage born at clock c was alive at every peak with clock >= c
        self.steps: list[dict[str, _Peak]] = []
        self.current_phase: str | None = None
        self.default = "activations"  # the term of storages an op creates now
        self._peak: _Peak | None = None  # the current phase's peak of the current step
        self._resize = None
        self._host = 0  # inside host(): storages created are host memory

    # -- bookkeeping

    def _add(self, st: torch.UntypedStorage, cat: str | None = None) -> None:
        key = id(st)
        rec = self._storages.get(key)
        if rec is not None:
            if not rec.host:
                self._reread(st, rec)
            return
        rec = _Storage(st.nbytes(), cat or self.default, self.clock, next(self._uids), host=self._host > 0)
        rec.ref = weakref.ref(st, self._freer(key, rec))
        self._storages[key] = rec
        if rec.host:
            return
        self.live += rec.nbytes
        self.totals[rec.cat] += rec.nbytes
        self._event_alloc(rec)

    def _reread(self, st: torch.UntypedStorage, rec: _Storage) -> None:
        nbytes = st.nbytes()
        if nbytes != rec.nbytes:  # grown by an out= op, or resized by hand
            self.live += nbytes - rec.nbytes
            self.totals[rec.cat] += nbytes - rec.nbytes
            self._event_free(rec)  # a resize is a new allocation (the old one is freed after the copy)
            rec.nbytes = nbytes
            rec.uid = next(self._uids)
            self._event_alloc(rec)

    def _event_alloc(self, rec: _Storage) -> None:
        if self.events is not None and rec.nbytes:
            self.events.append(("a", rec.uid, rec.nbytes))

    def _event_free(self, rec: _Storage) -> None:
        if self.events is not None and rec.nbytes:
            self.events.append(("f", rec.uid))

    def _freer(self, key: int, rec: _Storage):
        def free(_ref: weakref.ref) -> None:
            if self._storages.get(key) is rec:
                del self._storages[key]
            if rec.host:
                return
            self.live -= rec.nbytes
            self.totals[rec.cat] -= rec.nbytes
            self._event_free(rec)

        return free

    def _record(self) -> None:
        self.peak = max(self.peak, self.live)
        peak = self._peak
        if peak is not None and self.live > peak.total:
            peak.total = self.live
            peak.clock = self.clock
            peak.breakdown.update(self.totals)

    def _counts(self, t: torch.Tensor) -> bool:
        """Not meta tensors, shapes without memory (DeepSpeed keeps its parameters' as meta tensors); with a
        device type, only tensors on it."""
        kind = t.device.type
        return kind != "meta" and (self.device_type is None or kind == self.device_type)

    def _term_of(self, t: torch.Tensor) -> str | None:
        """The term of a tensor an op creates now, when not the default: logits_loss holds only floating-point
        tensors; the integer labels the loss shifts are activations, as in the estimate's head."""
        if self.default == "logits_loss" and not t.is_floating_point():
            return "activations"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        for t in _tensors(out):
            if self._counts(t):
                self._add(_storage(t), self._term_of(t))
        self._record()
        return out

    def __enter__(self):
        # Follow hand-made resizes (FSDP frees unsharded parameters with storage.resize_(0)).
        original = torch.UntypedStorage.resize_
        meter = self

        def resize_(storage, size):
            result = original(storage, size)
            rec = meter._storages.get(id(storage))
            if rec is not None:
                meter._reread(storage, rec)
                meter._record()
            return result

        self._resize = torch.UntypedStorage.__dict__.get("resize_")  # None: inherited from the C base
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        if self._resize is None:
            del torch.UntypedStorage.resize_
        else:
            torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    # -- driver interface (called with the dispatch modes active; storage lookups run with them disabled)

    def register(self, tensors: Iterable[torch.Tensor], cat: str = "weights") -> None:
        """Count tensors that exist before the steps (parameters and buffers)."""
        with _disable_current_modes():
            for t in tensors:
                if self._counts(t):
                    self._add(_storage(t), cat)
        self._record()

    def classify(self, tensors: Iterable[torch.Tensor | None], cat: str) -> None:
        """Mark live storages as `cat`, also at every recorded peak they were alive at."""
        with _disable_current_modes():
            for t in tensors:
                if t is None:
                    continue
                rec = self._storages.get(id(_storage(t)))
                if rec is None or rec.host or rec.cat not in UNCLASSIFIED:
                    continue
                old, rec.cat = rec.cat, cat
                self.totals[old] -= rec.nbytes
                self.totals[cat] += rec.nbytes
                for step in self.steps:
                    for peak in step.values():
                        if peak.clock >= rec.born:
                            peak.breakdown[old] -= rec.nbytes
                            peak.breakdown[cat] += rec.nbytes

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created inside are host memory, not counted from then on: a run on the CPU standing in for a
        GPU run whose optimizer steps in host RAM (DeepSpeed's ZeRO-Offload)."""
        self._host += 1
        try:
            yield
        finally:
            self._host -= 1

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count live storages as host memory from now on (a buffer pinned right after it was made). The phase
        peaks already recorded keep them: call this before the measured steps."""
        with _disable_current_modes():
            for t in tensors:
                st = _storage(t)
                rec = self._storages.get(id(st))
                if rec is None:  # made before the meter started: known from now on, as host memory
                    self._host += 1
                    self._add(st)
                    self._host -= 1
                    continue
                if rec.host:
                    continue
                rec.host = True
                self.live -= rec.nbytes
                self.totals[rec.cat] -= rec.nbytes
                self._event_free(rec)

    @contextlib.contextmanager
    def creating(self, cat: str) -> Iterator[None]:
        """Storages created inside count as `cat` (e.g. the DDP wrapper's buckets: comm_buffers)."""
        old, self.default = self.default, cat
        try:
            yield
        finally:
            self.default = old

    def new_step(self) -> None:
        self.steps.append({})
        self._peak = None
        if self.events is not None:
            self.events.append(("s",))

    def phase(self, name: str | None) -> None:
        self.current_phase = name
        if self.events is not None:
            self.events.append(("p", name))
        self.default = "optimizer_temporaries" if name == "optimizer" else "activations"
        if name is None:
            self._peak = None
            return
        self._peak = self.steps[-1].setdefault(name, _Peak())
        self._record()

    def allocated_now(self) -> int:
        return self.live

    def result(self) -> list[StepMeasure]:
        out = []
        for step in self.steps:
            peaks = {ph: max(step[ph].total, 0) for ph in PHASES if ph in step}
            out.append(StepMeasure(peaks=peaks, breakdown={ph: dict(step[ph].breakdown) for ph in peaks},
                                   tensor_peaks=dict(peaks)))
        return out

    def extras(self) -> dict:
        return {}


# ---------------------------------------------------------------- the run's peak (memplan train)


def existing_tensors(model, optimizer) -> list[torch.Tensor]:
    """Parameters, buffers, gradients, optimizer states and 4-bit quantization states alive now."""
    from memplan.runtime.model import quant_state_tensors

    out: list[torch.Tensor] = []
    for p in model.parameters():
        out.append(p.data if not hasattr(p, "to_local") else p.to_local())
        if p.grad is not None:
            out.append(p.grad)
    out += quant_state_tensors(model)
    out += list(model.buffers())
    for st in getattr(optimizer, "state", {}).values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return [t for t in out if t.device.type != "meta"]


class PeakMemory:
    """Measures the peak over the first `steps` optimizer steps (CPU) or the whole run (CUDA)."""

    def __init__(self, device: torch.device, steps: int = 2) -> None:
        self.cuda = device.type == "cuda"
        self.steps = steps
        self.mode: LiveBytes | None = None
        self.peak_bytes: int | None = None
        self.reserved_bytes: int | None = None
        self.measured_steps = 0
        self.max_tokens_per_row = 0

    def start(self, model, optimizer) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        self.mode = LiveBytes()
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


def compare_peak(measured: int, estimated: int) -> dict:
    """Measured vs estimated peak: relative gap (measured / estimated - 1) and whether it is over 10 %."""
    gap = measured / estimated - 1 if estimated else float("inf")
    return {"measured_bytes": measured, "estimated_bytes": estimated, "gap": gap, "flag": abs(gap) > GAP_FLAG}
