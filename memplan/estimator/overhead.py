"""What a GPU holds beyond the tensors torch allocates: the caching allocator's reserve and the CUDA context.

The CUDA context, the cuBLAS workspaces and the allocator's reserve are named constants with their
measured sources, not derivations; `memplan profile` on a GPU measures
them (allocated vs reserved vs NVML used) and `benchmarks/results/` records what it found.
"""

from __future__ import annotations

from memplan.plan import Plan

MiB = 1 << 20

# The CUDA context (driver, lazily loaded kernels, cuBLAS/cuDNN handles) lives outside the allocator:
# NVML's used memory minus torch's reserved memory was 1247-1253 MiB (median 1251) over 12 training plans
# on an H100 80GB with torch 2.11+cu130 and driver 580 (benchmarks/results/accuracy-h100.md). Published
# figures are lower on older stacks: "around 400MB if CUDA >= 11.7 ... lazy module loading" (pytorch#109888).
CUDA_CONTEXT_BYTES = 1251 * MiB

# NCCL communicator buffers when training on several GPUs: NCCL_BUFFSIZE (default 4 MiB, NCCL docs
# "Environment Variables") per channel, up to 32 channels, for the ring and tree algorithms. Not yet
# measured by memplan (one GPU so far); derived from those documented defaults.
NCCL_BYTES = 4 * MiB * 32 * 2

# The caching allocator rounds every block up to 512 B, serves requests above 1 MiB from 2 MiB-aligned
# segments and keeps freed blocks cached, so reserved exceeds the allocated peak by its fragmentation.
# Measured max_memory_reserved / max_memory_allocated over 12 plans on an H100: median 1.074, range
# 1.025-1.227 (benchmarks/results/accuracy-h100.md); memplan takes the median.
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lowers it.
ALLOCATOR_FRAGMENTATION = 0.074


# cuBLAS and cuBLASLt workspaces, allocated through the caching allocator on the first matmul and so
# part of torch.cuda.max_memory_allocated: 66 MiB exactly on an H100 with torch 2.11+cu130 (every plan's
# optimizer-phase peak exceeded the tensor bytes by 69,206,016 B; benchmarks/results/gpu-h100-run1.jsonl).
CUBLAS_WORKSPACE_BYTES = 66 * MiB


def workspace_bytes(kernels: str) -> int:
    return CUBLAS_WORKSPACE_BYTES if kernels == "cuda" else 0


def reserved_bytes(peak_allocated: int) -> int:
    """torch.cuda.max_memory_reserved(): the allocated peak plus the allocator's fragmentation."""
    return int(peak_allocated * (1 + ALLOCATOR_FRAGMENTATION))


def cuda_context_bytes(plan: Plan) -> int:
    """Memory NVML shows beyond the allocator's reserve: the CUDA context, and NCCL on several GPUs."""
    if plan.device == "cpu":
        return 0
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if plan.world_size > 1 else 0)
