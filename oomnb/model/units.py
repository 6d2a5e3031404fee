"""Byte sizes, named cards and the allocator's rounding rule.

Pure functions over plain data: nothing here imports IPython or touches a
device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .safe import safe_repr

__all__ = [
    "CARDS",
    "MAX_SIZE",
    "Card",
    "format_bytes",
    "format_size_like_torch",
    "parse_limit",
    "parse_size",
    "round_allocation",
]

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

#: The CUDA caching allocator hands out blocks in multiples of 512 bytes
#: (``kMinBlockSize`` in ``c10/cuda/CUDACachingAllocator.cpp``).
BLOCK_ROUND = 512

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": KiB,
    "kib": KiB,
    "mi": MiB,
    "mib": MiB,
    "gi": GiB,
    "gib": GiB,
    "ti": TiB,
    "tib": TiB,
}

# The number as today's forms write it ("4", ".5", "1.5", "1e9"), with a minus
# sign so that a negative size is named as such.  Each part is unambiguous, so a
# failed match costs one pass, however long the text.
_SIZE_RE = re.compile(r"^\s*(-?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
# "inf" and "nan" with or without a unit: float() would take them.
_NOT_FINITE_RE = re.compile(r"^\s*[+-]?(?:inf(?:inity)?|nan)\s*(?:[kmgt]i?b?|b)?\s*$", re.I)

#: The largest size accepted, in bytes: 16 EiB, past any device's memory.
MAX_SIZE = 2**64

_SIZE_HINT = "use a number of bytes above zero, such as 4096, or one with a unit, such as 512MB or 4GiB"
_LIMIT_HINT = "use a size such as 4GiB or 512MB, or a card name such as T4"
# How much of a rejected text an error message quotes.
_SHOWN = 60


def parse_size(text: str | int | float) -> int:
    """Parse a byte size such as ``"4GiB"``, ``"512 MB"``, ``"1.5g"`` or ``4096``.

    Decimal units (kB, MB, GB, TB) are powers of 1000 and binary units (KiB,
    MiB, GiB, TiB) powers of 1024, as in the allocator's own messages.  A bare
    ``G``/``M``/``K`` is read as the decimal unit.  A size is a whole number of
    bytes, at least one and at most :data:`MAX_SIZE`; a fraction of a byte is
    dropped.

    Raises
    ------
    ValueError
        With a one-line message saying what is wrong and what is accepted,
        when ``text`` is not a size: not a number, not finite (``inf``,
        ``nan``), negative, zero, or larger than :data:`MAX_SIZE`.
    """
    return _parse_size(text, _SIZE_HINT)


def _parse_size(text: object, hint: str) -> int:
    """:func:`parse_size`, with ``hint`` to say what is accepted instead."""
    shown = safe_repr(text, _SHOWN)
    if isinstance(text, bool):
        raise ValueError(f"not a size: {shown} ({hint})")
    if isinstance(text, int):
        return _whole_bytes(text, text, shown, hint)
    if isinstance(text, float):
        if not math.isfinite(text):
            raise ValueError(f"not a finite size: {shown} ({hint})")
        return _whole_bytes(text, int(text), shown, hint)
    try:
        # str(), as before: a numpy integer reads as its digits.
        raw = str(text)
    except Exception:
        raise ValueError(f"not a size: {shown} ({hint})") from None
    if _NOT_FINITE_RE.match(raw):
        raise ValueError(f"not a finite size: {shown} ({hint})")
    match = _SIZE_RE.match(raw)
    if not match:
        raise ValueError(f"not a size: {shown} ({hint})")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown unit {safe_repr(unit, _SHOWN)} in {shown} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
        )
    # float() overflows to inf rather than raising, so this is never an error.
    value = float(number) * factor
    digits = number.lstrip("-").lstrip("0") or "0"
    if digits.isdigit() and abs(value) <= MAX_SIZE:
        # Exact, where float() would round sizes past 2**53; a negative one
        # is refused on its value below.
        nbytes = int(digits) * factor
    elif math.isfinite(value):
        nbytes = int(value)
    else:
        nbytes = MAX_SIZE + 1 if value > 0 else -1
    return _whole_bytes(value, nbytes, shown, hint)


def _whole_bytes(value: float, nbytes: int, shown: str, hint: str) -> int:
    """``nbytes``, the size ``value`` as whole bytes, once known to be sane."""
    if value < 0:
        raise ValueError(f"a size cannot be negative: {shown} ({hint})")
    if value == 0:
        raise ValueError(f"a size must be larger than zero: {shown} ({hint})")
    if nbytes > MAX_SIZE:
        raise ValueError(f"too large: {shown} is more than 2**64 bytes ({hint})")
    if nbytes == 0:
        raise ValueError(f"less than one byte: {shown} ({hint})")
    return nbytes


def round_allocation(nbytes: int) -> int:
    """Bytes the CUDA caching allocator counts as allocated for a request.

    Requests round up to a multiple of 512 bytes; an empty storage takes none.
    """
    if nbytes <= 0:
        return 0
    return -(-nbytes // BLOCK_ROUND) * BLOCK_ROUND


def format_bytes(nbytes: float, signed: bool = False) -> str:
    """Human-readable binary size: ``4096 -> '4.00 KiB'``, ``-3 MiB -> '-3.00 MiB'``."""
    sign = ""
    if nbytes < 0:
        sign = "-"
    elif signed and nbytes > 0:
        sign = "+"
    value = abs(float(nbytes))
    if value < KiB:
        return f"{sign}{int(value)} B"
    for unit, factor in (("KiB", KiB), ("MiB", MiB), ("GiB", GiB)):
        if value < factor * 1024:
            return f"{sign}{value / factor:.2f} {unit}"
    return f"{sign}{value / TiB:.2f} TiB"


def format_size_like_torch(nbytes: int) -> str:
    """Format exactly as ``c10::CachingAllocator::format_size`` does in OOM messages."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    if nbytes <= 1048576:
        return f"{nbytes / 1024:.2f} KiB"
    if nbytes <= 1073741824:
        return f"{nbytes / 1048576:.2f} MiB"
    return f"{nbytes / 1073741824:.2f} GiB"


@dataclass(frozen=True)
class Card:
    """A GPU model the simulated device can stand in for.

    ``capacity_bytes`` is the total that ``torch.cuda.mem_get_info`` reports on
    that card (what its OOM messages call "total capacity"), which is less
    than the marketing figure: the driver keeps some memory back.
    """

    name: str
    capacity_bytes: int
    bf16: bool
    description: str
    #: Hopper and newer (compute capability 9.0+): cuBLAS's larger default workspace.
    hopper: bool = False

    @property
    def context_bytes(self) -> int:
        """What a PyTorch process holds on this card outside PyTorch's allocator: the CUDA context.

        About 300 MB since CUDA 11.7 loads kernels lazily (ptrblck in
        pytorch/pytorch#107667, 2023; 300-700 MB before, #28113, #20532).  It
        varies with the driver and with the kernels a process has used; this
        is one figure for every card until each is measured (``--context``
        sets another).
        """
        return CUDA_CONTEXT_BYTES

    @property
    def cublas_workspace_bytes(self) -> int:
        """The workspace cuBLAS takes from PyTorch's allocator at the first matrix product.

        PyTorch's default ``CUBLAS_WORKSPACE_CONFIG`` is ``:4096:2:16:8`` (two
        4 MiB and eight 16 KiB buffers: 8,519,680 B), and ``:4096:8`` (32 MiB)
        on compute capability 9.0 and newer (``getChosenWorkspaceSize`` in
        ``aten/src/ATen/cuda/CublasHandlePool.cpp``).  32 MiB was measured on an
        H100 as ``memory_allocated()`` after the first ``mm``.
        """
        return 4096 * 1024 * 8 if self.hopper else 4096 * 1024 * 2 + 16 * 1024 * 8


#: The CUDA context of a PyTorch process (see :attr:`Card.context_bytes`).
CUDA_CONTEXT_BYTES = 300 * MiB


def _gib(value: float) -> int:
    # Published OOM messages give two decimals of GiB; keep whole MiB.
    return round(value * 1024) * MiB


CARDS: dict[str, Card] = {
    card.name.upper(): card
    for card in (
        Card("T4", _gib(14.75), False, "NVIDIA Tesla T4 16 GB (Colab, Kaggle)"),
        Card("V100-16GB", _gib(15.77), False, "NVIDIA V100 16 GB"),
        Card("V100-32GB", _gib(31.74), False, "NVIDIA V100 32 GB"),
        Card("A10G", _gib(22.19), True, "NVIDIA A10G 24 GB (AWS g5)"),
        Card("L4", _gib(22.05), True, "NVIDIA L4 24 GB"),
        Card("RTX3090", _gib(23.69), True, "NVIDIA GeForce RTX 3090 24 GB"),
        Card("RTX4090", _gib(23.64), True, "NVIDIA GeForce RTX 4090 24 GB"),
        Card("A6000", _gib(47.53), True, "NVIDIA RTX A6000 48 GB"),
        Card("A100-40GB", _gib(39.39), True, "NVIDIA A100 40 GB"),
        Card("A100-80GB", _gib(79.15), True, "NVIDIA A100 80 GB"),
        Card("H100", _gib(79.18), True, "NVIDIA H100 80 GB", hopper=True),
        Card("H200", _gib(139.81), True, "NVIDIA H200 141 GB", hopper=True),
    )
}


def lookup_card(name: str) -> Card | None:
    """The named card, case-insensitive (``"a100-80gb"`` finds ``A100-80GB``)."""
    return CARDS.get(name.strip().upper())


def parse_limit(text: str | int) -> tuple[int, Card | None]:
    """Parse ``--limit``: a size (``4GiB``) or a card name (``T4``).

    Returns the capacity in bytes and the card, if one was named.

    Raises
    ------
    ValueError
        With a one-line message, for an unknown card or a text that
        :func:`parse_size` rejects.
    """
    if isinstance(text, str):
        card = lookup_card(text)
        if card is not None:
            return card.capacity_bytes, card
        if text.strip() and text.strip()[0].isalpha() and not _NOT_FINITE_RE.match(text):
            known = ", ".join(c.name for c in CARDS.values())
            raise ValueError(f"unknown card {safe_repr(text, _SHOWN)}; known cards: {known}")
    return _parse_size(text, _LIMIT_HINT), None
