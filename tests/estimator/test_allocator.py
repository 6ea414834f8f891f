"""The caching allocator model against the rules of c10/cuda/CUDACachingAllocator.cpp, case by case, and the
traced event stream it replays against the trace's own live bytes."""

import pytest

from memplan.estimator.allocator import (
    CachingAllocator,
    OutOfMemory,
    allocation_size,
    replay,
    round_size,
)

MiB = 1 << 20


def test_round_size_and_segment_sizes():
    assert round_size(1) == 512 and round_size(512) == 512 and round_size(513) == 1024
    assert allocation_size(512) == 2 * MiB and allocation_size(MiB) == 2 * MiB  # small pool
    assert allocation_size(MiB + 512) == 20 * MiB and allocation_size(10 * MiB - 512) == 20 * MiB
    assert allocation_size(10 * MiB) == 10 * MiB and allocation_size(11 * MiB + 1) == 12 * MiB


def test_small_requests_share_a_2mib_segment():
    a = CachingAllocator()
    for _ in range(4):
        a.malloc(256 * 1024)
    assert a.reserved == 2 * MiB and a.allocated == MiB
    a.malloc(1024 * 1024 + 512)  # large pool: its own 20 MiB segment
    assert a.reserved == 22 * MiB


def test_medium_requests_split_a_20mib_segment():
    a = CachingAllocator()
    for _ in range(3):
        a.malloc(6 * MiB)
    # two fit the first 20 MiB segment; what remains (8 MiB) takes the third
    assert a.reserved == 20 * MiB
    a.malloc(6 * MiB)
    assert a.reserved == 40 * MiB


def test_a_remainder_of_at_most_1mib_is_not_split_off():
    a = CachingAllocator()
    block = a.malloc(11 * MiB)  # rounded segment of 12 MiB: 1 MiB remains, kept in the block
    assert a.reserved == 12 * MiB and a.allocated == 12 * MiB
    assert a.requested == 11 * MiB  # torch's requested_bytes: what was asked for
    a.free(block)
    assert a.allocated == a.requested == 0
    b = CachingAllocator()
    b.malloc(10 * MiB + 512)  # 12 MiB segment, 2 MiB - 512 B remain: split
    assert b.allocated == 10 * MiB + 512


def test_freed_blocks_are_cached_and_best_fit_reused():
    a = CachingAllocator()
    big = a.malloc(300 * MiB)
    small = a.malloc(100 * MiB)
    a.free(big)
    a.free(small)
    a.malloc(90 * MiB)  # the 100 MiB block fits best; the 300 MiB block stays whole
    a.malloc(280 * MiB)
    assert a.reserved == 400 * MiB


def test_each_stream_is_served_from_its_own_blocks():
    """A block freed by one stream is not handed to another (BlockComparatorSize compares the stream first), small
    or large; the same stream reuses it. Expandable segments: one per stream and pool."""
    a = CachingAllocator()
    a.free(a.malloc(100 * MiB, stream=1))
    a.free(a.malloc(4096, stream=1))
    a.malloc(100 * MiB)
    a.malloc(4096)
    assert a.reserved == 2 * (100 + 2) * MiB
    a.malloc(100 * MiB, stream=1)
    a.malloc(4096, stream=1)
    assert a.reserved == 2 * (100 + 2) * MiB
    e = CachingAllocator("expandable")
    e.free(e.malloc(30 * MiB, stream=2))
    e.malloc(30 * MiB)
    assert e.reserved == 2 * 40 * MiB
    events = [("a", 1, 100 * MiB, 1), ("f", 1), ("a", 2, 100 * MiB)]
    assert replay(events, workspaces=()).peak_reserved == 200 * MiB
    assert replay([ev[:3] for ev in events], workspaces=()).peak_reserved == 100 * MiB


def test_fragmentation_needs_a_new_segment_and_merging_avoids_one():
    a = CachingAllocator()
    x = a.malloc(100 * MiB)
    a.malloc(100 * MiB)
    a.free(x)
    a.malloc(150 * MiB)  # no cached block is large enough: a new segment
    assert a.reserved == 350 * MiB and a.peak_reserved == 350 * MiB
    b = CachingAllocator()
    big = b.malloc(200 * MiB)
    b.free(big)
    p, q = b.malloc(100 * MiB), b.malloc(100 * MiB)  # the segment split in two
    b.free(p)
    b.free(q)  # the halves merge again
    b.malloc(200 * MiB)
    assert b.reserved == 200 * MiB


def test_expandable_segments_grow_in_pages_and_reuse_the_free_end():
    a = CachingAllocator("expandable")
    x = a.malloc(100 * MiB)
    a.malloc(100 * MiB)
    a.free(x)
    a.malloc(150 * MiB)  # the free 100 MiB at the start cannot grow: 160 MiB of new pages at the end
    assert a.reserved == 360 * MiB
    b = CachingAllocator("expandable")
    y = b.malloc(30 * MiB)  # two 20 MiB pages, 10 MiB free at the end
    assert b.reserved == 40 * MiB
    b.malloc(15 * MiB)  # 10 MiB free at the end + one more page
    assert b.reserved == 60 * MiB
    b.free(y)
    b.malloc(25 * MiB)  # fits the freed 30 MiB
    assert b.reserved == 60 * MiB


def test_a_full_device_releases_its_cache_before_running_out():
    a = CachingAllocator(capacity=500 * MiB)
    x = a.malloc(300 * MiB)
    a.free(x)
    a.malloc(400 * MiB)  # the cached 300 MiB segment is released, then the new one fits
    assert a.reserved == 400 * MiB
    with pytest.raises(OutOfMemory):
        a.malloc(200 * MiB)


def test_replay_reports_the_reserved_peak_per_step():
    events = [("a", 1, 100 * MiB), ("s",), ("p", "forward"), ("a", 2, 50 * MiB), ("f", 2), ("s",),
              ("p", "forward"), ("a", 3, 120 * MiB), ("f", 3)]
    r = replay(events, workspaces=(2 * MiB,))  # no ("w", thread) markers: the main thread's at the forward
    # step 1: the weights' segment, the 20 MiB segment of the 2 MiB workspace, a 50 MiB segment;
    # step 2: 120 MiB fits no cached block
    assert r.step_reserved == [170 * MiB, 290 * MiB]
    assert r.peak_allocated == 222 * MiB and not r.oom  # the weights, the workspace, the 120 MiB tensor
    capped = replay(events, capacity=230 * MiB, workspaces=())  # the cached 50 MiB segment is released first
    assert not capped.oom and capped.peak_reserved == 220 * MiB
    assert capped.step_releases == [0, 1] and r.step_releases == [0, 0]  # torch's num_alloc_retries, per step
    assert replay(events, capacity=200 * MiB, workspaces=()).oom is True


def test_each_thread_gets_its_cublas_workspaces_at_its_first_cublas_op():
    """A fresh process: the main thread's 32 + 1 MiB where the forward's first matmul runs, the autograd engine's
    where the backward's does; each once."""
    events = [("a", 1, 100 * MiB), ("s",), ("p", "forward"), ("w", "main"), ("a", 2, 300 * MiB), ("p", "backward"),
              ("f", 2), ("w", "autograd"), ("s",), ("w", "main")]
    r = replay(events)
    # weights; the main thread's 32 MiB segment and its 1 MiB in a 2 MiB small segment; the 300 MiB activation,
    # freed before the autograd thread's 32 MiB, which splits it
    assert r.peak_reserved == (100 + 32 + 2 + 300) * MiB
    assert r.peak_allocated == (100 + 32 + 1 + 300) * MiB


def test_plans_whose_streams_are_equal_share_one_replay():
    """FlashAttention-2 and SDPA save the same on Llama: one replay serves both; another micro-batch is another."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import estimate
    from memplan.estimator.phases import clear_replays
    from memplan.plan import build_plan

    spec = resolve_model("llama-2-7b")
    sdpa, flash = (build_plan(dict(model="llama-2-7b", attn=attn, micro_batch=2)) for attn in ("sdpa", "flash"))
    clear_replays()
    first, second = estimate(spec, sdpa), estimate(spec, flash)
    assert first.replayed is not None and first.replayed is second.replayed
    assert estimate(spec, sdpa.model_copy(update={"micro_batch": 3})).replayed is not first.replayed


def test_flash_attention_shares_sdpas_stream_only_where_it_is_the_same():
    """Where FlashAttention-2 saves what SDPA does, the plan takes SDPA's stream without building its own; packed
    rows give SDPA a mask (and flash-attention none): there each keeps its own."""
    from memplan.catalog.resolve import resolve_model
    from memplan.estimator import stream
    from memplan.plan import build_plan

    spec = resolve_model("tinyllama-1.1b")
    for packing, same in ((False, True), (True, False)):
        flash = build_plan(dict(model="tinyllama-1.1b", attn="flash", micro_batch=2, seq_len=512,
                                data={"packing": packing}))
        sdpa = flash.model_copy(update={"attn": "sdpa"})
        assert (stream.with_attention_as_streamed(spec, flash).attn == "sdpa") is same
        assert (stream.allocation_stream(spec, flash) == stream.allocation_stream(spec, sdpa)) is same
