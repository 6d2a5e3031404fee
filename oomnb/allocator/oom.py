"""Recognise out-of-memory errors and read the figures out of their messages.

PyTorch has phrased its allocator failures in several ways over the years;
:func:`parse_oom_message` reads all of them into one :class:`OomFacts`.  It is
a pure function over text and never raises, whatever it is given.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["OomFacts", "is_oom_error", "parse_oom_message"]

# Sizes as c10's format_size prints them ("20.00 MiB", "0 bytes").  MPS prints
# binary sizes with decimal-looking units ("1024.00 MB"), so KB/MB/GB are read
# as binary here: in these messages they always are.
_SIZE = r"(\d+(?:\.\d+)?)\s*(bytes|byte|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)"
_UNIT = {
    "bytes": 1,
    "byte": 1,
    "b": 1,
    "kib": 1024,
    "kb": 1024,
    "mib": 1024**2,
    "mb": 1024**2,
    "gib": 1024**3,
    "gb": 1024**3,
    "tib": 1024**4,
    "tb": 1024**4,
}

_PATTERNS: dict[str, list[re.Pattern[str]]] = {
    "requested_bytes": [
        re.compile(r"Tried to allocate " + _SIZE, re.I),
        re.compile(r"you tried to allocate (\d+)()", re.I),
    ],
    "capacity_bytes": [
        # "total capacty" is how PyTorch 2.1 spelled it.
        re.compile(r"total capac(?:i)?ty of " + _SIZE, re.I),
        re.compile(_SIZE + r" total capacity", re.I),
        re.compile(r"max allowed: " + _SIZE, re.I),
    ],
    "free_bytes": [
        re.compile(r"of which " + _SIZE + r" is free", re.I),
        re.compile(_SIZE + r" free\b", re.I),
    ],
    "allocated_bytes": [
        re.compile(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch", re.I),
        re.compile(_SIZE + r" already allocated", re.I),
        re.compile(r"MPS allocated: " + _SIZE, re.I),
    ],
    "reserved_unallocated_bytes": [
        re.compile(_SIZE + r" is reserved by PyTorch but unallocated", re.I),
    ],
    "reserved_bytes": [
        re.compile(_SIZE + r" reserved in total by PyTorch", re.I),
        re.compile(_SIZE + r" cached\)", re.I),
    ],
    "process_bytes": [
        re.compile(r"this process has " + _SIZE + r" memory in use", re.I),
        re.compile(r"Process \d+ has " + _SIZE + r" memory in use", re.I),
    ],
    "allowed_bytes": [
        re.compile(_SIZE + r" allowed;", re.I),
    ],
    "other_bytes": [
        re.compile(r"other allocations: " + _SIZE, re.I),
    ],
}

_KINDS = [
    ("simulated", re.compile(r"simulated by oomnb", re.I)),
    ("mps", re.compile(r"\bMPS backend out of memory", re.I)),
    ("hip", re.compile(r"\bHIP out of memory", re.I)),
    ("xpu", re.compile(r"\bXPU out of memory", re.I)),
    ("cublas", re.compile(r"CUBLAS_STATUS_ALLOC_FAILED", re.I)),
    ("cudnn", re.compile(r"CUDNN_STATUS_(?:ALLOC_FAILED|NOT_ENOUGH_WORKSPACE)", re.I)),
    ("cuda", re.compile(r"\bCUDA (?:error: )?out of memory", re.I)),
    ("cpu", re.compile(r"DefaultCPUAllocator|can't allocate memory|not enough memory", re.I)),
]

_OOM_TEXT = re.compile(
    r"out of memory|can't allocate memory|DefaultCPUAllocator: not enough memory"
    r"|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED",
    re.I,
)

_GPU_INDEX = re.compile(r"\bGPU (\d+)\b")


@dataclass
class OomFacts:
    """What an allocator failure message says, every figure in bytes.

    A figure the message does not give is ``None``.
    """

    kind: str = "unknown"
    device_index: int | None = None
    requested_bytes: int | None = None
    capacity_bytes: int | None = None
    free_bytes: int | None = None
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    reserved_unallocated_bytes: int | None = None
    process_bytes: int | None = None
    allowed_bytes: int | None = None
    other_bytes: int | None = None

    @property
    def shortfall_bytes(self) -> int | None:
        """How far the failed request went past what was free."""
        if self.requested_bytes is None or self.free_bytes is None:
            return None
        return max(0, self.requested_bytes - self.free_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _to_bytes(number: str, unit: str) -> int:
    return round(float(number) * _UNIT.get(unit.lower(), 1))


def parse_oom_message(message: object) -> OomFacts:
    """Read the figures out of any PyTorch out-of-memory message.

    Handles the CUDA formats of PyTorch 1.x ("(GPU 0; 14.76 GiB total capacity;
    ...)"), 2.x ("GPU 0 has a total capacity of ... of which ... is free"),
    the 2.1 spelling "capacty", HIP and XPU, MPS ("MPS allocated: ..."), the
    CPU allocator ("you tried to allocate N bytes") and oomnb's simulated
    device.  Never raises.

    Examples
    --------
    >>> f = parse_oom_message("CUDA out of memory. Tried to allocate 20.00 MiB. "
    ...     "GPU 0 has a total capacity of 14.75 GiB of which 3.06 MiB is free.")
    >>> f.requested_bytes, f.kind
    (20971520, 'cuda')
    """
    try:
        text = str(message)
    except Exception:
        return OomFacts()
    facts = OomFacts()
    for kind, pattern in _KINDS:
        if pattern.search(text):
            facts.kind = kind
            break
    index = _GPU_INDEX.search(text)
    if index:
        facts.device_index = int(index.group(1))
    for field, patterns in _PATTERNS.items():
        for pattern in patterns:
            found = pattern.search(text)
            if found:
                number, unit = found.group(1), found.group(2) or "bytes"
                setattr(facts, field, _to_bytes(number, unit))
                break
    if facts.kind == "mps" and facts.capacity_bytes is not None and facts.allocated_bytes is not None:
        facts.free_bytes = max(0, facts.capacity_bytes - facts.allocated_bytes - (facts.other_bytes or 0))
    # Old messages give reserved in total; new ones give the unallocated part.
    if (
        facts.reserved_unallocated_bytes is None
        and facts.reserved_bytes is not None
        and facts.allocated_bytes is not None
    ):
        facts.reserved_unallocated_bytes = max(0, facts.reserved_bytes - facts.allocated_bytes)
    if (
        facts.reserved_bytes is None
        and facts.reserved_unallocated_bytes is not None
        and facts.allocated_bytes is not None
    ):
        facts.reserved_bytes = facts.allocated_bytes + facts.reserved_unallocated_bytes
    return facts


def is_oom_error(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and the allocator failures that
    arrive as plain ``RuntimeError`` (CPU "can't allocate memory", MPS "out of
    memory", cuBLAS/cuDNN allocation failures)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(exc, (RuntimeError, MemoryError)):
        if isinstance(exc, MemoryError):
            return True
        return bool(_OOM_TEXT.search(str(exc)))
    return False
