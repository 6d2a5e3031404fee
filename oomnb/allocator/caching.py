"""PyTorch's CUDA caching allocator, modelled on the CPU.

A real card runs out when the memory the caching allocator *reserved* from the
driver (whole segments), plus what the CUDA context and libraries hold, passes
the card's capacity.  Reserved is at least what is allocated, and more where
the cache keeps free blocks or fragments.  This module reproduces that
bookkeeping exactly for one device and one stream (oomnb's simulated device
has no streams: every allocation is on the default stream, so the per-stream
separation of the real allocator never applies).

The rules are those of ``c10/cuda/CUDACachingAllocator.cpp`` (PyTorch 2.x),
cited by name where they are ported:

- ``round_size``: requests round up to 512 B (``kMinBlockSize``), or to the
  next power-of-two division with ``roundup_power2_divisions``;
- ``get_pool``: requests of at most 1 MiB (``kSmallSize``) use the small pool,
  larger ones the large pool;
- ``get_allocation_size``: a new small segment is 2 MiB (``kSmallBuffer``); a
  large request under 10 MiB (``kMinLargeAlloc``) gets a 20 MiB segment
  (``kLargeBuffer``); larger ones are rounded up to 2 MiB (``kRoundLarge``);
- ``get_free_block``: best fit, the smallest free block that is large enough
  (ties to the lowest address); blocks of ``max_split_size`` or more serve only
  requests of that size or more, and not more than 20 MiB smaller than them;
- ``should_split``: a small-pool block is split when at least 512 B would
  remain; a large-pool block when more than 1 MiB would remain and the
  request is under ``max_split_size``;
- ``free_block`` / ``try_merge_blocks``: a freed block merges with free
  neighbours of its segment;
- ``malloc``: when no cached block fits, ``garbage_collect_cached_blocks``
  (with ``garbage_collection_threshold``), then a new segment; if the device
  is full, ``release_available_cached_blocks`` (oversize blocks, with
  ``max_split_size``) and retry, then ``release_cached_blocks`` (every free
  segment that is not split) and retry; then the OOM;
- ``emptyCache``: ``release_cached_blocks``;
- expandable segments (``Note [Expandable Segments]``): one segment per pool
  whose address space is reserved once and mapped in pages (2 MiB for the
  small pool, 20 MiB for the large pool) at the lowest address that fits; on
  pressure, pages wholly inside free blocks are unmapped and reused.

Figures are named as ``torch.cuda.memory_stats()`` names them (see
:meth:`CachingAllocator.memory_stats`).  Nothing here imports torch.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AllocConf", "Block", "CachingAllocator", "parse_alloc_conf"]

MiB = 1024 * 1024
K_MIN_BLOCK_SIZE = 512
K_SMALL_SIZE = 1 * MiB
K_SMALL_BUFFER = 2 * MiB
K_LARGE_BUFFER = 20 * MiB
K_MIN_LARGE_ALLOC = 10 * MiB
K_ROUND_LARGE = 2 * MiB
#: Address space of an expandable segment: far more than any card.
_EXPANDABLE_SPACE = 1 << 46
_UNLIMITED = 1 << 62


@dataclass
class AllocConf:
    """The options of ``PYTORCH_CUDA_ALLOC_CONF`` this model honours."""

    expandable_segments: bool = False
    #: Blocks of this size or more are never split (``max_split_size_mb``); None: unlimited.
    max_split_size: int | None = None
    #: Share of the capacity above which cached blocks are reclaimed (0: off).
    garbage_collection_threshold: float = 0.0
    #: (upper bound of a size interval, divisions), sorted; a single value covers every size.
    roundup_power2_divisions: list[tuple[int, int]] = field(default_factory=list)

    def to_text(self) -> str:
        """The setting in ``PYTORCH_CUDA_ALLOC_CONF`` syntax (empty for the defaults)."""
        parts = []
        if self.expandable_segments:
            parts.append("expandable_segments:True")
        if self.max_split_size is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size // MiB}")
        if self.garbage_collection_threshold:
            parts.append(f"garbage_collection_threshold:{self.garbage_collection_threshold:g}")
        if self.roundup_power2_divisions:
            if len(self.roundup_power2_divisions) == 1 and self.roundup_power2_divisions[0][0] == _UNLIMITED:
                parts.append(f"roundup_power2_divisions:{self.roundup_power2_divisions[0][1]}")
            else:
                ranges = ",".join(
                    f"{'>' if bound == _UNLIMITED else bound // MiB}:{divisions}"
                    for bound, divisions in self.roundup_power2_divisions
                )
                parts.append(f"roundup_power2_divisions:[{ranges}]")
        return ",".join(parts)

    def divisions_for(self, size: int) -> int:
        for bound, divisions in self.roundup_power2_divisions:
            if size <= bound:
                return divisions
        return 0


#: Options PyTorch knows that change nothing this model counts: accepted, ignored.
_UNMODELLED_KEYS = frozenset(
    {
        "backend",
        "max_non_split_rounding_mb",
        "release_lock_on_cudamalloc",
        "release_lock_on_hipmalloc",
        "pinned_use_cuda_host_register",
        "pinned_use_hip_host_register",
        "pinned_num_register_threads",
        "pinned_use_background_threads",
        "pinned_reserve_segment_size_mb",
        "graph_capture_record_stream_reuse",
        "per_process_memory_fraction",
    }
)


def parse_alloc_conf(text: str) -> AllocConf:
    """Read ``PYTORCH_CUDA_ALLOC_CONF`` as PyTorch does (``key:value`` pairs separated by commas).

    Raises ValueError, with one line naming the bad part, for what PyTorch
    would refuse.  Options this model does not need (``backend``,
    ``release_lock_on_cudamalloc``, ``pinned_use_cuda_host_register`` ...) are
    accepted and ignored.
    """
    conf = AllocConf()
    text = text.strip()
    if not text:
        return conf
    # Split on commas outside [...] (roundup_power2_divisions takes a list).
    items = [item.strip() for item in re.split(r",(?![^\[]*\])", text) if item.strip()]
    for item in items:
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF: {item!r} is not key:value")
        if key == "expandable_segments":
            if value not in ("True", "False"):
                raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF: expandable_segments takes True or False, not {value!r}")
            conf.expandable_segments = value == "True"
        elif key == "max_split_size_mb":
            mb = _number(key, value)
            # PyTorch: the value must exceed kLargeBuffer / 1 MiB (20).
            if mb <= K_LARGE_BUFFER // MiB:
                raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF: max_split_size_mb must be above 20, not {value}")
            conf.max_split_size = int(mb) * MiB
        elif key == "garbage_collection_threshold":
            threshold = _number(key, value)
            if not 0.0 < threshold < 1.0:
                raise ValueError(
                    f"PYTORCH_CUDA_ALLOC_CONF: garbage_collection_threshold must be in (0.0, 1.0), not {value}"
                )
            conf.garbage_collection_threshold = threshold
        elif key == "roundup_power2_divisions":
            conf.roundup_power2_divisions = _divisions(value)
        elif key not in _UNMODELLED_KEYS:
            # PyTorch refuses an unknown key too ("Unrecognized key ... in allocator config").
            raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF: unknown option {key!r}")
    return conf


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF: {key} takes a number, not {value!r}") from None


def _divisions(value: str) -> list[tuple[int, int]]:
    def power_of_two(text: str) -> int:
        number = int(_number("roundup_power2_divisions", text))
        if number != 0 and number & (number - 1):
            raise ValueError(f"PYTORCH_CUDA_ALLOC_CONF: roundup_power2_divisions must be powers of 2, not {text}")
        return number

    if not value.startswith("["):
        return [(_UNLIMITED, power_of_two(value))]
    ranges: list[tuple[int, int]] = []
    for part in value.strip("[]").split(","):
        bound_text, _, divisions_text = part.partition(":")
        bound_text = bound_text.strip()
        bound = _UNLIMITED if bound_text == ">" else int(power_of_two(bound_text)) * MiB
        ranges.append((bound, power_of_two(divisions_text.strip())))
    return sorted(ranges)


class Block:
    """A range of a segment: allocated, free (cached) or, in an expandable segment, unmapped."""

    __slots__ = ("addr", "allocated", "mapped", "next", "pool", "prev", "requested", "segment", "since", "size")

    def __init__(self, addr: int, size: int, pool: Pool, segment: int) -> None:
        self.addr = addr
        self.size = size
        self.pool = pool
        self.segment = segment
        self.prev: Block | None = None
        self.next: Block | None = None
        self.allocated = False
        self.mapped = True
        self.requested = 0
        #: the pool's count of free-block searches when this block was cached (its age for GC)
        self.since = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def __repr__(self) -> str:  # pragma: no cover - for debugging
        state = "allocated" if self.allocated else ("free" if self.mapped else "unmapped")
        return f"Block({state} {self.size} B at {self.addr:#x})"


class Pool:
    """The free (cached, mapped) blocks of one pool, ordered by (size, address) for best fit."""

    __slots__ = ("expandable", "free", "is_small", "keys", "searches")

    def __init__(self, is_small: bool) -> None:
        self.is_small = is_small
        self.keys: list[tuple[int, int]] = []
        self.free: dict[int, Block] = {}
        self.searches = 0
        #: The pool's expandable segment's first block, once there is one.
        self.expandable: Block | None = None

    def insert(self, block: Block) -> None:
        block.since = self.searches
        bisect.insort(self.keys, (block.size, block.addr))
        self.free[block.addr] = block

    def remove(self, block: Block) -> None:
        key = (block.size, block.addr)
        index = bisect.bisect_left(self.keys, key)
        del self.keys[index]
        del self.free[block.addr]


class CachingAllocator:
    """One device's caching allocator: ``malloc``/``free`` of byte sizes, with its figures.

    ``capacity`` is what the allocator may reserve (the card's capacity less
    the memory the process holds outside PyTorch); None means no limit.
    """

    def __init__(self, capacity: int | None = None, conf: AllocConf | None = None, *, caching: bool = True) -> None:
        self.capacity = capacity
        self.conf = conf or AllocConf()
        #: False: no cache at all, each request its own exact segment (reserved equals
        #: allocated); what oomnb's simulated device did before it modelled the cache.
        self.caching = caching
        self.small = Pool(True)
        self.large = Pool(False)
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0
        #: reserved bytes of the small (True) and large (False) pool
        self.pool_reserved = {True: 0, False: 0}
        self.num_alloc_retries = 0
        self.num_ooms = 0
        #: Dry runs measure past the capacity: a request that would be the OOM is
        #: allocated anyway (after the releases the real allocator tries) and counted here.
        self.overcommit = False
        self.overcommitted = 0
        self._next_addr = 1 << 32
        self._segment_ids = 0

    # -- sizes ---------------------------------------------------------------------------
    def round_size(self, size: int) -> int:
        """``round_size``: the bytes a request of ``size`` takes."""
        if size < K_MIN_BLOCK_SIZE:
            return K_MIN_BLOCK_SIZE
        divisions = self.conf.divisions_for(size) if self.conf.roundup_power2_divisions else 0
        if divisions > 1 and size > K_MIN_BLOCK_SIZE * divisions:
            return _roundup_power2_next_division(size, divisions)
        return K_MIN_BLOCK_SIZE * -(-size // K_MIN_BLOCK_SIZE)

    @staticmethod
    def allocation_size(size: int) -> int:
        """``get_allocation_size``: the segment a new request of rounded ``size`` gets."""
        if size <= K_SMALL_SIZE:
            return K_SMALL_BUFFER
        if size < K_MIN_LARGE_ALLOC:
            return K_LARGE_BUFFER
        return K_ROUND_LARGE * -(-size // K_ROUND_LARGE)

    # -- malloc / free -----------------------------------------------------------------
    def malloc(self, nbytes: int, *, force: bool = False) -> Block | None:
        """Allocate ``nbytes``; None where the device is full (the OOM), unless ``force``."""
        size = self.round_size(nbytes)
        pool = self.small if size <= K_SMALL_SIZE else self.large
        if not self.caching:
            return self._exact(pool, size, nbytes, force)
        block = self._free_block(pool, size)
        if block is None:
            if self.conf.garbage_collection_threshold and self.capacity is not None:
                self._garbage_collect()
            block = self._alloc_block(pool, size, force)
            if block is None and self._release_available(pool, size):
                block = self._alloc_block(pool, size, force)
            if block is None and self._release_cached():
                block = self._alloc_block(pool, size, force)
            if block is None and self.overcommit:
                self.overcommitted += 1
                block = self._alloc_block(pool, size, True)
            if block is None:
                self.num_ooms += 1
                return None
        if block.size - size >= (K_MIN_BLOCK_SIZE if pool.is_small else K_SMALL_SIZE + 1) and (
            pool.is_small or self.conf.max_split_size is None or size < self.conf.max_split_size
        ):
            # should_split: the rest of the block goes back to the pool.
            rest = Block(block.addr + size, block.size - size, pool, block.segment)
            rest.prev, rest.next = block, block.next
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            if block.segment < 0:
                self._settle(rest)
            else:
                pool.insert(rest)
        block.allocated = True
        block.requested = nbytes
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def _exact(self, pool: Pool, size: int, nbytes: int, force: bool) -> Block | None:
        if not force and not self._fits(size):
            self.num_ooms += 1
            return None
        block = Block(self._next_addr, size, pool, 0)
        self._next_addr += size
        block.allocated, block.requested = True, nbytes
        self._grow(size, pool)
        self.allocated += size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: Block) -> None:
        """``free_block``: the block is cached, merged with free neighbours of its segment."""
        if not block.allocated:
            return
        block.allocated = False
        self.allocated -= block.size
        if block.segment == 0:  # an exact block (no cache): its memory goes back at once
            self.reserved -= block.size
            self.pool_reserved[block.pool.is_small] -= block.size
            return
        pool = block.pool
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated and neighbour.mapped:
                pool.remove(neighbour)
                self._merge(block, neighbour)
        pool.insert(block)

    @staticmethod
    def _merge(block: Block, neighbour: Block) -> None:
        if neighbour is block.prev:
            block.addr = neighbour.addr
            block.prev = neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    def _free_block(self, pool: Pool, size: int) -> Block | None:
        """``get_free_block``: the smallest cached block that fits, with max_split_size's limits."""
        pool.searches += 1
        keys = pool.keys
        index = bisect.bisect_left(keys, (size, 0))
        if index == len(keys):
            return None
        found, addr = keys[index]
        limit = self.conf.max_split_size
        if limit is not None:
            if size < limit <= found:
                return None  # oversize blocks are not split for small requests
            if size >= limit and found >= size + K_LARGE_BUFFER:
                return None  # nor used for requests more than 20 MiB smaller
        block = pool.free[addr]
        pool.remove(block)
        return block

    # -- segments ------------------------------------------------------------------------
    def _fits(self, more: int) -> bool:
        return self.capacity is None or self.reserved + more <= self.capacity

    def _alloc_block(self, pool: Pool, size: int, force: bool) -> Block | None:
        """``alloc_block``: a new segment (cudaMalloc), or pages mapped into the expandable segment."""
        if self.conf.expandable_segments:
            return self._alloc_expandable(pool, size, force)
        segment = self.allocation_size(size)
        if not force and not self._fits(segment):
            self.num_alloc_retries += 1
            return None
        self._segment_ids += 1
        block = Block(self._next_addr, segment, pool, self._segment_ids)
        self._next_addr += segment + K_LARGE_BUFFER  # segments are never adjacent
        self._grow(segment, pool)
        self.segments += 1
        return block

    def _grow(self, nbytes: int, pool: Pool) -> None:
        self.reserved += nbytes
        self.pool_reserved[pool.is_small] += nbytes
        if self.reserved > self.peak_reserved:
            self.peak_reserved = self.reserved

    def _release_segment(self, block: Block) -> None:
        """``release_block``: a whole free segment goes back to the driver."""
        block.pool.remove(block)
        self.reserved -= block.size
        self.pool_reserved[block.pool.is_small] -= block.size
        self.segments -= 1

    def _release_available(self, pool: Pool, size: int) -> bool:
        """``release_available_cached_blocks``: with max_split_size, free oversize cached segments."""
        limit = self.conf.max_split_size
        if limit is None or self.conf.expandable_segments:
            return False
        want = max(size, limit)
        keys = pool.keys
        index = bisect.bisect_left(keys, (want, 0))
        if index < len(keys):
            self._release_segment(pool.free[keys[index][1]])
            return True
        # No single block is large enough: free oversize blocks, largest first.
        released = 0
        for found, addr in reversed(list(keys)):
            if released >= want or found < limit:
                break
            block = pool.free[addr]
            if not block.is_split():
                self._release_segment(block)
                released += found
        return released >= want

    def _release_cached(self) -> bool:
        """``release_cached_blocks``: every cached segment that is not split goes back (emptyCache)."""
        released = False
        for pool in (self.small, self.large):
            if self.conf.expandable_segments or pool.expandable is not None:
                released = self._unmap_free_pages(pool) or released
            for _size, addr in list(pool.keys):
                block = pool.free[addr]
                if block.segment > 0 and not block.is_split():
                    self._release_segment(block)
                    released = True
        return released

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()``."""
        self._release_cached()

    def _garbage_collect(self) -> None:
        """``garbage_collect_cached_blocks``: reclaim the oldest unsplit large cached blocks above the threshold."""
        if self.capacity is None:
            return
        threshold = int(self.conf.garbage_collection_threshold * self.capacity)
        if self.reserved <= threshold:
            return
        target = self.reserved - threshold
        pool = self.large
        blocks = [pool.free[addr] for _s, addr in pool.keys if pool.free[addr].segment > 0]
        candidates = [b for b in blocks if not b.is_split()]
        total_age = sum(pool.searches - b.since for b in candidates)
        reclaimed = 0
        freed = True
        while reclaimed < target and freed and candidates:
            age = total_age / len(candidates)
            freed = False
            for block in list(candidates):
                if pool.searches - block.since >= age:
                    freed = True
                    reclaimed += block.size
                    total_age -= pool.searches - block.since
                    candidates.remove(block)
                    self._release_segment(block)

    # -- expandable segments ---------------------------------------------------------------
    def _page(self, pool: Pool) -> int:
        return K_SMALL_BUFFER if pool.is_small else K_LARGE_BUFFER

    def _alloc_expandable(self, pool: Pool, size: int, force: bool) -> Block | None:
        """``try_allocate_expandable_block``: map pages at the lowest address where ``size`` fits.

        The segment is one list of blocks (allocated, free and mapped, or
        unmapped) over an address space larger than any card; pages are mapped
        whole.  The lowest run of blocks that are not allocated and together
        hold ``size`` gets the pages it lacks, and becomes one free block.
        """
        if pool.expandable is None:
            base = -(-self._next_addr // K_LARGE_BUFFER) * K_LARGE_BUFFER
            first = Block(base, _EXPANDABLE_SPACE, pool, -1)
            first.mapped = False
            self._next_addr = base + _EXPANDABLE_SPACE
            pool.expandable = first
            # torch's segment count is of cudaMalloc'd segments: an expandable one is not counted.
        page = self._page(pool)
        start: Block | None = pool.expandable
        while start is not None:
            if start.allocated:
                start = start.next
                continue
            room = 0
            end: Block | None = start
            while end is not None and not end.allocated and room < size:
                room += end.size
                end = end.next
            if room < size:
                start = end
                continue
            target = start.addr + size
            mapped = 0
            block: Block | None = start
            while block is not None and block.addr < target:
                if not block.mapped:
                    mapped += min(block.addr + block.size, -(-target // page) * page) - block.addr
                block = block.next
            if not force and not self._fits(mapped):
                self.num_alloc_retries += 1
                return None
            self._grow(mapped, pool)
            return self._absorb(pool, start, target, page)
        return None  # pragma: no cover - the address space never runs out

    def _absorb(self, pool: Pool, start: Block, target: int, page: int) -> Block:
        """Make the run from ``start`` up to ``target`` (pages rounded up) one mapped block, not cached."""
        end = start.addr
        block: Block | None = start
        while block is not None and block.addr < target:
            if block.mapped:
                pool.remove(block)
                end = block.addr + block.size
            else:
                mapped_end = min(block.addr + block.size, -(-target // page) * page)
                end = mapped_end
                if mapped_end < block.addr + block.size:
                    # The rest of the unmapped block stays unmapped.
                    rest = Block(mapped_end, block.addr + block.size - mapped_end, pool, -1)
                    rest.mapped = False
                    rest.prev, rest.next = block, block.next
                    if block.next is not None:
                        block.next.prev = rest
                    block.next = rest
                    block.size = mapped_end - block.addr
            last = block
            block = block.next
        merged = Block(start.addr, end - start.addr, pool, -1)
        merged.prev, merged.next = start.prev, last.next
        if start.prev is not None:
            start.prev.next = merged
        else:
            pool.expandable = merged
        if last.next is not None:
            last.next.prev = merged
        nxt = merged.next
        if nxt is not None and not nxt.allocated and nxt.mapped:
            # try_merge_blocks with the next free block
            pool.remove(nxt)
            self._merge(merged, nxt)
        return merged

    def _settle(self, rest: Block) -> None:
        """A split-off remainder in an expandable segment is cached, merged with a free next block."""
        nxt = rest.next
        if nxt is not None and not nxt.allocated and nxt.mapped:
            rest.pool.remove(nxt)
            self._merge(rest, nxt)
        rest.pool.insert(rest)

    def _unmap_free_pages(self, pool: Pool) -> bool:
        """Unmap the pages wholly inside free blocks of the expandable segment (release_cached_blocks)."""
        page = self._page(pool)
        released = False
        for _size, addr in list(pool.keys):
            block = pool.free[addr]
            if block.segment >= 0:
                continue
            first = -(-block.addr // page) * page
            last = (block.addr + block.size) // page * page
            if last <= first:
                continue
            pool.remove(block)
            self.reserved -= last - first
            self.pool_reserved[pool.is_small] -= last - first
            released = True
            pieces = []
            if first > block.addr:
                pieces.append((block.addr, first - block.addr, True))
            pieces.append((first, last - first, False))
            if block.addr + block.size > last:
                pieces.append((last, block.addr + block.size - last, True))
            prev, nxt = block.prev, block.next
            piece = block
            for piece_addr, piece_size, is_mapped in pieces:
                piece = Block(piece_addr, piece_size, pool, -1)
                piece.mapped = is_mapped
                piece.prev = prev
                if prev is not None:
                    prev.next = piece
                else:
                    pool.expandable = piece
                prev = piece
                if is_mapped:
                    pool.insert(piece)
            piece.next = nxt
            if nxt is not None:
                nxt.prev = piece
        if released:
            self._join_unmapped(pool)
        return released

    @staticmethod
    def _join_unmapped(pool: Pool) -> None:
        block = pool.expandable
        while block is not None and block.next is not None:
            nxt = block.next
            if not block.mapped and not nxt.mapped:
                block.size += nxt.size
                block.next = nxt.next
                if nxt.next is not None:
                    nxt.next.prev = block
                continue
            block = nxt

    # -- copies --------------------------------------------------------------------------
    def clone(self, allocated: Iterable[Block] = ()) -> tuple[CachingAllocator, dict[int, Block]]:
        """A copy of this allocator, segments and all, for a dry run to go on from.

        The allocator keeps only its free blocks; ``allocated`` are the blocks
        the caller holds (the tracker's live storages).  Every block of every
        segment they belong to is copied, links included, without recursion.
        Returns the copy and, by ``id`` of each original block, its copy.
        """
        twin = CachingAllocator(self.capacity, self.conf, caching=self.caching)
        for name in (
            "allocated",
            "reserved",
            "peak_allocated",
            "peak_reserved",
            "segments",
            "num_alloc_retries",
            "num_ooms",
            "_next_addr",
            "_segment_ids",
        ):
            setattr(twin, name, getattr(self, name))
        twin.pool_reserved = dict(self.pool_reserved)
        pools = {id(self.small): twin.small, id(self.large): twin.large}
        seen: dict[int, Block] = {}
        starts: list[Block] = [*self.small.free.values(), *self.large.free.values(), *allocated]
        starts += [pool.expandable for pool in (self.small, self.large) if pool.expandable is not None]
        for start in starts:
            if id(start) in seen:
                continue
            first = start
            while first.prev is not None:
                first = first.prev
            block: Block | None = first
            previous: Block | None = None
            while block is not None:
                copied = Block(block.addr, block.size, pools[id(block.pool)], block.segment)
                copied.allocated, copied.mapped = block.allocated, block.mapped
                copied.requested, copied.since = block.requested, block.since
                copied.prev = previous
                if previous is not None:
                    previous.next = copied
                seen[id(block)] = copied
                previous, block = copied, block.next
        for pool in (self.small, self.large):
            other = pools[id(pool)]
            other.keys = list(pool.keys)
            other.free = {addr: seen[id(block)] for addr, block in pool.free.items()}
            other.searches = pool.searches
            other.expandable = seen[id(pool.expandable)] if pool.expandable is not None else None
        return twin, seen

    def segment_starts(self, allocated: Iterable[Block] = ()) -> list[Block]:
        """The first block of every segment, in address order (which is the order they were made).

        ``allocated`` are the blocks the caller holds (the allocator keeps only free ones).
        """
        firsts: dict[int, Block] = {}
        starts: list[Block] = [*self.small.free.values(), *self.large.free.values(), *allocated]
        starts += [pool.expandable for pool in (self.small, self.large) if pool.expandable is not None]
        for start in starts:
            first = start
            while first.prev is not None:
                first = first.prev
            firsts[first.addr] = first
        return [firsts[addr] for addr in sorted(firsts)]

    def snapshot(self, allocated: Iterable[Block] = ()) -> list[dict[str, Any]]:
        """The segments as ``torch.cuda.memory_snapshot()`` lists them, in address order.

        ``allocated`` are the blocks the caller holds (the allocator keeps only
        free ones).  Each segment has ``address``, ``total_size`` (mapped bytes),
        ``segment_type`` ("small"/"large") and ``blocks`` with ``size`` and
        ``state``: "active_allocated", "inactive" (cached) or "unmapped" (an
        expandable segment's pages given back, not part of ``total_size``).
        """
        segments = []
        for first in self.segment_starts(allocated):
            addr = first.addr
            blocks: list[dict[str, Any]] = []
            total = 0
            block: Block | None = first
            while block is not None:
                state = "active_allocated" if block.allocated else ("inactive" if block.mapped else "unmapped")
                blocks.append({"size": block.size, "state": state})
                total += block.size if block.mapped else 0
                block = block.next
            if total:
                kind = "small" if first.pool.is_small else "large"
                segments.append(
                    {
                        "address": addr,
                        "total_size": total,
                        "segment_type": kind,
                        "is_expandable": first is first.pool.expandable,
                        "blocks": blocks,
                    }
                )
        return segments

    # -- figures -------------------------------------------------------------------------
    @property
    def inactive_split(self) -> int:
        """Cached bytes in blocks that are part of a split segment (``inactive_split_bytes``)."""
        return sum(block.size for pool in (self.small, self.large) for block in pool.free.values() if block.is_split())

    def reset_peak(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved

    def memory_stats(self) -> dict[str, int]:
        """The figures under the names ``torch.cuda.memory_stats()`` uses ("all" only, plus per-pool reserved)."""
        small_reserved = self.pool_reserved[True]
        return {
            "allocated_bytes.all.current": self.allocated,
            "allocated_bytes.all.peak": self.peak_allocated,
            "reserved_bytes.all.current": self.reserved,
            "reserved_bytes.all.peak": self.peak_reserved,
            "reserved_bytes.small_pool.current": small_reserved,
            "reserved_bytes.large_pool.current": self.reserved - small_reserved,
            "inactive_split_bytes.all.current": self.inactive_split,
            "segment.all.current": self.segments,
            "num_alloc_retries": self.num_alloc_retries,
            "num_ooms": self.num_ooms,
        }


def _roundup_power2_next_division(size: int, divisions: int) -> int:
    """``roundup_power2_next_division``: ``size`` rounded up to the next 1/divisions of its power of two."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor // divisions
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step
