"""Models split over several GPUs with a ``device_map``: per-device bytes and a balanced map.

Plain data; the module is only read (its parameter and buffer sizes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..model.units import round_allocation

__all__ = ["balance", "bytes_per_device", "module_bytes"]


def module_bytes(model: torch.nn.Module, name: str) -> int:
    """Bytes of the parameters and buffers under ``name`` ("" is the whole model)."""
    sub = model.get_submodule(name) if name else model
    tensors = [*sub.parameters(), *sub.buffers()]
    return sum(round_allocation(t.untyped_storage().nbytes()) for t in {id(t): t for t in tensors}.values())


def bytes_per_device(model: torch.nn.Module, device_map: Mapping[str, object]) -> dict[str, int]:
    """What each device of ``device_map`` (module name -> device) holds."""
    totals: dict[str, int] = {}
    for name, device in device_map.items():
        totals[str(device)] = totals.get(str(device), 0) + module_bytes(model, name)
    return totals


def balance(model: torch.nn.Module, device_map: Mapping[str, object], capacities: Mapping[str, int]) -> dict[str, str]:
    """A ``device_map`` that keeps the module order and fills each device in
    proportion to its capacity (what ``accelerate``'s ``max_memory`` does)."""
    names = list(device_map)
    sizes = [module_bytes(model, n) for n in names]
    devices = [d for d in capacities if capacities[d] > 0]
    total, room = sum(sizes), sum(capacities[d] for d in devices)
    balanced: dict[str, str] = {}
    index, used = 0, 0
    for name, size in zip(names, sizes, strict=True):
        share = total * capacities[devices[index]] / room
        if used and used + size / 2 > share and index < len(devices) - 1:
            index, used = index + 1, 0
        balanced[name] = devices[index]
        used += size
    return balanced
