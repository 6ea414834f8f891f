"""What the plan is for: GPUs (a preset, a size, or the local devices) or this machine's CPU.

Memory is the limit a plan must fit with headroom; the throughput figures feed the time model
(`memplan.recommend.throughput`). Nothing here imports torch unless the CPU's speed is measured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Optional

from memplan.errors import UserError
from memplan.gpus import Gpu

GiB = 1 << 30

#: The throughput figures assumed for a GPU known only by its memory (--gpu-memory, or a local device
#: without a preset): an A100 40GB's, the most common training GPU without a newer preset match. Said
#: out loud as an assumption whenever used.
REFERENCE_GPU = "a100-40gb"

#: GPU-to-GPU bandwidth between nodes, GB/s per direction per GPU: one 400 Gb/s InfiniBand NDR port per
#: GPU, as in NVIDIA's DGX H100 (8 x ConnectX-7 400 Gb/s; DGX H100 datasheet) = 50 GB/s.
INTER_NODE_GBPS = 50.0

#: Resident memory of a training process beyond its tensors on the CPU (the interpreter with torch,
#: transformers, peft and accelerate imported): VmRSS 439 MiB measured on this project's CPU machine
#: (Python 3.11, torch 2.13 CPU, transformers 5.24, after `import torch, transformers, peft, accelerate`
#: and LlamaForCausalLM), rounded up to 450 MiB.
PROCESS_BASELINE_BYTES = 450 * (1 << 20)

#: Host RAM per GPU assumed for a GPU cluster that is not this machine (offloaded states must fit it):
#: 128 GiB, NVIDIA DGX A100's ratio (1 TB system memory for 8 GPUs; DGX A100 datasheet). --host-memory
#: gives the real figure per node.
HOST_RAM_PER_GPU = 128 * GiB

#: How long each matmul measurement of the CPU runs (seconds).
CPU_PROBE_SECONDS = 0.25


@dataclass
class Target:
    """The hardware a plan must fit: per-device memory and the figures the time model needs."""

    device: str  # "cuda" | "cpu"
    name: str
    gpus: int  # per node (processes on the CPU)
    nodes: int
    memory_bytes: int  # per GPU, or host RAM for a CPU plan
    headroom: float
    gpu: Optional[Gpu] = None
    # Peak dense FLOP/s by compute dtype ("bf16", "fp16", "fp32"); None where unsupported.
    peak_flops: dict[str, Optional[float]] = field(default_factory=dict)
    host_memory_bytes: int = 0  # RAM per node, for offloaded states (GPU plans)
    interconnect_bytes_s: float = 0.0  # per direction, per GPU (the slowest link of the ring)
    host_link_bytes_s: float = 0.0  # per direction
    assumptions: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes

    @property
    def usable_bytes(self) -> int:
        """What a plan may use per device: the memory less the headroom kept free."""
        base = self.memory_bytes
        if self.device == "cpu":
            # The processes share the host's RAM; each one also carries the interpreter and libraries.
            base = base // self.gpus - PROCESS_BASELINE_BYTES
        return int(base * (1 - self.headroom))

    @property
    def usable_host_bytes(self) -> int:
        return int(self.host_memory_bytes * (1 - self.headroom))

    @property
    def supports_bf16(self) -> bool:
        return self.peak_flops.get("bf16") is not None

    def describe(self) -> str:
        if self.device == "cpu":
            procs = f"{self.gpus} process{'es' if self.gpus > 1 else ''}"
            return f"this machine's CPU ({self.name}, {procs}), {self.memory_bytes / GiB:.2f} GiB host RAM"
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"{self.gpus} x {self.name}{nodes}, {self.memory_bytes / GiB:.2f} GiB per GPU"


def _tflops(x: Optional[float]) -> Optional[float]:
    return None if x is None else x * 1e12


def _gpu_target(gpu: Gpu, gpus: int, nodes: int, headroom: float, assumptions: list[str],
                host_memory: Optional[int], local: bool = False) -> Target:
    figures = gpu
    if gpu.bf16_tflops is None and gpu.fp16_tflops is None:
        from memplan.gpus import resolve_gpu

        figures = resolve_gpu(REFERENCE_GPU)
        assumptions.append(f"{gpu.name} has no throughput figures: times assume an {figures.name}'s "
                           f"({figures.bf16_tflops:g} TFLOP/s bf16, {figures.interconnect_gbps:g} GB/s interconnect)")
    intra = (figures.interconnect_gbps or 0.0) / 2 * 1e9  # the presets add both directions
    link = intra if nodes == 1 else min(intra, INTER_NODE_GBPS * 1e9)
    if nodes > 1:
        assumptions.append(f"between nodes: {INTER_NODE_GBPS:g} GB/s per GPU per direction "
                           "(one 400 Gb/s InfiniBand port per GPU, as in a DGX H100)")
    if host_memory is None:
        if local:
            host_memory = host_memory_bytes()
        else:
            host_memory = HOST_RAM_PER_GPU * gpus
            assumptions.append(f"host RAM {host_memory / GiB:.0f} GiB per node for offloaded states "
                               f"({HOST_RAM_PER_GPU / GiB:.0f} GiB per GPU, a DGX A100's ratio; --host-memory to change)")
    return Target(
        device="cuda", name=gpu.name, gpus=gpus, nodes=nodes, memory_bytes=gpu.memory_bytes, headroom=headroom,
        gpu=gpu, host_memory_bytes=host_memory,
        peak_flops={"bf16": _tflops(figures.bf16_tflops), "fp16": _tflops(figures.fp16_tflops),
                    "fp32": _tflops(figures.fp32_tflops)},
        interconnect_bytes_s=link, host_link_bytes_s=(figures.host_link_gbps or 0.0) * 1e9,
        assumptions=assumptions,
    )


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


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "CPU"


_CPU_PEAKS: dict[str, float] = {}


def measure_cpu_matmul(dtype_name: str) -> float:
    """Achieved matmul FLOP/s of this CPU in one dtype: 2 n^3 per n x n product, timed over
    CPU_PROBE_SECONDS with torch's own kernels (the ones training runs). Measured once per process.

    bf16 is measured, not assumed: CPUs without AMX or AVX512-BF16 run bf16 matmuls one to two orders of
    magnitude slower than fp32 (0.97 vs 122 GFLOP/s on this project's 2-core AMD EPYC), which decides
    the precision of a CPU plan."""
    if dtype_name in _CPU_PEAKS:
        return _CPU_PEAKS[dtype_name]
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 512 if dtype_name == "fp32" else 256
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: first-call dispatch and packing
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= CPU_PROBE_SECONDS:
            break
    _CPU_PEAKS[dtype_name] = 2 * n**3 * count / elapsed
    return _CPU_PEAKS[dtype_name]


def cpu_target(processes: int, headroom: float, assumptions: list[str]) -> Target:
    fp32, bf16 = measure_cpu_matmul("fp32"), measure_cpu_matmul("bf16")
    assumptions.append(f"CPU matmul throughput measured here: fp32 {fp32 / 1e9:.1f} GFLOP/s, "
                       f"bf16 {bf16 / 1e9:.1f} GFLOP/s (torch, {CPU_PROBE_SECONDS:g} s each)")
    return Target(device="cpu", name=cpu_name(), gpus=processes, nodes=1, memory_bytes=host_memory_bytes(),
                  headroom=headroom, peak_flops={"fp32": fp32, "bf16": bf16, "fp16": None},
                  assumptions=assumptions)


def resolve_target(gpu: Optional[str], gpu_memory: Optional[str], gpus: Optional[int], nodes: int,
                   headroom: float, host_memory: Optional[str] = None) -> Target:
    """--gpu / --gpu-memory, else the local GPUs (pynvml), else this machine's CPU."""
    from memplan import gpus as gpu_mod

    if gpu and gpu_memory:
        raise UserError("give either --gpu or --gpu-memory, not both")
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom {headroom} must be a fraction in [0, 1), e.g. 0.1 for 10 %")
    assumptions: list[str] = []
    host = gpu_mod.parse_memory(host_memory) if host_memory else None
    if gpu:
        return _gpu_target(gpu_mod.resolve_gpu(gpu), gpus or 1, nodes, headroom, assumptions, host)
    if gpu_memory:
        return _gpu_target(gpu_mod.custom_gpu(gpu_mod.parse_memory(gpu_memory)), gpus or 1, nodes, headroom,
                           assumptions, host)
    local = gpu_mod.local_gpus()
    if local:
        smallest = min(local, key=lambda g: g.memory_bytes)
        count = gpus or len(local)
        assumptions.append(f"GPU from this machine (NVML): {len(local)} x {smallest.name}")
        return _gpu_target(smallest, count, nodes, headroom, assumptions, host, local=True)
    if nodes > 1:
        raise UserError("no GPU given or found, and a CPU plan runs on this one machine: drop --nodes, "
                        "or give --gpu / --gpu-memory to plan for a GPU cluster")
    why = "no --gpu / --gpu-memory given and no GPU found through NVML"
    if gpus:
        why += f" (--gpus {gpus} counts CPU processes here)"
    assumptions.append(f"planning for this machine's CPU: {why}; CPU-runnable precisions only "
                       "(fp32, amp-bf16, bf16), DDP or FSDP (gloo), no offload")
    return cpu_target(gpus or 1, headroom, assumptions)
