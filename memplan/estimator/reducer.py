"""What DistributedDataParallel allocates on each GPU, in the order a training step's stream
(`memplan.estimator.stream`) needs it, from torch's DDP (torch/nn/parallel/distributed.py and
torch/csrc/distributed/c10d/reducer.cpp, torch 2.x):

- wrapping: `_sync_module_states` broadcasts every parameter from rank 0 (torch/distributed/utils.py) through
  `_broadcast_coalesced` (c10d/comm.cpp `broadcast_coalesced`), which buckets the tensors by dtype up to 250 MiB
  (`broadcast_bucket_size`) and flattens each bucket into a new tensor, two buckets in flight at most: a bucket's
  flat tensor is freed just before the one two places after it is made;
- the Reducer's gradient buckets (`initialize_buckets`: one flat `gradients` tensor per bucket, a copy of the
  gradients while gradient_as_bucket_view=False, as the HF Trainer and accelerate leave it). With
  find_unused_parameters=False (accelerate's default) the first assignment is a single bucket per dtype
  (`_BucketCapacityConfig.compute_bucket_size_limits`: sys.maxsize);
- their rebuild, in the first forward after the first synchronised backward (`_pre_forward`, `_rebuild_buckets`):
  the old buckets are freed (`buckets_.clear()`), then new ones made in the order the gradients became ready, the
  first closed at 1 MiB (`_DEFAULT_FIRST_BUCKET_BYTES`), the others at 25 MiB (`bucket_cap_mb`), each by the tensor
  that reaches its limit (`compute_bucket_assignment_by_size`).

Left out: the shape check's and the index broadcast's few small tensors and the buffers' broadcast each forward
(well under 1 MiB, served by the small pool), and NCCL's own buffers, which live outside the caching allocator
(`overhead.NCCL_BYTES`). Checked against the storages two gloo ranks allocate on the CPU, in order
(benchmarks/ddp_stream_check.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

from memplan.catalog.spec import ModelSpec
from memplan.estimator import states
from memplan.plan import Plan

MiB = 1 << 20
BROADCAST_BUCKET_BYTES = 250 * MiB  # DistributedDataParallel.broadcast_bucket_size
BROADCASTS_IN_FLIGHT = 2  # broadcast_coalesced's max_in_flight
FIRST_BUCKET_BYTES = 1 * MiB  # dist._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_BYTES = 25 * MiB  # bucket_cap_mb's default


def wraps(plan: Plan) -> bool:
    """Whether each GPU runs the plan under DistributedDataParallel."""
    return plan.world_size > 1 and plan.sharding == "ddp"


def bucket_assignment(tensors: Sequence[tuple[str, int]], limits: Sequence[int],
                      ready_order: bool = False) -> list[list[int]]:
    """`compute_bucket_assignment_by_size`: `tensors` as (dtype, bytes) fill one open bucket per dtype, closed once
    its bytes reach the current limit, the next bucket of that dtype taking the next limit (the last repeats). The
    open ones follow; unless the tensors are in the order their gradients became ready (a rebuild), the buckets are
    sorted by their first tensor."""
    result: list[list[int]] = []
    open_: dict[str, list[int]] = {}
    size: dict[str, int] = {}
    limit_at: dict[str, int] = {}
    for i, (key, nbytes) in enumerate(tensors):
        bucket = open_.setdefault(key, [])
        bucket.append(i)
        size[key] = size.get(key, 0) + nbytes
        at = limit_at.setdefault(key, 0)
        if size[key] >= limits[at]:
            result.append(bucket)
            open_[key], size[key] = [], 0
            limit_at[key] = min(at + 1, len(limits) - 1)
    result += [b for b in open_.values() if b]
    if not ready_order:
        result.sort(key=min)
    return result


class DDP:
    """DDP's tensors on one GPU: the broadcast at wrap, the gradient buckets and their rebuild."""

    def __init__(self, spec: ModelSpec, plan: Plan, tensors: states.Tensors, weight_itemsize: int,
                 trainable_itemsize: int, targets: frozenset[str]) -> None:
        self.states = _module_states(spec, plan, weight_itemsize, trainable_itemsize, targets)
        key = f"float{trainable_itemsize}"
        self.trainable = [(key, n * trainable_itemsize) for n in tensors.trainable]  # module order
        self.buckets: list[int] = []

    def wrap(self, st) -> None:
        """The module states' broadcast, then the Reducer's first buckets (in reverse: DDP passes
        `reversed(bucket_indices)`, expecting the gradients of the last parameters first)."""
        flats: list[int] = []
        for bucket in bucket_assignment(self.states, [BROADCAST_BUCKET_BYTES]):
            if len(flats) >= BROADCASTS_IN_FLIGHT:
                st.free(flats.pop(0))
            flats.append(st.alloc(sum(self.states[i][1] for i in bucket)))
        st.free(*flats)
        if self.trainable:
            first = bucket_assignment(self.trainable, [sys.maxsize])
            self.buckets = [st.alloc(sum(self.trainable[i][1] for i in b)) for b in reversed(first)]

    def rebuild(self, st) -> None:
        """The buckets again, in the order the first backward made the gradients ready (the parameters' reverse)."""
        st.free(*self.buckets)
        ready = self.trainable[::-1]
        self.buckets = [st.alloc(sum(ready[i][1] for i in b))
                        for b in bucket_assignment(ready, [FIRST_BUCKET_BYTES, BUCKET_BYTES], ready_order=True)]


def _module_states(spec: ModelSpec, plan: Plan, weight_itemsize: int, trainable_itemsize: int,
                   targets: frozenset[str]) -> list[tuple[str, int]]:
    """(dtype, bytes) of each parameter, in the model's order: a quantized base's linear weights as bitsandbytes
    stores their data (NF4: two per byte; int8: one), the frozen vision tower as one tensor."""
    full = plan.method == "full"
    base = f"float{trainable_itemsize if full else weight_itemsize}"
    out = []
    for shape, role in states.module_parameters(spec, frozenset() if full else targets, plan.lora.rank):
        n = math.prod(shape)
        if role == "adapter":
            out.append((f"float{trainable_itemsize}", n * trainable_itemsize))
        elif role == "linear" and plan.quantized_base == "nf4":
            out.append(("uint8", math.ceil(n / 2)))
        elif role == "linear" and plan.quantized_base:
            out.append(("int8", n))
        else:
            out.append((base, n * int(base.removeprefix("float"))))
    if spec.params_frozen:
        out.append((f"float{weight_itemsize}", spec.params_frozen * weight_itemsize))
    return out
