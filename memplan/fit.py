"""Does a plan fit its hardware? The verdict for one resolved plan, as `memplan estimate` prints it and exits by.

The rule is `memplan.recommend.hardware.Target.fits`, the one `recommend` searches with: the device's total
(reserved + CUDA context) within (1 - headroom) x its memory, and offloaded states within (1 - headroom) x
the host RAM per node. This module finds the hardware to judge against and words the answer:

1. --gpu / --gpu-memory / --host-memory / --headroom, each overriding
2. the plan's recorded `target` (what `recommend` planned it for), else
3. the local GPUs (NVML) for a CUDA plan, this machine's CPU and RAM for a CPU plan, else
4. nothing: a CUDA plan is then checked against common GPU sizes (COMMON_SIZES_GIB).

`plan_verdict(spec, plan)` is the entry point for other commands (e.g. a dry run). Nothing here imports
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from memplan.errors import UserError
from memplan.estimator import Estimate, estimate
from memplan.catalog.gpus import COMMON_SIZES_GIB  # the GPU sizes (GiB) a CUDA plan is checked against when no GPU is known
from memplan.catalog.spec import ModelSpec
from memplan.plan import Plan
from memplan.recommend.hardware import (Target, check_headroom, cpu_target, default_host_assumption, gpu_target,
                                        parse_size)

GiB = 1 << 30
#: The headroom when neither --headroom nor the plan's target gives one (recommend's default).
DEFAULT_HEADROOM = 0.10

# Exit codes (README "Exit codes"): 0 the answer is yes, 1 it is no, 2 bad input.
FITS, DOES_NOT_FIT = 0, 1


@dataclass
class Verdict:
    """The answer for one plan. `fits` is None only for a CUDA plan with no GPU known; then `sizes` lists the
    common sizes (GiB) it fits and the exit code says whether it fits the largest."""

    fits: Optional[bool]
    text: str
    target: Optional[Target] = None
    sizes: list[int] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    estimate: Optional[Estimate] = None

    @property
    def exit_code(self) -> int:
        if self.fits is None:
            return FITS if self.sizes else DOES_NOT_FIT
        return FITS if self.fits else DOES_NOT_FIT

    def to_json(self) -> dict:
        t = self.target
        return {"fits": self.fits, "verdict": self.text, "fits_common_sizes_gib": self.sizes if t is None else None,
                "usable_bytes": t.usable_bytes if t else None,
                "host_usable_bytes": t.usable_host_bytes if t and t.device == "cuda" else None,
                "headroom": t.headroom if t else None, "assumptions": self.assumptions}


def resolve_plan_target(plan: Plan, gpu: Optional[str] = None, gpu_memory: Optional[str] = None,
                        host_memory: Optional[str] = None, headroom: Optional[float] = None,
                        assumptions: Optional[list[str]] = None) -> Optional[Target]:
    """The hardware to judge `plan` against (see the module docstring); None when no GPU is known for a
    CUDA plan. --gpu or --gpu-memory replaces the recorded GPU; --host-memory and --headroom their fields."""
    if gpu and gpu_memory:
        raise UserError("give either --gpu or --gpu-memory, not both")
    assumptions = [] if assumptions is None else assumptions
    recorded = plan.target
    if headroom is None:
        headroom = recorded.headroom if recorded else DEFAULT_HEADROOM
        if not recorded:
            assumptions.append(f"headroom {100 * headroom:g} %: a plan must fit {100 - 100 * headroom:g} % of each "
                               "memory (--headroom to change)")
    check_headroom(headroom)
    if plan.device == "cpu":
        if gpu or gpu_memory:
            raise UserError("--gpu / --gpu-memory do not apply to a CPU plan (device: cpu), which must fit host "
                            "RAM: give --host-memory, or plan for GPUs with --device cuda")
        if recorded and (recorded.gpu or recorded.gpu_memory):
            assumptions.append("the plan's target is a GPU but the plan runs on the CPU (device: cpu): checked "
                               "against this machine's RAM")
            recorded = None
        size = host_memory or (recorded.host_memory if recorded else None)
        return cpu_target(plan.gpus, headroom, assumptions, parse_size(size))
    if not (gpu or gpu_memory) and recorded:
        gpu, gpu_memory = recorded.gpu, recorded.gpu_memory
    if host_memory is None and recorded:
        host_memory = recorded.host_memory
    return gpu_target(gpu, gpu_memory, plan.gpus, plan.nodes, headroom, host_memory, assumptions)


def common_size_target(plan: Plan, size_gib: int, headroom: float, host_memory: Optional[str] = None) -> Target:
    """A GPU of `size_gib` GiB for the plan's cluster (host RAM as --host-memory or the default per GPU)."""
    return gpu_target(None, size_gib * GiB, plan.gpus, plan.nodes, headroom, host_memory, [])


def judge(e: Estimate, target: Optional[Target], headroom: float = DEFAULT_HEADROOM,
          host_memory: Optional[str] = None) -> Verdict:
    """The verdict for an estimate on `target` (None: the common GPU sizes)."""
    if target is not None:
        reason = target.why_not(e.total, e.host_bytes)
        if reason is None:
            host = (f"; host RAM {e.host_bytes / GiB:.2f} of {target.usable_host_bytes / GiB:.2f} GiB usable per node"
                    if e.host_bytes else "")
            text = f"fits: {e.total / GiB:.2f} GiB {target.per_device} of {target.usable_explained()}{host}"
        else:
            text = f"does not fit: {reason}"
        return Verdict(fits=reason is None, text=text, target=target)
    sizes = [s for s in COMMON_SIZES_GIB
             if common_size_target(e.plan, s, headroom, host_memory).fits(e.total, e.host_bytes)]
    if sizes:
        text = (f"fits GPUs of {', '.join(f'{s} GiB' for s in sizes)} ({100 * headroom:g} % headroom; no GPU given: "
                "--gpu ID or --gpu-memory SIZE for a verdict)")
    else:
        text = (f"does not fit a {COMMON_SIZES_GIB[-1]} GiB GPU: {e.total / GiB:.2f} GiB per GPU"
                + (f", {e.host_bytes / GiB:.2f} GiB host RAM per node" if e.host_bytes else "")
                + f" ({100 * headroom:g} % headroom)")
    return Verdict(fits=None, text=text, sizes=sizes)


def plan_verdict(spec: ModelSpec, plan: Plan, gpu: Optional[str] = None, gpu_memory: Optional[str] = None,
                 host_memory: Optional[str] = None, headroom: Optional[float] = None,
                 result: Optional[Estimate] = None) -> Verdict:
    """Does a resolved plan fit? Its estimate (or `result`, already computed) against the hardware from the
    flags, the plan's recorded target, the local GPUs or this machine's CPU (module docstring).
    `Verdict.exit_code` is the command's exit status; `Verdict.text` the line to print."""
    assumptions: list[str] = []
    target = resolve_plan_target(plan, gpu, gpu_memory, host_memory, headroom, assumptions)
    result = result or estimate(spec, plan, target.memory_bytes if target else None)
    used = target.headroom if target else (headroom if headroom is not None else
                                           (plan.target.headroom if plan.target else DEFAULT_HEADROOM))
    verdict = judge(result, target, used, host_memory)
    verdict.estimate = result
    verdict.assumptions = list(dict.fromkeys(assumptions + (target.assumptions if target else [])))
    if not result.host_bytes and target is not None:  # nothing offloaded: the host RAM assumed is beside the point
        verdict.assumptions = [a for a in verdict.assumptions if a != default_host_assumption(target.gpus)]
    return verdict
