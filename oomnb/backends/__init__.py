"""Where the figures come from: the CUDA caching allocator, or the simulated GPU.

Every backend answers the same small protocol, so the magics, the census and
the advisor never care which one they talk to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from ..allocator.oom import OomFacts
from ..model.units import Card

__all__ = ["Backend", "MemorySnapshot", "cuda_usable", "get_backend", "limited"]


@dataclass(frozen=True)
class MemorySnapshot:
    """Device memory at one moment, in bytes.

    ``capacity_bytes`` and ``free_bytes`` are None where they are unknown
    (an uninitialised CUDA device, a simulated device with no limit).
    """

    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int
    capacity_bytes: int | None
    free_bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    """What oomnb needs from a device."""

    kind: str  # "cuda" or "simulated"
    index: int

    @property
    def name(self) -> str: ...

    @property
    def capacity(self) -> int | None: ...

    @property
    def card(self) -> Card | None: ...

    def ensure_started(self) -> None: ...

    def snapshot(self) -> MemorySnapshot: ...

    def reset_peak(self) -> None: ...

    def limit(self, nbytes: int | None, card: Card | None = None, context: int | None = None) -> None: ...

    def current_limit(self) -> tuple[int | None, Card | None]: ...

    def current_context(self) -> int:
        """Non-PyTorch memory of this process on the device (the CUDA context, libraries)."""
        ...

    def empty_cache(self) -> None: ...

    def describe_oom(self, exc: BaseException) -> OomFacts: ...

    def supports_bf16(self) -> bool | None: ...


def cuda_usable() -> bool:
    """Whether a CUDA device can be used, without initialising CUDA."""
    try:
        import torch

        return bool(torch.backends.cuda.is_built()) and torch.cuda.is_available()
    except Exception:
        return False


_SIMULATED_NAMES = {"simulated", "sim", "simulate", "fake"}


def get_backend(spec: str | None = None) -> Backend:
    """The backend for ``spec``: ``None``/``"auto"``, ``"simulated"``, ``"cuda"``, ``"cuda:1"``.

    ``auto`` is the first CUDA device when one is usable and the simulated
    device otherwise.

    Raises
    ------
    ValueError
        One line, for an unknown or absent device.
    """
    text = (spec or "auto").strip().lower()
    if text in _SIMULATED_NAMES:
        from .simulated import SimulatedBackend

        return SimulatedBackend()
    if text == "auto":
        if cuda_usable():
            from .cuda import CudaBackend

            return CudaBackend(0)
        from .simulated import SimulatedBackend

        return SimulatedBackend()
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"unknown device {spec!r}: the index must be a number, as in cuda:1")
        if not cuda_usable():
            raise ValueError(
                f"device {spec!r} is not available: this PyTorch sees no CUDA device (use --device simulated)"
            )
        import torch

        index = int(index_text)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {spec!r} does not exist: {count} CUDA device(s) are visible")
        from .cuda import CudaBackend

        return CudaBackend(index)
    raise ValueError(f"unknown device {spec!r} (use auto, simulated, cuda or cuda:N)")


@contextlib.contextmanager
def limited(
    backend: Backend, nbytes: int | None, card: Card | None = None, context: int | None = None
) -> Iterator[None]:
    """Run with ``backend`` capped at ``nbytes`` (and ``context`` of it held outside PyTorch), then restore."""
    if nbytes is None and context is None:
        yield
        return
    before, before_card = backend.current_limit()
    before_context = backend.current_context()
    if nbytes is None:
        nbytes, card = before, before_card
    backend.limit(nbytes, card, context)
    try:
        yield
    finally:
        backend.limit(before, before_card, before_context)
