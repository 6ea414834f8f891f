"""Meters for `memplan profile`: what each backend can see of a training step's memory, per phase.

- `LiveBytes` (backends trace and cpu, and attribution on cuda): a TorchDispatchMode that sees the
  outputs of every op (aten and custom ops such as bitsandbytes') and counts each distinct untyped storage
  once (views share it) at its nbytes, from the op that creates it until the storage is freed (a weakref
  callback on the Python storage object). torch keeps one Python storage object per storage for as long
  as the storage lives only if that object was made while no dispatch mode was active - as inside
  `__torch_dispatch__`; lookups from the driver disable the modes. A storage grown by an out= op is
  re-read when it is an op's output again; `UntypedStorage.resize_` (FSDP frees and re-allocates
  parameters that way) is followed while the meter is active. Kernel workspaces allocated and freed inside
  one op are not seen (on fake tensors they do not exist).
- `CudaMeter`: `torch.cuda.max_memory_allocated` / `max_memory_reserved` per phase (peaks reset between
  phases) and NVML's used memory, with a LiveBytes inside for the breakdown.

Every byte lands in one of the estimate's term names (memplan.estimator.phases.TERMS):
weights (parameters, buffers, 4-bit quantization state), master_weights (fp32 copies the optimizer
steps), gradients, optimizer_states, optimizer_temporaries (anything else alive in the optimizer phase),
logits_loss (the logits - the output embedding's output - and the floating-point tensors the loss computes
from them in the forward, their fp32 copy and the log-softmax; in the backward, what is created until the
gradient reaches the logits; memplan.profile_run._LogitsLossTerm), gathered_params (FSDP's all-gather
buffers and unsharded parameters), comm_buffers (DDP's gradient buckets), activations (everything else,
the output embedding's own saved inputs and the labels included). A storage is classified when it
becomes known as a gradient / state (end of each backward / optimizer step); the phase peaks it was
alive at are corrected then, so a gradient produced at the backward peak counts as a gradient there.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from memplan.estimator.phases import PHASES
from memplan.estimator.phases import TERMS as ESTIMATE_TERMS

#: The terms a meter attributes bytes to: the estimate's, less the workspace (cuBLAS's, outside the tensors).
TERMS = tuple(t for t in ESTIMATE_TERMS if t != "workspace")
# Storages still in one of these may be re-classified when they turn out to be gradients or states.
UNCLASSIFIED = ("activations", "logits_loss", "optimizer_temporaries")


@dataclass
class StepMeasure:
    """One optimizer step, per phase: peak bytes, the allocator's reserved peak, the breakdown at the peak."""

    peaks: dict[str, int]  # phase -> peak allocated bytes (cuda: allocator; cpu/trace: live tensor bytes)
    breakdown: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> term -> bytes
    reserved: dict[str, Optional[int]] = field(default_factory=dict)  # phase -> max_memory_reserved (cuda)
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
    def from_json(cls, d: dict) -> "StepMeasure":
        return cls(peaks=d["phase_peaks"], breakdown=d.get("breakdown") or {},
                   reserved=d.get("reserved") or {}, tensor_peaks=d.get("tensor_peaks") or {})


# ---------------------------------------------------------------- live tensor bytes


def _storage(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage that holds t's bytes: a DTensor's (FSDP2) is its local shard's."""
    return getattr(t, "_local_tensor", t).untyped_storage()


class _Storage:
    __slots__ = ("nbytes", "cat", "born", "ref")

    def __init__(self, nbytes: int, cat: str, born: int) -> None:
        self.nbytes = nbytes
        self.cat = cat
        self.born = born
        self.ref: Optional[weakref.ref] = None


class _Peak:
    __slots__ = ("total", "clock", "breakdown")

    def __init__(self) -> None:
        self.total = -1
        self.clock = -1
        self.breakdown = dict.fromkeys(TERMS, 0)


class LiveBytes(TorchDispatchMode):
    """Running total of live storage bytes, per term, with per-phase maxima per optimizer step."""

    backend = "cpu"

    def __init__(self) -> None:
        super().__init__()
        self._storages: dict[int, _Storage] = {}  # id(untyped storage object) -> record
        self.totals = dict.fromkeys(TERMS, 0)
        self.live = 0
        self.clock = 0  # counts ops; a storage born at clock c was alive at every peak with clock >= c
        self.steps: list[dict[str, _Peak]] = []
        self.current_phase: Optional[str] = None
        self.default = "activations"  # the term of storages an op creates now
        self._peak: Optional[_Peak] = None  # the current phase's peak of the current step
        self._resize = None

    # -- bookkeeping

    def _add(self, st: torch.UntypedStorage, cat: Optional[str] = None) -> None:
        key = id(st)
        rec = self._storages.get(key)
        if rec is not None:
            self._reread(st, rec)
            return
        rec = _Storage(st.nbytes(), cat or self.default, self.clock)
        rec.ref = weakref.ref(st, self._freer(key, rec))
        self._storages[key] = rec
        self.live += rec.nbytes
        self.totals[rec.cat] += rec.nbytes

    def _reread(self, st: torch.UntypedStorage, rec: _Storage) -> None:
        nbytes = st.nbytes()
        if nbytes != rec.nbytes:  # grown by an out= op, or resized by hand
            self.live += nbytes - rec.nbytes
            self.totals[rec.cat] += nbytes - rec.nbytes
            rec.nbytes = nbytes

    def _freer(self, key: int, rec: _Storage):
        def free(_ref: weakref.ref) -> None:
            if self._storages.get(key) is rec:
                del self._storages[key]
            self.live -= rec.nbytes
            self.totals[rec.cat] -= rec.nbytes

        return free

    def _record(self) -> None:
        peak = self._peak
        if peak is not None and self.live > peak.total:
            peak.total = self.live
            peak.clock = self.clock
            peak.breakdown.update(self.totals)

    def _term_of(self, t: torch.Tensor) -> Optional[str]:
        """The term of a tensor an op creates now, when not the default: logits_loss holds only floating-point
        tensors; the integer labels the loss shifts are activations, as in the estimate's head."""
        if self.default == "logits_loss" and not t.is_floating_point():
            return "activations"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.clock += 1
        if isinstance(out, torch.Tensor):
            self._add(_storage(out), self._term_of(out))
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._add(_storage(t), self._term_of(t))
                elif isinstance(t, (tuple, list)):
                    for u in t:
                        if isinstance(u, torch.Tensor):
                            self._add(_storage(u), self._term_of(u))
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

    def register(self, tensors: Iterable[torch.Tensor], cat: str) -> None:
        """Count tensors that exist before the steps (parameters and buffers)."""
        with _disable_current_modes():
            for t in tensors:
                self._add(_storage(t), cat)

    def classify(self, tensors: Iterable[Optional[torch.Tensor]], cat: str) -> None:
        """Mark live storages as `cat`, also at every recorded peak they were alive at."""
        with _disable_current_modes():
            for t in tensors:
                if t is None:
                    continue
                rec = self._storages.get(id(_storage(t)))
                if rec is None or rec.cat not in UNCLASSIFIED:
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

    def phase(self, name: Optional[str]) -> None:
        self.current_phase = name
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


class FakeLiveBytes(LiveBytes):
    """The same meter on fake tensors (backend trace)."""

    backend = "trace"


# ---------------------------------------------------------------- CUDA


class CudaMeter:
    """The caching allocator's peaks per phase (reset between phases), NVML's used memory after each step,
    and a LiveBytes for the breakdown. `stats` is `torch.cuda` (anything with its memory-stat functions)."""

    backend = "cuda"

    def __init__(self, device: str, stats: Any = None, attribute: bool = True) -> None:
        self.device = torch.device(device)
        self.stats = stats if stats is not None else torch.cuda
        self.tracker = LiveBytes() if attribute else None
        self.steps: list[StepMeasure] = []
        self.current_phase: Optional[str] = None
        self.nvml_used: Optional[int] = None
        self.nvml_scope: Optional[str] = None

    def __enter__(self):
        if self.tracker is not None:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        if self.tracker is not None:
            return self.tracker.__exit__(*exc)
        return False

    def _sync(self) -> None:
        self.stats.synchronize(self.device)

    def register(self, tensors: Iterable[torch.Tensor], cat: str) -> None:
        if self.tracker is not None:
            self.tracker.register(tensors, cat)

    def classify(self, tensors, cat: str) -> None:
        if self.tracker is not None:
            self.tracker.classify(tensors, cat)

    @contextlib.contextmanager
    def creating(self, cat: str) -> Iterator[None]:
        with (self.tracker.creating(cat) if self.tracker is not None else contextlib.nullcontext()):
            yield

    @property
    def default(self) -> str:
        return self.tracker.default if self.tracker is not None else "activations"

    @default.setter
    def default(self, cat: str) -> None:
        if self.tracker is not None:
            self.tracker.default = cat

    def new_step(self) -> None:
        if self.steps:
            self._read_nvml()
        self.steps.append(StepMeasure(peaks={}))
        if self.tracker is not None:
            self.tracker.new_step()

    def phase(self, name: Optional[str]) -> None:
        self._sync()
        self._close_phase()
        self.current_phase = name
        self.stats.reset_peak_memory_stats(self.device)
        if self.tracker is not None:
            self.tracker.phase(name)

    def _close_phase(self) -> None:
        name = self.current_phase
        if name is None or not self.steps:
            return
        step = self.steps[-1]
        # forward and backward run once per micro-batch: keep the largest
        step.peaks[name] = max(step.peaks.get(name, 0), int(self.stats.max_memory_allocated(self.device)))
        step.reserved[name] = max(step.reserved.get(name) or 0, int(self.stats.max_memory_reserved(self.device)))

    def allocated_now(self) -> int:
        """The allocator's peak in the current phase so far (what an out-of-memory error ran into)."""
        return int(self.stats.max_memory_allocated(self.device))

    def _read_nvml(self) -> None:
        used, scope = nvml_used(self.device)
        if used is not None:
            self.nvml_used = max(self.nvml_used or 0, used)
            self.nvml_scope = scope

    def result(self) -> list[StepMeasure]:
        self._read_nvml()
        if self.tracker is not None:
            for step, tracked in zip(self.steps, self.tracker.result()):
                step.breakdown = tracked.breakdown
                step.tensor_peaks = tracked.peaks
        return self.steps

    def extras(self) -> dict:
        return {"nvml_used_bytes": self.nvml_used, "nvml_scope": self.nvml_scope}


def nvml_used(device: torch.device) -> tuple[Optional[int], Optional[str]]:
    """NVML's used memory of this process on `device` (its CUDA context included), or of the whole device
    when NVML cannot list processes; (None, None) without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, device)
        pid = os.getpid()
        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory), "process"
        except pynvml.NVMLError:
            pass
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), "device"
    except Exception:  # no NVML, no driver, no permission: the figure is simply not measured
        return None, None


def _nvml_handle(pynvml, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:  # CUDA_VISIBLE_DEVICES renumbers devices; the UUID does not
        text = str(uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v for v in visible.split(",") if v.strip()]
    return pynvml.nvmlDeviceGetHandleByIndex(int(ids[index]) if index < len(ids) and ids[index].isdigit() else index)
