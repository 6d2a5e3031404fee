"""Reports kept for this kernel: the last one and a bounded history.

Plain data only; no IPython here.
"""

from __future__ import annotations

from collections import deque

from ..model.report import Report

__all__ = ["clear_history", "history", "last_report", "record"]

_HISTORY: deque[Report] = deque(maxlen=1000)


def record(report: Report) -> None:
    _HISTORY.append(report)


def last_report() -> Report | None:
    """The most recent report, or None when no cell has been measured."""
    return _HISTORY[-1] if _HISTORY else None


def history() -> list[Report]:
    """Every report kept so far, oldest first (at most 1000)."""
    return list(_HISTORY)


def clear_history() -> None:
    _HISTORY.clear()
