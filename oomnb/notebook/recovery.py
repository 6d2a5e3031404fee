"""Give back the memory a failed cell held.

An exception's traceback keeps every frame it passed through alive, and with
them every local tensor (activations inside ``forward``, the batch, the
half-built output).  IPython keeps the last one in ``sys.last_traceback``.
Recovery clears those frames, drops the references, collects garbage and
returns the allocator's cache.
"""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Callable
from types import TracebackType

__all__ = ["clear_last_traceback", "release_exception"]

_LAST = ("last_type", "last_value", "last_traceback", "last_exc")


def _clear_tb(tb: TracebackType | None) -> None:
    if tb is None:
        return
    # Frames still executing (the caller's own) refuse to clear; the rest
    # drop their locals.
    traceback.clear_frames(tb)
    # On Python 3.11 and 3.12 a traceback printer that read frame.f_locals
    # (IPython's does) left a dict snapshot on the frame, which clear() does
    # not touch; reading f_locals again re-syncs it with the now empty frame.
    # Python 3.13 keeps no snapshot (PEP 667).
    if sys.version_info < (3, 13):
        while tb is not None:
            frame = tb.tb_frame
            if frame.f_locals is not frame.f_globals:
                _ = frame.f_locals
            tb = tb.tb_next


def release_exception(exc: BaseException | None) -> None:
    """Clear the frames of ``exc``'s traceback and of every chained exception."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        _clear_tb(exc.__traceback__)
        exc.__traceback__ = None
        chained = exc.__cause__ or exc.__context__
        exc = chained


def raised_in_backward(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while autograd ran a backward pass."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("_engine_run_backward", "backward") and "autograd" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def clear_last_traceback() -> bool:
    """Drop ``sys.last_*`` (what IPython keeps of the last error).  True if any was set."""
    held = False
    value = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
    if value is not None:
        release_exception(value)
    tb = getattr(sys, "last_traceback", None)
    if tb is not None:
        _clear_tb(tb)
    for name in _LAST:
        if hasattr(sys, name):
            held = True
            delattr(sys, name)
    return held


def collect(done: Callable[[], bool] | None = None) -> None:
    """Collect garbage: the young generations first, everything if still needed.

    A full collection costs a fifth of a second once torch is imported, and
    what a failed cell leaves in cycles is young; ``done`` says whether the
    cheap pass was enough.
    """
    gc.collect(1)
    if done is not None and done():
        return
    for _ in range(3):
        if not gc.collect():
            break
