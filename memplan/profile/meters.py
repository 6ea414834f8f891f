"""Meters for `memplan profile` beyond live bytes (memplan.runtime.meter): on cuda, `CudaMeter` reads
`torch.cuda.max_memory_allocated` / `max_memory_reserved` per phase (peaks reset between phases) and NVML's
used memory, with a LiveBytes inside for the breakdown into the estimate's terms.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from memplan.runtime.meter import LiveBytes, StepMeasure


class CudaMeter:
    """The caching allocator's peaks per phase (reset between phases), NVML's used memory after each step,
    and a LiveBytes for the breakdown. `stats` is `torch.cuda` (anything with its memory-stat functions)."""

    backend = "cuda"

    def __init__(self, device: str, stats: Any = None, attribute: bool = True) -> None:
        self.device = torch.device(device)
        self.stats = stats if stats is not None else torch.cuda
        # the breakdown counts the measured device's tensors: host ones (offloaded states, pinned buffers) are not
        self.tracker = LiveBytes(device_type=self.device.type) if attribute else None
        self.steps: list[StepMeasure] = []
        self.current_phase: str | None = None
        self.nvml_used: int | None = None
        self.nvml_scope: str | None = None

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

    def phase(self, name: str | None) -> None:
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


def nvml_used(device: torch.device) -> tuple[int | None, str | None]:
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
