"""The simulated device counts bytes exactly as the CUDA caching allocator would."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest
import torch

from oomnb.allocator.oom import parse_oom_message
from oomnb.backends.simulated import SimulatedDevice

MiB = 1024**2


def test_float32_1024_is_4096_bytes(sim: Any) -> None:
    before = sim.allocated
    t = torch.randn(1024)
    assert sim.allocated - before == 4096
    del t
    assert sim.allocated == before


def test_small_tensors_round_to_512(sim: Any) -> None:
    before = sim.allocated
    t = torch.zeros(10)  # 40 bytes
    u = torch.zeros(129, dtype=torch.float32)  # 516 bytes
    assert sim.allocated - before == 512 + 1024
    del t, u
    assert sim.allocated == before


def test_empty_tensor_takes_nothing(sim: Any) -> None:
    before = sim.allocated
    t = torch.empty(0)
    assert sim.allocated == before
    del t


def test_views_count_once(sim: Any) -> None:
    before = sim.allocated
    t = torch.randn(1024)
    views = [t[:10], t.view(32, 32), t.detach()]
    assert sim.allocated - before == 4096
    del t
    assert sim.allocated - before == 4096  # the views keep the storage alive
    del views
    assert sim.allocated == before


def test_peak_and_reset(sim: Any) -> None:
    sim.reset_peak()
    base = sim.allocated
    a = torch.ones(256 * 1024)  # 1 MiB
    b = torch.ones(256 * 1024)
    del a, b
    assert sim.peak - base == 2 * MiB
    assert sim.allocated == base
    sim.reset_peak()
    assert sim.peak == base


def test_in_place_resize_is_counted(sim: Any) -> None:
    before = sim.allocated
    t = torch.empty(16)
    t.resize_(1024)
    torch.add(t, 1)  # any op on it sees the new size
    assert sim.allocated - before == 4096
    del t
    assert sim.allocated == before


def test_autograd_and_backward_are_counted(sim: Any) -> None:
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256)
    sim.reset_peak()
    base = sim.allocated
    loss = lin(x).relu().sum()
    loss.backward()
    assert lin.weight.grad is not None
    # the gradients (256*256 + 256 floats) outlive the step
    assert sim.allocated - base >= 256 * 256 * 4 + 1024
    assert sim.peak > sim.allocated
    del loss


def test_numpy_tensors_count_once_used(sim: Any) -> None:
    before = sim.allocated
    t = torch.from_numpy(np.ones(1024, dtype=np.float32))
    u = t + 1
    assert sim.allocated - before == 2 * 4096
    del t, u


def test_tensors_made_before_start_are_counted() -> None:
    device = SimulatedDevice()
    existing = torch.ones(1024)
    device.start()
    try:
        assert device.allocated >= 4096
        before = device.allocated
        del existing
        gc.collect()
        assert device.allocated == before - 4096
    finally:
        device.stop()


def test_untracked_tensors_are_not_counted(sim: Any) -> None:
    before = sim.allocated
    with sim.untracked():
        data = torch.randn(1024)
    assert sim.allocated == before
    y = data * 2  # a result computed from host data is device memory again
    assert sim.allocated - before == 4096
    del data, y


def test_real_oom_with_cuda_shaped_message(sim: Any) -> None:
    sim.capacity = sim.allocated + 1 * MiB
    keep = torch.empty(256 * 1024 - 128)  # 1 MiB less 512 bytes: nearly full
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(1024 * 1024)
    message = str(info.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 4.00 MiB. GPU 0 has a total capacity of ")
    assert "Simulated by oomnb" in message
    facts = parse_oom_message(message)
    assert facts.kind == "simulated"
    assert facts.requested_bytes == 4 * MiB
    assert sim.last_oom == (4 * MiB, sim.allocated, sim.capacity)
    assert sim.capacity - sim.allocated == 512
    del keep


def test_factory_request_is_refused_before_host_allocation(sim: Any) -> None:
    sim.capacity = 64 * MiB
    # 4 TiB would fail on any host; the simulated device refuses it first.
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 4096\.00 GiB"):
        torch.empty(1024**4, dtype=torch.float32)


def test_op_output_over_capacity_is_dropped(sim: Any) -> None:
    sim.capacity = sim.allocated + 6 * MiB
    a = torch.ones(1024 * 1024)  # 4 MiB
    before = sim.allocated
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 4\.00 MiB"):
        a * 2  # the product would need 4 MiB more
    gc.collect()
    assert sim.allocated == before
    del a


def test_state_is_released_on_stop() -> None:
    device = SimulatedDevice()
    device.start()
    t = torch.ones(1024)
    ref = weakref.ref(t.untyped_storage())
    device.stop()
    assert device.live_storages() == 0 and device.allocated == 0
    del t
    assert ref() is None
