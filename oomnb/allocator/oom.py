"""Recognise out-of-memory errors and read the figures out of their messages.

PyTorch has phrased its allocator failures in several ways over the years;
:func:`parse_oom_message` reads all of them into one :class:`OomFacts`.  It is
a pure function over text that never raises, whatever it is given, and runs in
time linear in the length of the text.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["MAX_BYTES", "OomFacts", "is_oom_error", "parse_oom_message"]


def _atomic(name: str, body: str) -> str:
    """``body`` as an atomic group captured as ``name``.

    Once matched it is never given back, so a failure after a long run of
    digits or blanks costs one pass over it, not one retry per character.
    Python 3.10 has no ``(?>...)``; a lookahead is atomic, and the
    backreference then consumes what it matched.
    """
    return f"(?=(?P<{name}>{body}))(?P={name})"


# Sizes as c10's format_size prints them ("20.00 MiB", "0 bytes").  MPS prints
# binary sizes with decimal-looking units ("1024.00 MB"), so KB/MB/GB are read
# as binary here: in these messages they always are.
#
# The lookbehind keeps searches linear: without it, a pattern that opens with
# a size retries from every digit of a long digit run, each try rescanning the
# rest of the run.  It drops no match, since a match starting after a digit
# implies one starting at that digit, and search returns the leftmost.  The
# atomic groups drop none either: a unit never starts with a digit, a dot or
# a blank, so giving one back could never let the rest match.
_SIZE = (
    r"(?<!\d)"
    + _atomic("number", r"\d+(?:\.\d+)?")
    + _atomic("blank", r"\s*")
    + r"(?P<unit>bytes|byte|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)"
)
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

# Phrasings where the words follow the size.  Searched one by one, each would
# scan every digit of the text again; as one pattern the text is scanned
# once, and the first match of each group is that phrasing's leftmost match:
# no two start with the same word, and none holds a digit, so matches of
# different phrasings cannot overlap.
_WORDS_AFTER = {
    "total_capacity": r" total capacity",
    "free": r" free\b",
    "already_allocated": r" already allocated",
    "reserved_unallocated": r" is reserved by PyTorch but unallocated",
    "reserved_in_total": r" reserved in total by PyTorch",
    "cached": r" cached\)",
    "allowed": r" allowed;",
}
_SIZE_THEN_WORDS = re.compile(
    _SIZE + "(?:" + "|".join(f"(?P<{name}>{words})" for name, words in _WORDS_AFTER.items()) + ")", re.I
)

# Tried in order for each field, the first phrasing found wins.  A str names
# a phrasing of _WORDS_AFTER.
_PATTERNS: dict[str, list[re.Pattern[str] | str]] = {
    "requested_bytes": [
        re.compile(r"Tried to allocate " + _SIZE, re.I),
        re.compile(r"you tried to allocate (?P<number>\d+)", re.I),
    ],
    "capacity_bytes": [
        # "total capacty" is how PyTorch 2.1 spelled it.
        re.compile(r"total capac(?:i)?ty of " + _SIZE, re.I),
        "total_capacity",
        re.compile(r"max allowed: " + _SIZE, re.I),
    ],
    "free_bytes": [
        re.compile(r"of which " + _SIZE + r" is free", re.I),
        "free",
    ],
    "allocated_bytes": [
        re.compile(r"Of the allocated memory " + _SIZE + r" is allocated by PyTorch", re.I),
        "already_allocated",
        re.compile(r"MPS allocated: " + _SIZE, re.I),
    ],
    "reserved_unallocated_bytes": ["reserved_unallocated"],
    "reserved_bytes": ["reserved_in_total", "cached"],
    "process_bytes": [
        re.compile(r"this process has " + _SIZE + r" memory in use", re.I),
        re.compile(r"Process " + _atomic("pid", r"\d+") + r" has " + _SIZE + r" memory in use", re.I),
    ],
    "allowed_bytes": ["allowed"],
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

_GPU_INDEX = re.compile(r"\bGPU " + _atomic("index", r"\d+") + r"\b")

#: Figures above this many bytes are read as unknown: no allocator has seen
#: one, and a text that claims one is corrupt or hostile.
MAX_BYTES = 2**64
# 2**64 has 20 digits: a longer whole part (leading zeros aside) is always
# too large, whatever the unit, and is rejected before int() sees it, which
# would be quadratic on it and refuses more than 4300 digits anyway.
_MAX_DIGITS = len(str(MAX_BYTES))
# Digits of a fraction past these are worth far less than a byte, even in TiB,
# and float() need not read a megabyte of them.
_MAX_FRACTION_DIGITS = 30


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


def _bounded(value: int | None) -> int | None:
    """``value``, or None when it is negative or past :data:`MAX_BYTES`."""
    if value is None or not 0 <= value <= MAX_BYTES:
        return None
    return value


def _whole(digits: str) -> int | None:
    """A run of digits as an int, or None when it is absurdly large."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS:
        return None
    try:
        return _bounded(int(digits))
    except ValueError:  # pragma: no cover - \d and int() agree on what a digit is
        return None


def _to_bytes(number: str, unit: str) -> int | None:
    """``number`` ``unit`` in bytes, or None when it is not a sane figure."""
    factor = _UNIT.get(unit.lower())
    if factor is None:
        # re.I matches "KıB" (dotless i) as KiB; its lower() is no unit here.
        return None
    whole, _, fraction = number.partition(".")
    count = _whole(whole)
    if count is None:
        return None
    if not fraction:
        # Exact, where float() would round figures past 2**53.
        return _bounded(count * factor)
    try:
        value = float(f"{count}.{fraction[:_MAX_FRACTION_DIGITS]}") * factor
    except ValueError:  # pragma: no cover - \d and float() agree on what a digit is
        return None
    if not math.isfinite(value):  # pragma: no cover - bounded above, so always finite
        return None
    return _bounded(round(value))


def parse_oom_message(message: object) -> OomFacts:
    """Read the figures out of any PyTorch out-of-memory message.

    Handles the CUDA formats of PyTorch 1.x ("(GPU 0; 14.76 GiB total capacity;
    ...)"), 2.x ("GPU 0 has a total capacity of ... of which ... is free"),
    the 2.1 spelling "capacty", HIP and XPU, MPS ("MPS allocated: ..."), the
    CPU allocator ("you tried to allocate N bytes") and oomnb's simulated
    device.

    Never raises, and takes time linear in the length of the text: it runs
    while an error is being handled, where a second error or a hang would
    hide the first.  A figure that is not a plain number of at most
    :data:`MAX_BYTES` bytes is read as unknown (``None``).  Anything but a
    ``str`` gives the empty :class:`OomFacts`.

    Examples
    --------
    >>> f = parse_oom_message("CUDA out of memory. Tried to allocate 20.00 MiB. "
    ...     "GPU 0 has a total capacity of 14.75 GiB of which 3.06 MiB is free.")
    >>> f.requested_bytes, f.kind
    (20971520, 'cuda')
    """
    if not isinstance(message, str):
        return OomFacts()
    # A subclass's own methods could raise or lie; read the plain characters.
    text = str.__str__(message)
    facts = OomFacts()
    for kind, pattern in _KINDS:
        if pattern.search(text):
            facts.kind = kind
            break
    index = _GPU_INDEX.search(text)
    if index:
        facts.device_index = _whole(index.group("index"))
    size_first: dict[str, re.Match[str]] = {}
    for found in _SIZE_THEN_WORDS.finditer(text):
        if found.lastgroup is not None:
            size_first.setdefault(found.lastgroup, found)
        if len(size_first) == len(_WORDS_AFTER):
            break
    for field, patterns in _PATTERNS.items():
        for phrasing in patterns:
            match = size_first.get(phrasing) if isinstance(phrasing, str) else phrasing.search(text)
            if match:
                # An absurd figure is unknown rather than a reason to try the
                # next phrasing: it is what the message said.
                setattr(facts, field, _to_bytes(match.group("number"), match.groupdict().get("unit") or "bytes"))
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
        facts.reserved_bytes = _bounded(facts.allocated_bytes + facts.reserved_unallocated_bytes)
    return facts


def is_oom_error(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and the allocator failures that
    arrive as plain ``RuntimeError`` (CPU "can't allocate memory", MPS "out of
    memory", cuBLAS/cuDNN allocation failures).

    An exception whose ``str()`` raises is not one of them.
    """
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(exc, (RuntimeError, MemoryError)):
        if isinstance(exc, MemoryError):
            return True
        try:
            text = str(exc)
        except Exception:
            # Asked while the error is handled: a second one would hide it.
            return False
        return bool(_OOM_TEXT.search(text))
    return False
