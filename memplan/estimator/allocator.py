"""A model of PyTorch's CUDA caching allocator: what `torch.cuda.max_memory_reserved()` becomes when a step's
allocations and frees are served by it.

The rules are those of `c10/cuda/CUDACachingAllocator.cpp` (DeviceCachingAllocator, torch 2.x), one device,
no CUDA graphs, no `max_split_size_mb`, no `roundup_power2_divisions`:

- every request is rounded up to a multiple of 512 B (`round_size`, kMinBlockSize);
- requests of at most 1 MiB (kSmallSize) are served from the small pool, the others from the large pool;
- a request first takes the smallest cached free block of its pool that is large enough, the lowest address
  among equal sizes (`get_free_block`: `BlockComparatorSize` orders by size, then address);
- a block belongs to the stream it was allocated on, and so does the segment it came from: a request is served
  only from cached blocks of its own stream (`BlockComparatorSize` compares the stream first), so each stream keeps
  its own pools (FSDP gathers parameters on a stream of its own and reduce-scatters on another);
- with no such block, a new segment is `cudaMalloc`ed (`alloc_block`) of `get_allocation_size`: 2 MiB
  (kSmallBuffer) for a small request, 20 MiB (kLargeBuffer) below 10 MiB (kMinLargeAlloc), else the request
  rounded up to 2 MiB (kRoundLarge);
- the block taken is split when what remains is at least 512 B (small pool) or more than 1 MiB (large pool)
  (`should_split`); otherwise the whole block is handed out, and counted as allocated;
- a freed block merges with free neighbours of its segment (`free_block`, `try_merge_blocks`) and stays cached:
  segments go back to CUDA only when an allocation fails (`release_cached_blocks`: every free block that is a
  whole segment) or on `torch.cuda.empty_cache()`.

With `expandable_segments:True` (PYTORCH_CUDA_ALLOC_CONF) each pool (of each stream) has one segment whose physical
memory grows in pages of 2 MiB (small pool) or 20 MiB (large pool) at its end (Note [Expandable Segments];
`try_allocate_expandable_block`, `map_block`): a request that no free block fits maps pages after the segment's
last block, merged with that block when it is free; any block splits when 512 B or more remain.

`allocated` counts handed-out block sizes as torch's `allocated_bytes` does (rounded, and whole when not
split); `reserved` counts segments (mapped pages) as `reserved_bytes`. Pure Python: on the estimate path.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: the largest request served by the small pool
SMALL_BUFFER = 2 << 20  # kSmallBuffer: the small pool's segments (and expandable pages)
LARGE_BUFFER = 20 << 20  # kLargeBuffer: segments for 1-10 MiB requests (and the large pool's expandable pages)
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge

ALLOCATORS = ("default", "expandable")
# One thread's cuBLAS workspaces, one per (handle, stream): cuBLAS's 32 MiB on Hopper (`parseChosenWorkspaceSize`,
# ":4096:8") and cuBLASLt's 1 MiB (`parseCUDABlasLtWorkspaceSize`), aten/src/ATen/cuda/CublasHandlePool.cpp. A
# training step has two threads that run cuBLAS (the main one, the autograd engine's device thread): 66 MiB, as
# measured on an H100 (memplan.estimator.overhead.CUBLAS_WORKSPACE_BYTES).
THREAD_WORKSPACES = (32 << 20, 1 << 20)


def round_size(nbytes: int) -> int:
    """`round_size`: at least 512 B, in multiples of 512 B."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def allocation_size(size: int) -> int:
    """`get_allocation_size`: the segment cudaMalloc'ed for a rounded request no cached block fits."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(Exception):
    """The allocator could not serve a request within the device's capacity, even after releasing its cache."""


class _Block:
    """A block of a segment: its address and size, its pool, and its neighbours in the segment. A plain class
    with positional arguments: a replay makes one per split, hundreds of thousands per search."""

    __slots__ = ("addr", "size", "pool", "allocated", "mapped", "prev", "next", "expandable", "requested")

    def __init__(self, addr: int, size: int, pool: _Pool, prev: _Block | None = None, nxt: _Block | None = None,
                 expandable: bool = False, mapped: bool = True) -> None:
        self.addr, self.size, self.pool = addr, size, pool
        self.allocated = False
        self.mapped = mapped
        self.prev: _Block | None = prev
        self.next: _Block | None = nxt
        self.expandable = expandable


_KEY = 64  # a free block's key: size << _KEY | addr, ordered as (size, addr) (addresses stay below 2**64)


@dataclass(eq=False)
class _Pool:
    small: bool
    free: list[int] = field(default_factory=list)  # sorted keys of the cached free blocks
    by_key: dict[int, _Block] = field(default_factory=dict)
    tail: _Block | None = None  # expandable: the unmapped rest of the pool's segment

    def insert(self, b: _Block) -> None:
        key = b.size << _KEY | b.addr
        bisect.insort(self.free, key)
        self.by_key[key] = b

    def remove(self, b: _Block) -> None:
        key = b.size << _KEY | b.addr
        del self.free[bisect.bisect_left(self.free, key)]
        del self.by_key[key]


class CachingAllocator:
    """One device's caching allocator. `malloc(nbytes)` returns a handle (the block) for `free(handle)`, once;
    `capacity` (bytes the allocator may reserve) makes a request that cannot be served raise OutOfMemory after the
    cache is released, as torch's allocator does before it reports out of memory."""

    def __init__(self, allocator: str = "default", capacity: int | None = None) -> None:
        if allocator not in ALLOCATORS:
            raise ValueError(f"allocator {allocator!r} is not one of {ALLOCATORS}")
        self.expandable = allocator == "expandable"
        self.capacity = capacity
        self.pools: dict[tuple[int, bool], _Pool] = {}  # (stream, small): a stream's small and large pools
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        # what was asked for, each request rounded: `allocated` less the remainders of blocks handed out whole
        self.requested = 0
        self.peak_requested = 0
        self.releases = 0  # requests served only once the cache was released (torch's num_alloc_retries)
        self._next_addr = 1 << 40  # where the next segment's (or expandable pool's) addresses begin

    # ---------------------------------------------------------------- the public interface

    def malloc(self, nbytes: int, stream: int = 0) -> _Block:
        """A block of `nbytes` for `stream` (0: the default stream). The default allocator's best fit (`_free_block`)
        is inlined, a replay's hot path (a million requests per search); then `should_split` and `alloc_found_block`:
        the front `size` bytes are handed out, the rest cached."""
        size = -(-nbytes // MIN_BLOCK) * MIN_BLOCK if nbytes > MIN_BLOCK else MIN_BLOCK  # round_size
        small = size <= SMALL_SIZE
        pool = self.pools.get((stream, small))
        if pool is None:
            pool = self.pools[(stream, small)] = _Pool(small)
        if self.expandable:
            block = self._free_block(pool, size)
        else:
            free = pool.free
            i = bisect.bisect_left(free, size << _KEY)
            block = pool.by_key.pop(free.pop(i)) if i < len(free) else None
        if block is None:
            block = self._new_memory(pool, size)
            if block is None:
                self.releases += 1
                self.release_cache()
                block = self._new_memory(pool, size)
                if block is None:
                    raise OutOfMemory(f"{size} B requested with {self.reserved} B reserved of {self.capacity} B")
        remaining = block.size - size
        if remaining >= MIN_BLOCK if (small or self.expandable) else remaining > SMALL_SIZE:
            prev = block.prev
            front = _Block(block.addr, size, pool, prev, block, block.expandable)
            if prev is not None:
                prev.next = front
            block.prev = front
            block.addr += size
            block.size = remaining
            key = remaining << _KEY | block.addr
            bisect.insort(pool.free, key)
            pool.by_key[key] = block
            block = front
        block.allocated = True
        block.requested = size
        self.allocated += block.size
        self.requested += size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        if self.requested > self.peak_requested:
            self.peak_requested = self.requested
        return block

    def free(self, block: _Block) -> None:
        """Cache the block, merged with its free neighbours (`_join` and the pool's bookkeeping inlined)."""
        if not block.allocated:
            raise ValueError("the block was freed already")
        block.allocated = False
        self.allocated -= block.size
        self.requested -= block.requested
        pool = block.pool
        free, by_key = pool.free, pool.by_key
        prev = block.prev
        if prev is not None and not prev.allocated and prev.mapped:
            key = prev.size << _KEY | prev.addr
            del free[bisect.bisect_left(free, key)]
            del by_key[key]
            block.addr = prev.addr
            block.size += prev.size
            block.prev = before = prev.prev
            if before is not None:
                before.next = block
        nxt = block.next
        if nxt is not None and not nxt.allocated and nxt.mapped:
            key = nxt.size << _KEY | nxt.addr
            del free[bisect.bisect_left(free, key)]
            del by_key[key]
            block.size += nxt.size
            block.next = after = nxt.next
            if after is not None:
                after.prev = block
        key = block.size << _KEY | block.addr
        bisect.insort(free, key)
        by_key[key] = block

    def release_cache(self) -> None:
        """`release_cached_blocks` (also `torch.cuda.empty_cache()`): cached blocks that are whole segments go
        back to CUDA; expandable pools unmap the free pages at their end (torch also unmaps whole free pages
        between allocated blocks, leaving holes it refills first: not modelled, so a full device with
        expandable segments may be judged out of memory slightly early)."""
        for pool in self.pools.values():
            for key in list(pool.free):
                b = pool.by_key[key]
                if not self.expandable and b.prev is None and b.next is None:
                    pool.remove(b)
                    self.reserved -= b.size
                elif self.expandable and b.next is pool.tail:
                    self._unmap_end(pool, b)

    # ---------------------------------------------------------------- the rules

    def _free_block(self, pool: _Pool, size: int) -> _Block | None:
        """`get_free_block`: the smallest cached block of at least `size` (lowest address on ties). In an
        expandable pool, blocks are compared by the size they can grow to (the free block before the unmapped
        tail can grow into it), so later blocks of equal size that cannot grow are preferred."""
        i = bisect.bisect_left(pool.free, size << _KEY)
        if i == len(pool.free):
            return None
        if not self.expandable:
            return pool.by_key.pop(pool.free.pop(i))

        def growable(k: int) -> int:
            b = pool.by_key[pool.free[k]]
            return b.size + (b.next.size if b.next is not None and not b.next.mapped else 0)
        while i + 1 < len(pool.free) and growable(i + 1) < growable(i):
            i += 1
        block = pool.by_key[pool.free[i]]
        pool.remove(block)
        return block

    def _new_memory(self, pool: _Pool, size: int) -> _Block | None:
        if self.expandable:
            return self._grow(pool, size)
        seg = allocation_size(size)
        if self.capacity is not None and self.reserved + seg > self.capacity:
            return None
        self.reserved += seg
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = _Block(self._next_addr, seg, pool)
        self._next_addr += seg
        return block

    def _grow(self, pool: _Pool, size: int) -> _Block | None:
        """`try_allocate_expandable_block`: map pages at the pool segment's end, joined to its last block when
        that is free, until a block of `size` exists."""
        page = SMALL_BUFFER if pool.small else LARGE_BUFFER
        if pool.tail is None:
            pool.tail = _Block(self._next_addr, 1 << 50, pool, None, None, True, False)
            self._next_addr += 1 << 50
        tail = pool.tail
        last = tail.prev
        start = last if last is not None and not last.allocated else None
        have = start.size if start is not None else 0
        grow = -(-(size - have) // page) * page
        if self.capacity is not None and self.reserved + grow > self.capacity:
            return None
        if start is not None:
            pool.remove(start)
        self.reserved += grow
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        new = _Block(tail.addr, grow, pool, last, tail, True)
        if last is not None:
            last.next = new
        tail.prev, tail.addr, tail.size = new, tail.addr + grow, tail.size - grow
        if start is not None:
            self._join(start, new)
            return start
        return new

    def _unmap_end(self, pool: _Pool, b: _Block) -> None:
        """Unmap the whole pages of a free block before the tail (the pages it shares with an allocated
        neighbour stay mapped)."""
        page = SMALL_BUFFER if pool.small else LARGE_BUFFER
        keep = -(-(b.addr - self._pool_base(pool)) // page) * page + self._pool_base(pool) - b.addr
        unmapped = b.size - keep if keep < b.size else 0
        if unmapped <= 0:
            return
        pool.remove(b)
        self.reserved -= unmapped
        tail = pool.tail
        tail.addr -= unmapped
        tail.size += unmapped
        if keep:
            b.size = keep
            pool.insert(b)
        else:
            tail.prev = b.prev
            if b.prev is not None:
                b.prev.next = tail

    def _pool_base(self, pool: _Pool) -> int:
        b = pool.tail
        while b.prev is not None:
            b = b.prev
        return b.addr

    @staticmethod
    def _join(block: _Block, other: _Block) -> None:
        """`try_merge_blocks`: `block` absorbs its neighbour `other` (already out of the free set)."""
        if other is block.prev:
            block.addr = other.addr
            block.prev = other.prev
            if other.prev is not None:
                other.prev.next = block
        else:
            block.next = other.next
            if other.next is not None:
                other.next.prev = block
        block.size += other.size


@dataclass
class Replay:
    """What the allocator held while serving a sequence of events."""

    peak_reserved: int
    peak_allocated: int
    step_reserved: list[int]  # the reserved peak up to the end of each optimizer step
    oom: bool = False
    steps_allocated: int = 0  # the allocated peak of the steps alone
    setup_allocated: int = 0  # the allocated peak before the first step: the load, a DDP wrap (which can pass it)
    # per optimizer step, the requests served only after the cache was released (a capacity was given): torch's
    # num_alloc_retries, each a synchronizing cudaFree of every cached segment, then cudaMalloc again
    step_releases: list[int] = field(default_factory=list)
    # the steps' peak of the bytes requested (rounded to 512 B): `steps_allocated` without the remainders of blocks
    # handed out whole (torch's requested_bytes), which the estimate's terms leave out as well
    steps_requested: int = 0


def replay(events, allocator: str = "default", capacity: int | None = None,
           workspaces: tuple[int, ...] = THREAD_WORKSPACES) -> Replay:
    """Serve a step's storage events - ("a", uid, nbytes) on the default stream or ("a", uid, nbytes, stream),
    ("f", uid), ("p", phase), ("s",) a new step, ("w", thread) a thread's first cuBLAS op - by the caching allocator,
    as a fresh process does. At each ("w", thread)
    that thread's cuBLAS `workspaces` are allocated and kept; a stream without those markers (a CPU-kernel trace)
    gets the main thread's at the first forward."""
    alloc = CachingAllocator(allocator, capacity)
    handles: dict[int, _Block] = {}
    steps: list[int] = []
    releases: list[int] = []  # alloc.releases as each step began
    started = False
    threads: set[str] = set()
    marked = any(ev[0] == "w" for ev in events)
    before = 0  # the allocated peak before the first step
    malloc, free, pop = alloc.malloc, alloc.free, handles.pop
    try:
        for ev in events:
            kind = ev[0]
            if kind == "a":
                handles[ev[1]] = malloc(ev[2], ev[3]) if len(ev) > 3 else malloc(ev[2])
            elif kind == "f":
                handle = pop(ev[1], None)
                if handle is not None:
                    free(handle)
            elif kind == "e":  # torch.cuda.empty_cache()
                alloc.release_cache()
            elif kind == "s":
                releases.append(alloc.releases)
                if started:  # the step before this one ended
                    steps.append(alloc.peak_reserved)
                else:  # the allocated peak from here on is the steps'
                    before, alloc.peak_allocated = alloc.peak_allocated, alloc.allocated
                    alloc.peak_requested = alloc.requested
                started = True
            elif kind == "w" or (kind == "p" and ev[1] == "forward" and not marked and not threads):
                if ev[1] not in threads:
                    threads.add(ev[1])
                    for size in workspaces:
                        alloc.malloc(size)
    except OutOfMemory:
        return _replayed(alloc, steps, started, before, releases, oom=True)
    steps.append(alloc.peak_reserved)
    return _replayed(alloc, steps, started, before, releases)


def _replayed(alloc: CachingAllocator, steps: list[int], started: bool, before: int, releases: list[int],
              oom: bool = False) -> Replay:
    """`before`: the allocated peak when the first step began (the allocator's own peak counts from there);
    `releases`: the allocator's count of releases as each step began."""
    if not started:
        return Replay(alloc.peak_reserved, alloc.peak_allocated, steps, oom, 0, alloc.peak_allocated)
    ends = releases[1:] + [alloc.releases]
    return Replay(alloc.peak_reserved, max(before, alloc.peak_allocated), steps, oom, alloc.peak_allocated, before,
                  [end - start for start, end in zip(releases, ends)], alloc.peak_requested)
