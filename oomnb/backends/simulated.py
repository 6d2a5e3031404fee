"""The simulated device as a :class:`~oomnb.backends.Backend`: figures from the storage tracker.

The tracker itself (what counts, how an OOM is raised) is
:mod:`oomnb.allocator.tracker`; its names are re-exported here.
"""

from __future__ import annotations

from typing import Any

from ..allocator.oom import OomFacts, parse_oom_message
from ..allocator.tracker import SimulatedDevice, device
from ..model.units import Card

__all__ = ["SimulatedBackend", "SimulatedDevice", "device"]


class SimulatedBackend:
    """The :class:`~oomnb.backends.Backend` over :data:`device`."""

    kind = "simulated"
    index = 0

    def __init__(self, sim: SimulatedDevice | None = None) -> None:
        self.sim = sim or device

    @property
    def name(self) -> str:
        return f"simulated {self.sim.card.name}" if self.sim.card else "simulated GPU"

    def ensure_started(self) -> None:
        if not self.sim.active:
            self.sim.start()

    def snapshot(self) -> Any:
        from . import MemorySnapshot

        sim = self.sim
        capacity = sim.capacity
        return MemorySnapshot(
            allocated_bytes=sim.allocated,
            reserved_bytes=sim.reserved,
            peak_bytes=sim.peak,
            capacity_bytes=capacity,
            free_bytes=None if capacity is None else max(0, capacity - sim.context - sim.reserved),
        )

    def reset_peak(self) -> None:
        self.sim.reset_peak()

    @property
    def capacity(self) -> int | None:
        return self.sim.capacity

    @property
    def card(self) -> Card | None:
        return self.sim.card

    def limit(self, nbytes: int | None, card: Card | None = None, context: int | None = None) -> None:
        """Cap the device at ``nbytes``; a named ``card`` brings its CUDA context (``context`` sets
        another figure) and cuBLAS's workspace at the first matrix product."""
        sim = self.sim
        sim.card = card if nbytes is not None else None
        if context is None:
            context = card.context_bytes if card is not None and nbytes is not None else 0
        sim.context = context
        sim.capacity = nbytes
        due = card.cublas_workspace_bytes if card is not None and nbytes is not None else 0
        sim.workspace_due = due if sim.workspace is None else 0

    def current_context(self) -> int:
        return self.sim.context

    def current_limit(self) -> tuple[int | None, Card | None]:
        return self.sim.capacity, self.sim.card

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()`` on the allocator model."""
        self.sim.empty_cache()

    def describe_oom(self, exc: BaseException) -> OomFacts:
        facts = parse_oom_message(str(exc))
        if facts.kind == "simulated" and self.sim.last_oom is not None:
            # The message rounds to two decimals; the device knows the bytes.
            request, allocated, capacity, reserved = self.sim.last_oom
            facts.requested_bytes = request
            facts.allocated_bytes = allocated
            facts.capacity_bytes = capacity
            facts.free_bytes = max(0, capacity - self.sim.context - reserved)
            facts.reserved_bytes = reserved
            facts.reserved_unallocated_bytes = reserved - allocated
        return facts

    def supports_bf16(self) -> bool | None:
        return self.sim.card.bf16 if self.sim.card else None
