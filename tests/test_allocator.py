"""The caching allocator model: allocation sequences whose figures follow from PyTorch's rules.

Every expected figure is worked out by hand from the rules ported in
``oomnb/allocator/caching.py`` (and cited there from
``c10/cuda/CUDACachingAllocator.cpp``); ``tests/test_cuda.py`` runs the same
sequences on a real card.
"""

from __future__ import annotations

import pytest

from oomnb.allocator.caching import AllocConf, CachingAllocator, parse_alloc_conf

MiB = 1024 * 1024


def test_rounding_and_pools_for_mixed_small_and_large_requests() -> None:
    a = CachingAllocator()
    tiny = a.malloc(1000)  # 1024 B, small pool: a new 2 MiB segment
    one = a.malloc(MiB)  # small pool (<= 1 MiB): the same segment, split
    above = a.malloc(MiB + 1)  # large pool: 1 MiB + 512, from a new 20 MiB segment
    big = a.malloc(12 * MiB)  # large pool: best fit is the rest of that 20 MiB segment, split again
    huge = a.malloc(30 * MiB)  # nothing cached fits: its own 30 MiB segment, nothing left to split
    assert (tiny.size, one.size, above.size, big.size, huge.size) == (1024, MiB, MiB + 512, 12 * MiB, 30 * MiB)
    assert a.allocated == 1024 + MiB + MiB + 512 + 12 * MiB + 30 * MiB
    assert a.reserved == 2 * MiB + 20 * MiB + 30 * MiB
    assert a.segments == 3
    stats = a.memory_stats()
    assert stats["reserved_bytes.small_pool.current"] == 2 * MiB
    assert stats["reserved_bytes.large_pool.current"] == 50 * MiB
    # Cached and split: what is left of the small and of the 20 MiB segment.
    assert stats["inactive_split_bytes.all.current"] == (2 * MiB - 1024 - MiB) + (20 * MiB - MiB - 512 - 12 * MiB)


def test_split_then_merge_gives_the_segment_back_whole() -> None:
    a = CachingAllocator()
    x = a.malloc(3 * MiB)  # 20 MiB segment: [x 3][17 free]
    y = a.malloc(4 * MiB)  # best fit in the 17: [x 3][y 4][13 free]
    z = a.malloc(13 * MiB - 512 * 1024)  # 12.5 MiB: the 13 MiB block, 0.5 MiB would remain: not split
    assert z.size == 13 * MiB and a.allocated == 20 * MiB and a.reserved == 20 * MiB
    a.free(y)
    assert a.memory_stats()["inactive_split_bytes.all.current"] == 4 * MiB
    a.free(x)  # merges with y's free block: 7 MiB
    a.free(z)  # merges with both: one free 20 MiB segment
    assert a.allocated == 0 and a.reserved == 20 * MiB
    assert a.memory_stats()["inactive_split_bytes.all.current"] == 0
    a.empty_cache()
    assert a.reserved == 0 and a.segments == 0


def _fragment(a: CachingAllocator) -> list:
    """Ten 20 MiB segments, each [7 MiB][6 MiB][7 MiB]; then the 7 MiB blocks are freed."""
    triples = [(a.malloc(7 * MiB), a.malloc(6 * MiB), a.malloc(7 * MiB)) for _ in range(10)]
    for first, _middle, last in triples:
        assert first is not None and last is not None
        a.free(first)
        a.free(last)
    return [middle for _first, middle, _last in triples]


def test_fragmented_large_pool_fails_a_10_mib_request_with_60_mib_allocated() -> None:
    a = CachingAllocator(capacity=200 * MiB)
    _fragment(a)
    assert (a.allocated, a.reserved, a.segments) == (60 * MiB, 200 * MiB, 10)
    # Every free block is 7 MiB: none fits, a new 10 MiB segment passes 200 MiB,
    # and no cached segment is whole (all are split): out of memory.
    assert a.malloc(10 * MiB) is None
    assert a.memory_stats()["inactive_split_bytes.all.current"] == 140 * MiB
    assert a.num_ooms == 1 and a.reserved == 200 * MiB


def test_the_same_sequence_fits_with_expandable_segments() -> None:
    a = CachingAllocator(capacity=200 * MiB, conf=parse_alloc_conf("expandable_segments:True"))
    _fragment(a)
    # One segment of ten 20 MiB pages: each freed 7 MiB block meets the next
    # segment page's first 7 MiB block, 14 MiB free between the 6 MiB ones.
    assert (a.allocated, a.reserved, a.segments) == (60 * MiB, 200 * MiB, 0)  # torch counts no expandable segment
    block = a.malloc(10 * MiB)
    assert block is not None and a.reserved == 200 * MiB and a.allocated == 70 * MiB


def test_expandable_segment_unmaps_free_pages_under_pressure() -> None:
    a = CachingAllocator(capacity=60 * MiB, conf=AllocConf(expandable_segments=True))
    x = a.malloc(40 * MiB)  # two 20 MiB pages mapped
    assert a.reserved == 40 * MiB
    a.free(x)
    y = a.malloc(50 * MiB)  # the 40 MiB free block is too small: map one more page at its end
    assert y is not None and a.reserved == 60 * MiB and a.allocated == 50 * MiB
    a.free(y)
    a.empty_cache()
    assert a.reserved == 0


def test_max_split_size_keeps_a_large_block_whole_and_the_cell_fits() -> None:
    def run(conf: str) -> CachingAllocator | None:
        a = CachingAllocator(capacity=70 * MiB, conf=parse_alloc_conf(conf))
        x = a.malloc(40 * MiB)
        a.free(x)
        a.malloc(8 * MiB)  # default: splits the cached 40 MiB; with max_split_size 32: a new 20 MiB segment
        return a if a.malloc(40 * MiB) is not None else None

    assert run("") is None  # 40 + 40 > 70, and the cached segment is split: nothing to release
    fitted = run("max_split_size_mb:32")
    assert fitted is not None and fitted.reserved == 60 * MiB and fitted.allocated == 48 * MiB


def test_empty_cache_returns_reserved_to_allocated_when_nothing_is_split() -> None:
    a = CachingAllocator()
    blocks = [a.malloc(12 * MiB) for _ in range(3)]
    a.free(blocks[0])
    a.free(blocks[1])
    assert (a.allocated, a.reserved) == (12 * MiB, 36 * MiB)
    a.empty_cache()
    assert a.reserved == a.allocated == 12 * MiB


def test_release_cached_segments_before_giving_up() -> None:
    a = CachingAllocator(capacity=30 * MiB)
    a.free(a.malloc(12 * MiB))
    assert a.reserved == 12 * MiB
    assert a.malloc(24 * MiB) is not None  # 12 + 24 > 30: the free 12 MiB segment is released first
    assert a.reserved == 24 * MiB and a.num_alloc_retries == 1


def test_garbage_collection_threshold_reclaims_old_cached_segments() -> None:
    a = CachingAllocator(capacity=100 * MiB, conf=parse_alloc_conf("garbage_collection_threshold:0.5"))
    old = [a.malloc(12 * MiB) for _ in range(4)]
    for block in old:
        a.free(block)
    assert a.reserved == 48 * MiB
    # 14 MiB fits no cached 12 MiB block; reserved (48) is under 50: no collection, a new segment.
    a.malloc(14 * MiB)
    assert a.reserved == 62 * MiB
    # Now above 50 MiB: before the next new segment, every cached segment at least as old as
    # the average (all four, cached at the same time) is released.
    a.malloc(16 * MiB)
    assert a.reserved == 14 * MiB + 16 * MiB


def test_roundup_power2_divisions() -> None:
    a = CachingAllocator(conf=parse_alloc_conf("roundup_power2_divisions:4"))
    # 1.2 MiB: between 1 and 2 MiB, quarters of 1 MiB: 1.25 MiB.
    assert a.round_size(1258291) == 1310720
    assert a.round_size(4096) == 4096 and a.round_size(100) == 512
    ranged = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,>:4]")
    assert ranged.divisions_for(100 * MiB) == 1 and ranged.divisions_for(400 * MiB) == 2
    assert ranged.divisions_for(4096 * MiB) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("expandable_segments:yes", "expandable_segments takes True or False, not 'yes'"),
        ("max_split_size_mb:10", "max_split_size_mb must be above 20, not 10"),
        ("garbage_collection_threshold:1.5", "garbage_collection_threshold must be in (0.0, 1.0), not 1.5"),
        ("roundup_power2_divisions:3", "roundup_power2_divisions must be powers of 2, not 3"),
        ("expandable_segments", "'expandable_segments' is not key:value"),
    ],
)
def test_bad_alloc_conf_is_one_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="PYTORCH_CUDA_ALLOC_CONF") as info:
        parse_alloc_conf(text)
    assert str(info.value) == f"PYTORCH_CUDA_ALLOC_CONF: {message}"


def test_alloc_conf_round_trips() -> None:
    text = "expandable_segments:True,max_split_size_mb:64,garbage_collection_threshold:0.6,roundup_power2_divisions:4"
    assert parse_alloc_conf(text).to_text() == text
    assert parse_alloc_conf(" backend:native , expandable_segments:False").to_text() == ""


@pytest.mark.parametrize("conf", ["", "expandable_segments:True"])
def test_a_clone_goes_on_exactly_as_the_original(conf: str) -> None:
    """A dry run goes on from a copy: the copy must behave block for block as the original would."""
    a = CachingAllocator(200 * MiB, parse_alloc_conf(conf))
    middles = _fragment(a)
    twin, copies = a.clone(middles)
    assert len(copies) >= len(middles)
    for name in ("allocated", "reserved", "segments"):
        assert getattr(twin, name) == getattr(a, name)
    assert twin.memory_stats() == a.memory_stats()
    # The same requests on both give the same figures and the same OOM point.
    for allocator, held in ((a, middles), (twin, [copies[id(m)] for m in middles])):
        allocator.free(held[3])
        allocator.free(held[4])
        assert allocator.malloc(10 * MiB) is not None  # [7][6 freed][7][7][6 freed][7]: 27 MiB free run
    assert (twin.allocated, twin.reserved, twin.memory_stats()) == (a.allocated, a.reserved, a.memory_stats())
    # The copy is independent: what happens to it leaves the original alone.
    twin.free(copies[id(middles[0])])
    assert twin.allocated == a.allocated - 6 * MiB


def test_overcommit_measures_past_the_capacity_after_the_releases() -> None:
    """A dry run's allocator never raises: it tries the releases the real one would, then goes over."""
    a = CachingAllocator(200 * MiB)
    _fragment(a)
    a.overcommit = True
    block = a.malloc(10 * MiB)
    assert block is not None and a.overcommitted == 1
    # No cached segment was wholly free, so none was released: 200 + a 10 MiB segment.
    assert a.reserved == 210 * MiB and a.peak_reserved == 210 * MiB
