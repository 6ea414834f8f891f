"""The CUDA caching allocator a plan runs with: `Plan.allocator` as PYTORCH_CUDA_ALLOC_CONF.

torch reads PYTORCH_CUDA_ALLOC_CONF when its CUDA allocator first starts (c10/cuda/CUDAAllocatorConfig.h), so
`memplan train` sets it in its environment before any CUDA work, and the processes it launches inherit it.
The user's other allocator options (e.g. garbage_collection_threshold) are kept; expandable_segments is the
plan's, because the memory estimate assumes it.
"""

from __future__ import annotations

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def allocator_conf(allocator: str, current: str | None) -> str | None:
    """PYTORCH_CUDA_ALLOC_CONF for `allocator` ("default" / "expandable") given the value set now (None: unset)."""
    kept = [opt.strip() for opt in (current or "").split(",")
            if opt.strip() and opt.split(":", 1)[0].strip() != "expandable_segments"]
    if allocator == "expandable":
        kept.append("expandable_segments:True")
    return ",".join(kept) or None


def apply(allocator: str, environ) -> None:
    """Set the plan's allocator in `environ` (os.environ) for this process and the ones it starts."""
    conf = allocator_conf(allocator, environ.get(ALLOC_CONF_ENV))
    if conf is None:
        environ.pop(ALLOC_CONF_ENV, None)
    else:
        environ[ALLOC_CONF_ENV] = conf


def launch_prefix(allocator: str) -> str:
    """What a shell command line starts with to run the plan's allocator ("" for the default)."""
    conf = allocator_conf(allocator, None)
    return f"{ALLOC_CONF_ENV}={conf} " if conf else ""
