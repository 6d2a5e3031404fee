"""Show a user's values without trusting them.

A report names the variables in a notebook and what they hold, and it is
written while an error is being handled: a ``__repr__`` that raises, never
ends or returns sixteen megabytes must not take the report down with it.
Pure functions over plain data, standard library only.
"""

from __future__ import annotations

import math
from typing import cast

__all__ = ["safe_repr", "safe_value"]

ELLIPSIS = "…"

# Decimal digits per bit are log10(2) < 0.31, so an int of more than this many
# bits per allowed character cannot be written in that many characters.
_BITS_PER_CHAR = 4


def _type_name(value: object) -> str:
    """The name of ``value``'s type, or ``"object"`` when even that fails."""
    # type() cannot be fooled; isinstance() and .__class__ can, and can raise.
    try:
        name = type(value).__name__
    except Exception:
        return "object"
    return name if type(name) is str else "object"


def _clip(text: str, limit: int, note: str = "") -> str:
    """``text`` cut to ``limit`` characters, ending in ``…`` and ``note`` if cut."""
    if limit <= 0:
        return ""
    if len(text) <= limit:
        return text
    tail = ELLIPSIS + note
    if len(tail) >= limit:
        tail = ELLIPSIS
    return text[: limit - len(tail)] + tail


def _full_repr(value: object, limit: int) -> str:
    """``repr(value)``, or enough of its start to fill ``limit`` characters."""
    if type(value) in (str, bytes, bytearray):
        sized = cast("str | bytes | bytearray", value)
        if len(sized) > limit:
            # The repr of the start is the start of the repr, bar the choice
            # of quotes, and costs nothing however long the whole is.
            return repr(sized[:limit])
    text = repr(value)
    # A __repr__ may return a str subclass whose slicing is its own.
    return str.__str__(text)


def safe_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` in at most ``limit`` characters, whatever ``value`` is.

    Never raises (bar ``KeyboardInterrupt`` and ``SystemExit``, which pass).

    Parameters
    ----------
    value
        Anything, including objects whose ``__repr__`` raises, recurses
        without end or returns a huge string.
    limit
        The most characters to return; none when it is zero or less.

    Returns
    -------
    str
        The repr itself when it fits.  One too long is cut and ends in
        ``… <TypeName>``; a repr that fails gives
        ``<repr of TypeName failed: ErrorName>``, itself cut to fit.

    Examples
    --------
    >>> safe_repr([1, 2, 3])
    '[1, 2, 3]'
    >>> safe_repr("x" * 100, limit=12)
    "'xxxx… <str>"
    """
    if limit <= 0:
        return ""
    name = _type_name(value)
    try:
        text = _full_repr(value, limit)
    except Exception as exc:
        return _clip(f"<repr of {name} failed: {_type_name(exc)}>", limit)
    return _clip(text, limit, f" <{name}>")


def safe_value(value: object, limit: int = 200) -> bool | int | float | str | None:
    """``value`` as it can be stored in a JSON report.

    ``None``, a bool, an int whose digits fit in ``limit`` characters, a
    finite float and a str of at most ``limit`` characters come back as they
    are (subclasses, such as an ``IntEnum``, as the plain type).  A longer str
    is cut to ``limit`` characters ending in ``…``.  Anything else, ``nan``
    and infinities included, comes back as :func:`safe_repr` gives it.
    Never raises (bar ``KeyboardInterrupt`` and ``SystemExit``).

    Parameters
    ----------
    value
        Anything.
    limit
        The most characters a str, or the digits of an int, may take.

    Returns
    -------
    bool, int, float, str or None
        Something ``json.dumps`` takes and writes in bounded space.

    Examples
    --------
    >>> safe_value(3), safe_value("short"), safe_value(float("inf"))
    (3, 'short', 'inf')
    >>> safe_value("x" * 100, limit=5)
    'xxxx…'
    """
    cls = type(value)
    if value is None or cls is bool:
        return cast("bool | None", value)
    if issubclass(cls, int):
        # int's own methods: a subclass's could raise, and JSON ignores them.
        number = int.__int__(cast(int, value))
        if number.bit_length() <= _BITS_PER_CHAR * max(limit, 0):
            try:
                digits = len(int.__repr__(number))
            except ValueError:  # past sys.get_int_max_str_digits()
                digits = limit + 1
            if digits <= limit:
                # json.dumps would raise past the digit limit, so none pass.
                return number
        return safe_repr(value, limit)
    if issubclass(cls, float):
        real = float.__float__(cast(float, value))
        # JSON has no nan or infinity: json.dumps would write invalid JSON.
        return real if math.isfinite(real) else safe_repr(value, limit)
    if issubclass(cls, str):
        return _clip(str.__str__(cast(str, value)), limit)
    return safe_repr(value, limit)
