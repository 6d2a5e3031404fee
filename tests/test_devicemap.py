"""device_map: per-device figures and a balanced map (pure functions)."""

from __future__ import annotations

from torch import nn

from oomnb.analysis.advisor import _device_map_suggestions
from oomnb.analysis.devicemap import balance, bytes_per_device, module_bytes

MiB = 1024**2


def model() -> nn.Module:
    # eight blocks of 1024x1024 float32 weights (4 MiB + 4 KiB bias each)
    return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])


def test_bytes_per_device() -> None:
    m = model()
    block = 4 * MiB + 4096
    assert module_bytes(m, "0") == block
    overloaded = {str(i): ("cuda:0" if i < 6 else "cuda:1") for i in range(8)}
    assert bytes_per_device(m, overloaded) == {"cuda:0": 6 * block, "cuda:1": 2 * block}


def test_balance_keeps_order_and_evens_the_load() -> None:
    m = model()
    overloaded = {str(i): ("cuda:0" if i < 6 else "cuda:1") for i in range(8)}
    balanced = balance(m, overloaded, {"cuda:0": 16 * 2**30, "cuda:1": 16 * 2**30})
    assert list(balanced.values()) == ["cuda:0"] * 4 + ["cuda:1"] * 4
    uneven = balance(m, overloaded, {"cuda:0": 8 * 2**30, "cuda:1": 24 * 2**30})
    assert list(uneven.values()) == ["cuda:0"] * 2 + ["cuda:1"] * 6


def test_advisor_suggests_the_balanced_map() -> None:
    m = model()
    m.hf_device_map = {str(i): ("cuda:0" if i < 6 else "cuda:1") for i in range(8)}  # type: ignore[assignment]
    [suggestion] = _device_map_suggestions("model", m, 16 * 2**30)
    assert suggestion.kind == "device_map"
    assert suggestion.params["device_map"] == {str(i): ("cuda:0" if i < 4 else "cuda:1") for i in range(8)}
    assert suggestion.saves_bytes == 2 * (4 * MiB + 4096)
    balanced = {str(i): ("cuda:0" if i < 4 else "cuda:1") for i in range(8)}
    m.hf_device_map = balanced  # type: ignore[assignment]
    assert _device_map_suggestions("model", m, 16 * 2**30) == []
