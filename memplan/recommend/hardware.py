"""What the plan is for: GPUs (a preset, a size, or the local devices) or this machine's CPU.

Memory is the limit a plan must fit with headroom (`Target.fits`: the one rule `recommend` and `estimate`
share); the throughput figures feed the time model (`memplan.recommend.throughput`).

Nothing here measures anything: a plan depends only on its inputs. A GPU's figures come from its preset;
a CPU's from its instruction set and core count as /proc/cpuinfo states them, and the training rates
measured once for each instruction-set class (`CPU_FP32_RATE`, `CPU_BF16_SPEED`). No torch here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memplan.catalog.gpus import Gpu
from memplan.errors import UserError
from memplan.estimator.host import PROCESS_BASELINE_BYTES  # each process's interpreter and libraries
from memplan.report.units import GiB, format_bytes, memory_setting

if TYPE_CHECKING:
    from memplan.estimator import Estimate

#: The throughput figures assumed for a GPU known only by its memory (--gpu-memory, or a local device
#: without a preset): an A100 40GB's, the most common training GPU without a newer preset match. Said
#: out loud as an assumption whenever used.
REFERENCE_GPU = "a100-40gb"

#: GPU-to-GPU bandwidth between nodes, GB/s per direction per GPU: one 400 Gb/s InfiniBand NDR port per
#: GPU, as in NVIDIA's DGX H100 (8 x ConnectX-7 400 Gb/s; DGX H100 datasheet) = 50 GB/s.
INTER_NODE_GBPS = 50.0


#: Host RAM per GPU assumed for a GPU cluster that is not this machine (a run's host peak must fit it:
#: memplan.estimator.host): 128 GiB, NVIDIA DGX A100's ratio (1 TB system memory for 8 GPUs; DGX A100
#: datasheet). --host-memory gives the real figure per node.
HOST_RAM_PER_GPU = 128 * GiB

#: Where the CPU time model's figures below were measured (benchmarks/cpu_time_calibration.py writes it; its
#: `--fit` prints these tables from it).
CPU_RATES = "benchmarks/results/cpu-time-calibration.jsonl"

# A CPU's training rate is a table of measurements, not a datasheet peak x MFU: per core, per precision
# regime and method, at two model widths (d_model 192: demo-tiny; 512: a 4-layer Llama of 14.7M
# parameters) and two row lengths, interpolated log-linearly between them and held constant outside
# (`at_width`, `at_shape`). Measured by benchmarks/cpu_time_calibration.py on this project's AMD EPYC (Zen 4,
# avx512_bf16): `memplan train`'s wall-clock steps on micro-batches of 8 packed rows of 256 tokens and of the
# CPU demo's 32 short rows, AdamW, no checkpointing, at 1 thread (and 2 for fp32), the median step after the
# first 4 of 10, the median of 3 rounds; the rate is the model FLOPs as `throughput.train_flops_per_token`
# counts them over the step less its optimizer step (CPU_OPTIMIZER_NS_PER_PARAM x trainable parameters) and its
# per-layer cost (CPU_OVERHEAD_MS_PER_LAYER). Narrow models run below the matmul rate: norms, rotary, softmax
# and loss are a larger share of their step, and little of that speeds up in bf16.
# benchmarks/results/time-accuracy.md checks the model on plans outside this calibration.

#: The row length (tokens per row) of the packed calibration rows: the rate where a plan's is not known.
ROW_LEN = 256

#: fp32 training FLOP/s per core, by row length (the CPU demo's rows of about 43 tokens, padded to the longest of
#: each micro-batch of 32, and packed rows of 256), (d_model, rate), for full fine-tuning and for adapters
#: (LoRA / QLoRA: peft's dropout and adapter matmuls take time the FLOP count leaves out).
CPU_FP32_RATE: dict[str, dict[int, tuple[tuple[int, float], ...]]] = {
    "full": {43: ((192, 69.33e9), (512, 91.55e9)), 256: ((192, 71.0e9), (512, 92.91e9))},
    "adapters": {43: ((192, 41.42e9), (512, 68.13e9)), 256: ((192, 42.2e9), (512, 67.68e9))},
}

#: What each core beyond the first adds to a process's speed (torch's intra-op threads), per method, regime and row
#: length, (d_model, gain): the rate at 2 threads / at 1 thread - 1, measured at 2 (further cores taken to add as
#: much). Short rows' small matrices gain less, and so do the bf16 regimes (their casts and autocast's
#: bookkeeping do not spread over threads as the matmuls do).
CPU_EXTRA_CORE_GAIN: dict[str, dict[str, dict[int, tuple[tuple[int, float], ...]]]] = {
    "full": {
        "fp32": {43: ((192, 0.638), (512, 0.846)), 256: ((192, 0.762), (512, 0.881))},
        "amp-bf16": {43: ((192, 0.637), (512, 0.488)), 256: ((192, 0.378), (512, 0.759))},
        "bf16": {43: ((192, 0.481), (512, 0.677)), 256: ((192, 0.582), (512, 0.685))},
    },
    "adapters": {
        "fp32": {43: ((192, 0.305), (512, 0.62)), 256: ((192, 0.59), (512, 0.706))},
        "amp-bf16": {43: ((192, 0.241), (512, 0.352)), 256: ((192, 0.394), (512, 0.431))},
        "bf16": {43: ((192, 0.332), (512, 0.351)), 256: ((192, 0.388), (512, 0.468))},
    },
}

#: What a decoder layer costs per micro-batch beyond its FLOPs (dispatching its ops, Python): milliseconds per
#: layer, per method, (d_model, ms), at one thread, from the fp32 steps at two micro-batch sizes (0 where the
#: larger one ran slower per FLOP: a 512-wide full fine-tuning).
CPU_OVERHEAD_MS_PER_LAYER: dict[str, tuple[tuple[int, float], ...]] = {
    "full": ((192, 0.3096), (512, 0.0)),
    "adapters": ((192, 1.2493), (512, 0.4105)),
}

#: The optimizer step on the CPU, nanoseconds per parameter, by optimizer and parameter itemsize: (1 thread,
#: 2 threads), stepping 4.2M parameters in 8 tensors (benchmarks/cpu_time_calibration.py). Paged variants
#: take their optimizer's figure. The CPU's foreach AdamW runs per-tensor loops under the foreach API, slower
#: on one thread than the plain for-loop.
CPU_OPTIMIZER_NS_PER_PARAM: dict[str, dict[int, tuple[float, float]]] = {
    "adamw": {4: (3.852, 0.921), 2: (1.514, 0.82)},
    "adamw-fused": {4: (0.576, 0.278), 2: (0.796, 0.411)},
    "adamw-forloop": {4: (1.78, 1.001), 2: (1.5, 0.817)},
    "adamw-8bit": {4: (18.1, 10.159), 2: (18.239, 10.098)},
    "sgd": {4: (0.522, 0.228), 2: (0.589, 0.327)},
    "adafactor": {4: (1.998, 3.245), 2: (1.679, 3.467)},
}

#: Train-step speed of each bf16 regime relative to fp32 on the same core (its matmul rate / fp32's),
#: (d_model, speed) (by row length where measured at two), by how the CPU multiplies bf16 (`bf16_class`) and what
#: trains:
#: - "native": AVX512-BF16 (`avx512_bf16`; AMD Zen 4+, Intel Cooper Lake) or Arm's BF16 extension: oneDNN
#:   multiplies bf16 directly (measured, CPU_RATES);
#: - "amx": Intel AMX (`amx_bf16`, Sapphire Rapids+): not measured here, taken as "native", a lower bound
#:   (AMX's tiles multiply bf16 faster than AVX512-BF16);
#: - "converted": AVX-512 without BF16: oneDNN converts bf16 to fp32 and multiplies in fp32 (measured for
#:   LoRA with ONEDNN_MAX_CPU_ISA=AVX512_CORE, which keeps oneDNN off the BF16 instructions: half of
#:   fp32's speed at both widths, benchmarks/results/cpu-precision-speed.txt; full FT taken as the same);
#: - "none": AVX2 and older: oneDNN has no bf16 kernel and torch falls back to plain loops (measured for
#:   LoRA at d_model 192 with ONEDNN_MAX_CPU_ISA=AVX2 and ATEN_CPU_CAPABILITY=avx2: 7-8 x slower than
#:   fp32, cpu-precision-speed.txt); the search keeps bf16 for QLoRA only.
#: The measured regime a precision's speed is taken from: bf16-master computes in bf16 (its fp32 masters only add
#: to the optimizer step); fp16 regimes are not measured on the CPU and are taken at fp32's speed.
MEASURED_REGIME = {"bf16-master": "bf16", "amp-fp16": "fp32"}
_CONVERTED = {"amp-bf16": ((192, 0.52), (512, 0.52)), "bf16": ((192, 0.54), (512, 0.53))}
_NO_BF16 = {"amp-bf16": ((192, 0.12),), "bf16": ((192, 0.14),)}
CPU_BF16_SPEED: dict[str, dict[str, dict]] = {
    "native": {
        "full": {"amp-bf16": {43: ((192, 1.02), (512, 1.686)), 256: ((192, 1.316), (512, 1.707))},
                 "bf16": {43: ((192, 1.048), (512, 1.6)), 256: ((192, 1.276), (512, 1.738))}},
        "adapters": {"amp-bf16": {43: ((192, 1.003), (512, 1.428)), 256: ((192, 1.151), (512, 1.505))},
                     "bf16": {43: ((192, 0.942), (512, 1.318)), 256: ((192, 1.105), (512, 1.383))}},
    },
    "converted": {"full": _CONVERTED, "adapters": _CONVERTED},
    "none": {"full": _NO_BF16, "adapters": _NO_BF16},
}
CPU_BF16_SPEED["amx"] = CPU_BF16_SPEED["native"]


def at_shape(table, width: int, row_len: float) -> float:
    """A measured quantity at model width `width` and `row_len` tokens per row: where the table is measured at
    several row lengths ({row length: ((d_model, value), ...)}), at_width at each, then log-linear in the row
    length between them (the nearest outside); a table of one row length is at_width."""
    if not isinstance(table, dict):
        return at_width(table, width)
    return at_width(tuple((n, at_width(points, width)) for n, points in sorted(table.items())), row_len)


def at_width(points: tuple[tuple[int, float], ...], width: int) -> float:
    """A measured quantity at model width `width`: log-linear in log(width) between the measured widths,
    the nearest measurement outside them."""
    import math

    (w0, v0), (w1, v1) = points[0], points[-1]
    if width <= w0:
        return v0
    if width >= w1:
        return v1
    f = math.log(width / w0) / math.log(w1 / w0)
    return v0 * (v1 / v0) ** f


#: The /proc/cpuinfo flags oneDNN needs for its AVX-512 ("avx512_core") kernels.
AVX512_CORE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})


@dataclass
class Target:
    """The hardware a plan must fit: per-device memory and the figures the time model needs."""

    device: str  # "cuda" | "cpu"
    name: str
    gpus: int  # per node (processes on the CPU)
    nodes: int
    memory_bytes: int  # per GPU, or host RAM for a CPU plan
    headroom: float
    gpu: Gpu | None = None
    # Peak dense FLOP/s by compute dtype ("bf16", "fp16", "fp32"); None where unsupported.
    peak_flops: dict[str, float | None] = field(default_factory=dict)
    host_memory_bytes: int = 0  # RAM per node (a CPU plan's: memory_bytes)
    interconnect_bytes_s: float = 0.0  # per direction, per GPU (the slowest link of the ring)
    host_link_bytes_s: float = 0.0  # per direction
    memory_bytes_s: float = 0.0  # the GPU's memory bandwidth (datasheet peak), for the memory-bound terms
    assumptions: list[str] = field(default_factory=list)
    cpu: CpuInfo | None = None  # a CPU plan's processor (cores, bf16 class)
    host_memory_given: bool = False  # host RAM stated (--host-memory, a plan's target) or this machine's

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def usable_bytes(self) -> int:
        """What a plan may use per device: the memory less the headroom kept free."""
        base = self.memory_bytes
        if self.device == "cpu":
            # The processes share the host's RAM; each one also carries the interpreter and libraries.
            base = max(0, base // self.gpus - PROCESS_BASELINE_BYTES)
        return int(base * (1 - self.headroom))

    @property
    def usable_host_bytes(self) -> int:
        return int(self.host_memory_bytes * (1 - self.headroom))

    @property
    def supports_bf16(self) -> bool:
        return self.peak_flops.get("bf16") is not None

    def device_fits(self, total: int) -> bool:
        return total <= self.usable_bytes

    def device_holds(self, e: Estimate) -> bool:
        """The device part of `fits`: the plan's total on this device (Estimate.total_within: a caching allocator
        short of memory releases its cache and runs on) within the usable memory."""
        return self.device_fits(e.total_within(self.usable_bytes))

    def host_fits(self, host_bytes: int) -> bool:
        """The run's host RAM peak per node (Estimate.host_bytes: loading, offloaded states, saving) must fit
        the node's RAM with the same headroom."""
        return host_bytes <= self.usable_host_bytes

    def fits(self, e: Estimate) -> bool:
        """THE rule of "fits", for every command: the device's total (reserved + context, the allocator within
        what the device leaves it) within (1 - headroom) x its memory, and the host RAM peak per node within
        (1 - headroom) x the node's RAM."""
        return self.host_fits(e.host_bytes) and self.device_holds(e)

    def why_not(self, e: Estimate, at: str = "") -> str | None:
        """Why the plan does not fit (None when it fits), with the numbers; `at` qualifies the device figure
        (" at micro-batch 1")."""
        if not self.device_holds(e):
            why = f"needs {format_bytes(e.total)} {self.per_device}{at} > {self.usable_explained()}"
            if e.least_total <= self.usable_bytes and e.replayed is not None:  # the tensors fit; their layout does not
                why += (f": its tensors' peak, {format_bytes(e.least_total)} with the CUDA context, fits, but the "
                        "caching allocator cannot place them within it even releasing its cache")
            elif e.load_allocated > e.peak_allocated:
                why += (f": loading alone holds {format_bytes(e.least_total)} with the CUDA context (the whole 4-bit "
                        "model on every GPU until FSDP has made its shards)")
            return why
        if not self.host_fits(e.host_bytes):
            phase = f" (peak: {e.host.peak_label})" if e.host else ""
            return (f"needs {format_bytes(e.host_bytes)} of host RAM per node{phase} > "
                    f"{format_bytes(self.usable_host_bytes)} usable "
                    f"({format_bytes(self.host_memory_bytes, digits=0)} less "
                    f"{100 * self.headroom:g} % headroom)")
        return None

    def cache_release_note(self, e: Estimate) -> str | None:
        """Where the plan fits only with its caching allocator releasing its cache (Estimate.cache_releases): how
        often, and its total on a GPU with room; None where it needs no release."""
        first, later = e.cache_releases(self.usable_bytes)
        if not (first or later):
            return None

        def times(n: int) -> str:
            return {1: "once", 2: "twice"}.get(n, f"{n} times")

        when = (f"{times(first)} in the first step only" if not later
                else f"{times(later)} per step" + (f" ({times(first) if first else 'not'} in the first)"
                                                   if first != later else ""))
        return (f"its total would be {format_bytes(e.total)} on a GPU with room; within "
                f"{format_bytes(self.usable_bytes)} the caching allocator releases its cache {when}, which slows "
                "those steps")

    @property
    def per_device(self) -> str:
        return "per process" if self.device == "cpu" else "per GPU"

    def usable_explained(self) -> str:
        """"X GiB usable (how it follows from the memory and the headroom)"."""
        if self.device == "cpu":
            less = (f"{format_bytes(self.memory_bytes)} host RAM shared by {self.gpus} process(es), less "
                    f"{format_bytes(PROCESS_BASELINE_BYTES, 'MiB', digits=0)} each for the interpreter")
        else:
            less = f"{format_bytes(self.memory_bytes)}"
        return f"{format_bytes(self.usable_bytes)} usable ({less}, less {100 * self.headroom:g} % headroom)"

    def plan_target(self) -> dict:
        """The Plan's `target` section for this hardware (what `estimate --config` checks the plan against)."""
        out: dict = {"gpu": None, "gpu_memory": None, "host_memory": memory_setting(self.host_memory_bytes)
                     if self.device == "cuda" else memory_setting(self.memory_bytes), "headroom": self.headroom}
        if self.device == "cuda":
            from memplan.catalog.gpus import load_gpus

            preset = load_gpus().get(self.gpu.id) if self.gpu else None
            if preset is not None:
                out["gpu"] = preset.id
            if preset is None or preset.memory_bytes != self.memory_bytes:
                out["gpu_memory"] = memory_setting(self.memory_bytes)
        return out

    def describe(self) -> str:
        if self.device == "cpu":
            procs = f"{self.gpus} process{'es' if self.gpus > 1 else ''}"
            if self.host_memory_given:
                return f"the CPU ({procs}), {format_bytes(self.memory_bytes)} host RAM"
            return f"this machine's CPU ({self.name}, {procs}), {format_bytes(self.memory_bytes)} host RAM"
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus} x {self.name}{nodes}, {format_bytes(self.memory_bytes)} per GPU"


def _tflops(x: float | None) -> float | None:
    return None if x is None else x * 1e12


def _gpu_target(gpu: Gpu, gpus: int, nodes: int, headroom: float, assumptions: list[str],
                host_memory: int | None, local: bool = False) -> Target:
    figures = gpu
    if gpu.bf16_tflops is None and gpu.fp16_tflops is None:
        from memplan.catalog.gpus import resolve_gpu

        figures = resolve_gpu(REFERENCE_GPU)
        assumptions.append(f"{gpu.name} has no throughput figures: times assume an {figures.name}'s "
                           f"({figures.bf16_tflops:g} TFLOP/s bf16, {figures.interconnect_gbps:g} GB/s interconnect)")
    intra = (figures.interconnect_gbps or 0.0) / 2 * 1e9  # the presets add both directions
    link = intra if nodes == 1 else min(intra, INTER_NODE_GBPS * 1e9)
    if nodes > 1:
        assumptions.append(f"between nodes: {INTER_NODE_GBPS:g} GB/s per GPU per direction "
                           "(one 400 Gb/s InfiniBand port per GPU, as in a DGX H100)")
    given = host_memory is not None or local
    if host_memory is None:
        if local:
            host_memory = host_memory_bytes()
        else:
            host_memory = HOST_RAM_PER_GPU * gpus
            assumptions.append(default_host_assumption(gpus))
    return Target(
        device="cuda", name=gpu.name, gpus=gpus, nodes=nodes, memory_bytes=gpu.memory_bytes, headroom=headroom,
        gpu=gpu, host_memory_bytes=host_memory,
        peak_flops={"bf16": _tflops(figures.bf16_tflops), "fp16": _tflops(figures.fp16_tflops),
                    "fp32": _tflops(figures.fp32_tflops)},
        interconnect_bytes_s=link, host_link_bytes_s=(figures.host_link_gbps or 0.0) * 1e9,
        memory_bytes_s=(figures.memory_bandwidth_gbps or _reference_bandwidth(assumptions)) * 1e9,
        assumptions=assumptions, host_memory_given=given,
    )


def _reference_bandwidth(assumptions: list[str]) -> float:
    from memplan.catalog.gpus import resolve_gpu

    ref = resolve_gpu(REFERENCE_GPU)
    assumptions.append(f"memory bandwidth unknown: the optimizer step and dequantization assume an {ref.name}'s "
                       f"{ref.memory_bandwidth_gbps:g} GB/s")
    return ref.memory_bandwidth_gbps


def default_host_assumption(gpus: int) -> str:
    return (f"host RAM {format_bytes(HOST_RAM_PER_GPU * gpus, digits=0)} per node, which the run's host peak "
            f"(loading, offloaded states, saving) must fit ({format_bytes(HOST_RAM_PER_GPU, digits=0)} per GPU, "
            "a DGX A100's ratio; --host-memory to change)")


def host_memory_bytes() -> int:
    """This machine's physical RAM (sysconf pages x page size)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory_bytes() -> int:
    """RAM a new process can have now without swapping: the kernel's MemAvailable (free memory plus the page
    cache it can reclaim; /proc/meminfo), else the free pages, else the physical RAM."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return host_memory_bytes()


@dataclass(frozen=True)
class CpuInfo:
    """A processor as /proc/cpuinfo states it: what the CPU time model depends on, and nothing measured."""

    name: str
    cores: int  # physical cores this process may run on
    bf16: str  # "amx" | "native" | "converted" | "none": how torch's kernels multiply bf16 (CPU_BF16_SPEED)
    flag: str  # the flag that decided `bf16`, for the assumptions line

    def speed(self, precision: str, method: str, width: int, row_len: float = ROW_LEN) -> float:
        """Train-step speed of a precision regime relative to fp32 on this CPU, for `method` on a model of
        d_model `width` (1.0 for fp32)."""
        regime = MEASURED_REGIME.get(precision, precision)
        if regime == "fp32":
            return 1.0
        return at_shape(CPU_BF16_SPEED[self.bf16][_kind(method)][regime], width, row_len)

    def rate(self, precision: str, method: str, width: int, cores: float = 1.0, row_len: float = ROW_LEN) -> float:
        """Training FLOP/s of a process on `cores` of this CPU's cores: one core's fp32 rate x the regime's
        speed x what the further cores add (more processes than cores share them)."""
        gain = self.core_gain(precision, method, width, row_len)
        parallel = cores if cores < 1 else 1 + (cores - 1) * gain
        return (at_shape(CPU_FP32_RATE[_kind(method)], width, row_len) * self.speed(precision, method, width, row_len)
                * parallel)

    def core_gain(self, precision: str, method: str, width: int, row_len: float = ROW_LEN) -> float:
        """What each core beyond the first adds (CPU_EXTRA_CORE_GAIN): the regime's own where its bf16 kernels are
        the measured ones ("native", "amx"), fp32's otherwise (their bf16 runs as fp32 work or plain loops)."""
        regime = MEASURED_REGIME.get(precision, precision)
        if self.bf16 not in ("native", "amx"):
            regime = "fp32"
        return at_shape(CPU_EXTRA_CORE_GAIN[_kind(method)][regime], width, row_len)

    def layer_overhead_s(self, method: str, width: int) -> float:
        """Seconds a decoder layer costs per micro-batch beyond its FLOPs (CPU_OVERHEAD_MS_PER_LAYER)."""
        return at_width(CPU_OVERHEAD_MS_PER_LAYER[_kind(method)], width) * 1e-3

    def optimizer_s_per_param(self, optimizer: str, param_itemsize: int, cores: float = 1.0) -> float:
        """Seconds of the optimizer step per parameter of `param_itemsize` bytes on `cores` of this CPU's cores
        (CPU_OPTIMIZER_NS_PER_PARAM: measured at 1 and 2 threads; further cores add what the second did)."""
        table = CPU_OPTIMIZER_NS_PER_PARAM.get(optimizer.removeprefix("paged-"), CPU_OPTIMIZER_NS_PER_PARAM["adamw"])
        one, two = table[4 if param_itemsize >= 4 else 2]
        # a second thread measured slower (a noisy machine) is taken as adding nothing
        parallel = cores if cores < 1 else 1 + (cores - 1) * max(0.0, one / two - 1)
        return one * 1e-9 / parallel

    def describe(self) -> str:
        return f"{self.name}, {self.cores} core{'s' if self.cores != 1 else ''}, bf16 {self.bf16} ({self.flag})"

    def time_assumption(self, width: int) -> str:
        """The CPU time model's figures for a model of d_model `width`, for the assumptions list."""
        fp32 = ", ".join(f"{m} {self.rate('fp32', m, width) / 1e9:.1f}" for m in ("full", "lora"))
        gain = " / ".join(f"{m} +{self.core_gain('fp32', m, width):.2f}" for m in ("full", "lora"))
        if self.bf16 == "none":
            bf16 = "bf16 regimes for QLoRA only (no bf16 kernels)"
        else:
            bf16 = "; ".join(f"{m}: " + ", ".join(f"{p} x{self.speed(p, m, width):.2f}" for p in ("amp-bf16", "bf16"))
                             for m in ("full", "lora")) + " the fp32 speed"
        return (f"CPU time model at d_model {width}, rows of {ROW_LEN} tokens: fp32 training rate per core {fp32} "
                f"GFLOP/s, each further core {gain} of one ({self.cores} core(s) of {self.name}); bf16 {self.bf16} "
                f"({self.flag}): {bf16}; "
                f"measured once ({CPU_RATES}), not on this run: the same inputs give the same plan")


def _kind(method: str) -> str:
    return "full" if method == "full" else "adapters"


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return ""


def bf16_class(flags: frozenset[str]) -> tuple[str, str]:
    """(class, the flag that decided it) from the CPU's feature flags (x86 `flags`, Arm `Features`)."""
    if "amx_bf16" in flags:
        return "amx", "amx_bf16"
    if "avx512_bf16" in flags:
        return "native", "avx512_bf16"
    if "bf16" in flags:  # Arm's BF16 extension (Neoverse V1/V2, Graviton3+)
        return "native", "bf16"
    if AVX512_CORE_FLAGS <= flags:
        return "converted", "avx512f without avx512_bf16"
    return "none", "no avx512 / bf16 flags"


def cpu_info(text: str | None = None) -> CpuInfo:
    """This machine's processor from /proc/cpuinfo (`text` for tests): model name, the physical cores in
    this process's CPU affinity (torch runs one thread per physical core), the bf16 class."""
    text = _read_cpuinfo() if text is None else text
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    name, flags, cores = "", frozenset(), set()
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        name = name or fields.get("model name", "")
        flags = flags or frozenset((fields.get("flags") or fields.get("Features") or "").split())
        proc = int(fields["processor"]) if fields["processor"].isdigit() else None
        if allowed is not None and proc is not None and proc not in allowed:
            continue
        cores.add((fields.get("physical id"), fields.get("core id", fields["processor"])))
    count = len(cores) or (len(allowed) if allowed else os.cpu_count() or 1)
    if not name:
        import platform

        name = platform.processor() or platform.machine() or "CPU"
    bf16, flag = bf16_class(flags)
    return CpuInfo(name=name, cores=count, bf16=bf16, flag=flag)


def cpu_name() -> str:
    return cpu_info().name


def cpu_target(processes: int, headroom: float, assumptions: list[str], memory_bytes: int | None = None,
               info: CpuInfo | None = None) -> Target:
    """A CPU plan's target: this machine's processor; its RAM unless `memory_bytes` (a plan's recorded
    host RAM) is given. Its time figures follow from `info` alone (see CpuInfo.speed)."""
    info = info or cpu_info()
    memory = memory_bytes or host_memory_bytes()
    return Target(device="cpu", name=info.name, gpus=processes, nodes=1, memory_bytes=memory, headroom=headroom,
                  peak_flops={}, host_memory_bytes=memory, assumptions=assumptions, cpu=info,
                  host_memory_given=memory_bytes is not None)


def check_headroom(headroom: float) -> None:
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom {headroom} must be a fraction in [0, 1), e.g. 0.1 for 10 %")


def gpu_target(gpu: str | None, gpu_memory: str | int | None, gpus: int | None, nodes: int,
               headroom: float, host_memory: str | int | None = None,
               assumptions: list[str] | None = None) -> Target | None:
    """A preset (`gpu`; with `gpu_memory` too, that memory replaces the preset's: a local device), a GPU
    known by its memory (`gpu_memory`: a size string or bytes), else the local GPUs (NVML); None when none."""
    from memplan.catalog import gpus as gpu_mod

    check_headroom(headroom)
    assumptions = [] if assumptions is None else assumptions
    host = parse_size(host_memory)
    if gpu:
        device = gpu_mod.resolve_gpu(gpu)
        if gpu_memory:
            device = dataclasses.replace(device, memory_bytes=parse_size(gpu_memory))
        return _gpu_target(device, gpus or 1, nodes, headroom, assumptions, host)
    if gpu_memory:
        return _gpu_target(gpu_mod.custom_gpu(parse_size(gpu_memory)), gpus or 1, nodes, headroom, assumptions, host)
    local = gpu_mod.local_gpus()
    if local:
        smallest = min(local, key=lambda g: g.memory_bytes)
        count = gpus or len(local)
        assumptions.append(f"GPU from this machine (NVML): {len(local)} x {smallest.name}")
        return _gpu_target(smallest, count, nodes, headroom, assumptions, host, local=True)
    return None


def parse_size(size: str | int | None) -> int | None:
    """Bytes from a size string (gpus.parse_memory) or bytes; None stays None."""
    from memplan.catalog.gpus import parse_memory

    if size is None or isinstance(size, int) and not isinstance(size, bool):
        return size
    return parse_memory(size)


def resolve_target(gpu: str | None, gpu_memory: str | None, gpus: int | None, nodes: int,
                   headroom: float, host_memory: str | None = None) -> Target:
    """--gpu / --gpu-memory, else the local GPUs (pynvml), else this machine's CPU."""
    if gpu and gpu_memory:
        raise UserError("give either --gpu or --gpu-memory, not both")
    assumptions: list[str] = []
    target = gpu_target(gpu, gpu_memory, gpus, nodes, headroom, host_memory, assumptions)
    if target is not None:
        return target
    if nodes > 1:
        raise UserError("no GPU given or found, and a CPU plan runs on this one machine: drop --nodes, "
                        "or give --gpu / --gpu-memory to plan for a GPU cluster")
    why = "no --gpu / --gpu-memory given and no GPU found through NVML"
    if gpus:
        why += f" (--gpus {gpus} counts CPU processes here)"
    assumptions.append(f"planning for this machine's CPU: {why}; CPU-runnable precisions only "
                       "(fp32, amp-bf16, bf16), DDP or FSDP (gloo), no offload")
    return cpu_target(gpus or 1, headroom, assumptions, parse_size(host_memory))
