"""The CUDA caching allocator's own figures for one device.

Nothing here initialises CUDA: before the notebook has used the GPU, the
figures are zero and the capacity is unknown, as ``torch.cuda.memory_stats``
itself reports.  ``--limit`` (or a card name) caps the process with
``set_per_process_memory_fraction``, which does need CUDA and so is the one
place that initialises it, because the user asked for it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ..allocator.oom import OomFacts, parse_oom_message
from ..model.units import Card

__all__ = ["CudaBackend", "write_snapshot"]


class CudaBackend:
    """:class:`~oomnb.backends.Backend` over ``torch.cuda`` for device ``index``."""

    kind = "cuda"

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self._limit: int | None = None
        self._card: Card | None = None

    @property
    def name(self) -> str:
        if not torch.cuda.is_initialized():
            return f"cuda:{self.index}"
        return str(torch.cuda.get_device_name(self.index))

    def ensure_started(self) -> None:
        """CUDA starts itself when the notebook first uses it."""

    @staticmethod
    def _initialised() -> bool:
        return bool(torch.cuda.is_initialized())

    def total_memory(self) -> int | None:
        if not self._initialised():
            return None
        return int(torch.cuda.get_device_properties(self.index).total_memory)

    @property
    def capacity(self) -> int | None:
        total = self.total_memory()
        if self._limit is not None:
            return self._limit if total is None else min(self._limit, total)
        return total

    @property
    def card(self) -> Card | None:
        return self._card

    def snapshot(self) -> Any:
        from . import MemorySnapshot

        if not self._initialised():
            return MemorySnapshot(0, 0, 0, self._limit, self._limit)
        i = self.index
        allocated = int(torch.cuda.memory_allocated(i))
        reserved = int(torch.cuda.memory_reserved(i))
        peak = int(torch.cuda.max_memory_allocated(i))
        free_device, total = (int(v) for v in torch.cuda.mem_get_info(i))
        capacity = total if self._limit is None else min(total, self._limit)
        # Free for this process: what the card has free plus what our cache
        # holds unallocated, and never more than the cap leaves.
        free = free_device + (reserved - allocated)
        if self._limit is not None:
            free = min(free, max(0, self._limit - allocated))
        return MemorySnapshot(allocated, reserved, peak, capacity, max(0, free))

    def memory_stats(self) -> dict[str, Any]:
        if not self._initialised():
            return {}
        return dict(torch.cuda.memory_stats(self.index))

    def reset_peak(self) -> None:
        if self._initialised():
            torch.cuda.reset_peak_memory_stats(self.index)

    def current_limit(self) -> tuple[int | None, Card | None]:
        return self._limit, self._card

    def current_context(self) -> int:
        """What this process holds outside PyTorch's allocator: the card's total less free less reserved
        (other processes on the card count here too)."""
        if not self._initialised() or self._limit is not None:
            return 0  # a cap (a memory fraction) bounds PyTorch's own reserved memory only
        free, total = (int(v) for v in torch.cuda.mem_get_info(self.index))
        return max(0, total - free - int(torch.cuda.memory_reserved(self.index)))

    def limit(self, nbytes: int | None, card: Card | None = None, context: int | None = None) -> None:
        # ``context`` is the simulated device's: a card has its own.
        self._limit = nbytes
        self._card = card if nbytes is not None else None
        if nbytes is None and not self._initialised():
            return
        total = int(torch.cuda.get_device_properties(self.index).total_memory)
        fraction = 1.0 if nbytes is None else min(1.0, nbytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, self.index)

    def empty_cache(self) -> None:
        if self._initialised():
            torch.cuda.empty_cache()

    def describe_oom(self, exc: BaseException) -> OomFacts:
        facts = parse_oom_message(str(exc))
        if facts.device_index is None:
            facts.device_index = self.index
        if self._initialised():
            stats = self.memory_stats()
            if facts.allocated_bytes is None:
                facts.allocated_bytes = int(stats.get("allocated_bytes.all.current", 0))
            if facts.reserved_bytes is None:
                facts.reserved_bytes = int(stats.get("reserved_bytes.all.current", 0))
            if facts.reserved_unallocated_bytes is None and facts.reserved_bytes is not None:
                facts.reserved_unallocated_bytes = max(0, facts.reserved_bytes - (facts.allocated_bytes or 0))
        return facts

    def supports_bf16(self) -> bool | None:
        if not self._initialised():
            return None
        major, _ = torch.cuda.get_device_capability(self.index)
        return major >= 8


@contextlib.contextmanager
def _noop() -> Any:
    yield


def record_history(enabled: bool) -> None:
    """Start or stop the allocator's history recording (for ``--snapshot``)."""
    recorder = torch.cuda.memory._record_memory_history
    if enabled:
        recorder(enabled="all", context="all", stacks="python", max_entries=100_000)
    else:
        recorder(enabled=None)


def write_snapshot(path: str) -> str:
    """Write the allocator snapshot PyTorch's memory viewer opens (pytorch.org/memory_viz)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    torch.cuda.memory._dump_snapshot(path)
    return os.path.abspath(path)
