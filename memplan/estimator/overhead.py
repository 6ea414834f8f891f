"""What a GPU holds beyond the tensors torch allocates: the caching allocator's reserve and the CUDA context.

These two are named constants with their sources, not derivations; `memplan profile` on a GPU measures
them (allocated vs reserved vs NVML used) and `benchmarks/results/` records what it found.
"""

from __future__ import annotations

from memplan.plan import Plan

MiB = 1 << 20

# The CUDA context (driver, lazily loaded kernels, cuBLAS/cuDNN handles): "around 400MB if CUDA >= 11.7 is
# used and lazy module loading enabled (default in PyTorch)" (pytorch/pytorch#109888, NVIDIA's PyTorch
# engineer); ~300 MB in #107667. Before CUDA 11.7 it exceeded 1000 MB.
CUDA_CONTEXT_BYTES = 400 * MiB

# NCCL communicator buffers per process group when training on several GPUs (NCCL_BUFFSIZE defaults to
# 4 MiB per channel and peer; with up to 32 channels and the ring/tree protocols this reaches a few
# hundred MiB; NCCL docs, "Environment Variables: NCCL_BUFFSIZE").
NCCL_BYTES = 4 * MiB * 32 * 2

# The caching allocator rounds every block up to 512 B, serves requests above 1 MiB from 2 MiB-aligned
# segments (large ones exactly sized, rounded to 2 MiB) and keeps freed blocks cached: reserved exceeds
# the allocated peak by its fragmentation. Published training runs show 5-25 % (PyTorch "CUDA semantics:
# optimizing memory usage with PYTORCH_CUDA_ALLOC_CONF", expandable_segments RFC pytorch#95823);
# memplan takes the low end, which `expandable_segments:True` achieves, plus one 2 MiB segment of slack.
ALLOCATOR_FRAGMENTATION = 0.05
SEGMENT = 2 * MiB


def reserved_bytes(peak_allocated: int) -> int:
    """torch.cuda.max_memory_reserved(): the allocated peak plus the allocator's fragmentation."""
    return int(peak_allocated * (1 + ALLOCATOR_FRAGMENTATION)) + SEGMENT


def cuda_context_bytes(plan: Plan) -> int:
    """Memory NVML shows beyond the allocator's reserve: the CUDA context, and NCCL on several GPUs."""
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if plan.world_size > 1 else 0)
