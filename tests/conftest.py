"""Shared fixtures: a real IPython shell with oomnb loaded on the simulated device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import oomnb
from oomnb.backends.simulated import device as simulated_device
from oomnb.notebook import history as session


def cuda_present() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if cuda_present():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def sim() -> Iterator[Any]:
    """The simulated device, started and left as it was found."""
    simulated_device.start()
    capacity, card, caching = simulated_device.capacity, simulated_device.card, simulated_device.caching
    try:
        yield simulated_device
    finally:
        simulated_device.capacity, simulated_device.card = capacity, card
        simulated_device.caching = caching
        simulated_device.stop()


@pytest.fixture
def exact_allocator() -> Iterator[None]:
    """Allocations counted exactly (reserved equals allocated), for tests whose capacities
    are a few MiB over what is allocated: there a 20 MiB segment would be the whole card."""
    before = simulated_device.caching
    simulated_device.caching = False
    try:
        yield
    finally:
        simulated_device.caching = before


class Shell:
    """A real InteractiveShell with helpers that return what a cell showed."""

    def __init__(self, ip: InteractiveShell) -> None:
        self.ip = ip

    @property
    def ns(self) -> dict[str, Any]:
        return self.ip.user_ns

    def run(self, code: str) -> Any:
        """Run a cell (stored in history, so it gets an execution count)."""
        with capture_output() as captured:
            result = self.ip.run_cell(code, store_history=True)
        result.captured = captured
        return result

    def allocated(self) -> int:
        return int(oomnb.status()["allocated_bytes"])

    def reserved(self) -> int:
        """What the allocator holds: a capacity is compared with this, not with allocated."""
        return int(oomnb.status()["reserved_bytes"])


@pytest.fixture
def shell() -> Iterator[Shell]:
    """oomnb loaded into a fresh-namespace InteractiveShell (simulated device)."""
    ip = InteractiveShell.instance()
    ip.reset(new_session=False)
    ip.run_line_magic("colors", "nocolor")
    ip.run_line_magic("load_ext", "oomnb")
    ip.run_cell("import torch", store_history=False)
    session.clear_history()
    # Each test starts without the segments earlier tests left cached.
    import gc

    gc.collect()
    simulated_device.empty_cache()
    try:
        yield Shell(ip)
    finally:
        ip.run_line_magic("unload_ext", "oomnb")
        ip.reset(new_session=False)
        # A test that switched the allocator model leaves the default behind.
        from oomnb.allocator.tracker import _caching_from_environment

        simulated_device.caching = _caching_from_environment()
        # The singleton keeps the last error (its result, and the traceback
        # for %debug) and through it the frames of a failed cell: tensors a
        # later test would find on the device.  Clear them as the panel does.
        from oomnb.notebook.recovery import clear_last_traceback

        clear_last_traceback()
        ip.last_execution_result = None
        if getattr(ip.InteractiveTB, "tb", None) is not None:
            ip.InteractiveTB.tb = None
