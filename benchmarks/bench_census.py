"""oomnb's census against a gc.get_objects() scan, on the same namespace, in one run.

The namespace: 10,000 small tensors (5,000 variables and 5,000 in nested
containers), a 100-layer MLP with an AdamW optimizer that has state, and
nested dicts and lists.

Baselines, each building the same facts per storage (shape, dtype, device,
bytes, deduplicated by storage):

* ``gc scan (reporters)``: the loop existing reporters and the widely copied
  forum snippet use: every object the collector tracks, kept if
  ``torch.is_tensor(obj) or (hasattr(obj, "data") and torch.is_tensor(obj.data))``.
* ``gc scan (isinstance only)``: the cheapest possible gc scan, for honesty.

Targets: census <= 50 ms and >= 10x faster than the gc scan, the same storages
found.  Median of alternating rounds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from oomnb.analysis.census import take_census
from oomnb.model.units import round_allocation


def build_namespace() -> dict[str, Any]:
    torch.manual_seed(0)
    ns: dict[str, Any] = {}
    for i in range(5000):
        ns[f"t{i}"] = torch.randn(8)
    ns["nested"] = {
        "runs": [{"step": i, "metrics": {"loss": torch.tensor(float(i)), "acc": torch.rand(4)}} for i in range(2000)],
        "buffers": [[torch.zeros(16) for _ in range(10)] for _ in range(100)],
    }
    layers: list[nn.Module] = []
    for _ in range(50):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*layers)  # 100 layers
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    ns["model"], ns["opt"] = model, opt
    return ns


def _record(found: dict[int, tuple[Any, ...]], t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    found.setdefault(
        storage.data_ptr(), (tuple(t.shape), str(t.dtype), str(t.device), round_allocation(storage.nbytes()))
    )


def gc_scan_reporters() -> dict[int, tuple[Any, ...]]:
    found: dict[int, tuple[Any, ...]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if torch.is_tensor(obj):
                    _record(found, obj)
                elif hasattr(obj, "data") and torch.is_tensor(obj.data):
                    _record(found, obj.data)
            except Exception:
                continue
    return found


def gc_scan_isinstance() -> dict[int, tuple[Any, ...]]:
    found: dict[int, tuple[Any, ...]] = {}
    tensor = torch.Tensor
    for obj in gc.get_objects():
        if issubclass(type(obj), tensor):
            _record(found, obj)
    return found


def timed(fn: Callable[[], Any], times: list[float]) -> Any:
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ns = build_namespace()
    take_census(ns)  # first sight creates each storage's Python object: not what is measured
    census_t: list[float] = []
    reporters_t: list[float] = []
    plain_t: list[float] = []
    for _ in range(args.rounds):  # alternating, keeping only the last results
        census = timed(lambda: take_census(ns, device="cpu"), census_t)
        reporters = timed(gc_scan_reporters, reporters_t)
        plain = timed(gc_scan_isinstance, plain_t)
    c, g, i = (statistics.median(t) * 1e3 for t in (census_t, reporters_t, plain_t))
    census_ptrs = {r.data_ptr for r in census.records}
    gc_ptrs = set(reporters)
    print(f"namespace: {len(ns)} names; process: {len(gc.get_objects())} gc-tracked objects")
    print(f"   {'method':28} {'ms':>8} {'storages':>9} {'census speed-up':>16}")
    print(f"   {'oomnb census':28} {c:8.2f} {len(census.records):9d} {'':>16}   target <= 50 ms")
    print(f"   {'gc scan (reporters)':28} {g:8.2f} {len(reporters):9d} {g / c:15.1f}x   target >= 10x")
    print(f"   {'gc scan (isinstance only)':28} {i:8.2f} {len(plain):9d} {i / c:15.1f}x")
    print(
        f"   same storages: census and gc scan agree: {census_ptrs == gc_ptrs} "
        f"(census only: {len(census_ptrs - gc_ptrs)}, gc scan only: {len(gc_ptrs - census_ptrs)})"
    )


if __name__ == "__main__":
    main()
