"""This process's host RAM as the kernel counts it, per phase of a run: what `memplan train` measures against
the host estimate (memplan.estimator.host).

Linux: /proc/self/status `VmHWM`, the peak resident set size since the process started or since the peak was
last reset, and writing "5" to /proc/self/clear_refs resets it to the current resident set (Linux 4.0+,
proc(5)), so each phase gets its own peak. The resident set counts anonymous memory and the mapped file
pages the process has touched (a memory-mapped safetensors file), as the estimate does per process.
Elsewhere: getrusage's ru_maxrss for the whole run, without phases. No torch here.
"""

from __future__ import annotations

import resource
import sys

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(key: str) -> int | None:
    try:
        with open(STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int | None:
    """The peak resident set (bytes) since the start or the last `reset_peak`."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB elsewhere


def reset_peak() -> bool:
    """Start a new peak at the current resident set; False where the system cannot."""
    try:
        with open(CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """The peak resident set of each phase of a run: `enter(phase)` closes the current phase (its peak kept, the
    larger one when a phase comes back, as training does between checkpoints) and starts the next; the first
    phase runs from the process's start."""

    def __init__(self, first: str) -> None:
        self.peaks: dict[str, int] = {}
        self.current: str | None = first
        self.resets = True

    def enter(self, phase: str | None) -> None:
        """Close the current phase; start `phase` (None: stop measuring)."""
        peak = peak_rss()
        if self.current is not None and peak is not None:
            self.peaks[self.current] = max(peak, self.peaks.get(self.current, 0))
        self.current = phase
        if phase is not None:
            self.resets = reset_peak() and self.resets

    def stop(self) -> dict[str, int]:
        self.enter(None)
        return dict(self.peaks)
