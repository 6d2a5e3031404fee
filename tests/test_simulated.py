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
from oomnb.model.units import format_size_like_torch

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
    gc.collect()  # garbage of earlier tests must not die inside the measurement
    existing = torch.ones(1024)
    device.start()
    try:
        assert device.allocated >= 4096
        gc.collect()
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
    sim.caching = True
    sim.capacity = sim.reserved + 2 * MiB  # room for one more small-pool segment (2 MiB)
    keep = torch.empty(256 * 1024 - 128)  # 1 MiB less 512 bytes: the small pool, a new 2 MiB segment
    assert sim.reserved == sim.capacity
    with pytest.raises(torch.OutOfMemoryError) as info:
        torch.empty(1024 * 1024)  # 4 MiB: the large pool, a 20 MiB segment that cannot be had
    message = str(info.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 4.00 MiB. GPU 0 has a total capacity of ")
    assert "Including non-PyTorch memory, this process has" in message and "Simulated by oomnb" in message
    facts = parse_oom_message(message)
    assert facts.kind == "simulated"
    assert facts.requested_bytes == 4 * MiB
    assert sim.last_oom[0] == 4 * MiB and sim.last_oom[2] == sim.capacity
    _request, allocated, _capacity, reserved = sim.last_oom
    unallocated = format_size_like_torch(reserved - allocated)
    assert f"and {unallocated} is reserved by PyTorch but unallocated" in message
    del keep


def test_factory_request_is_refused_before_host_allocation(sim: Any) -> None:
    sim.capacity = 64 * MiB
    # 4 TiB would fail on any host; the simulated device refuses it first.
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 4096\.00 GiB"):
        torch.empty(1024**4, dtype=torch.float32)


def test_op_output_over_capacity_is_dropped(sim: Any) -> None:
    sim.caching = True
    sim.capacity = sim.reserved + 20 * MiB
    a = torch.ones(3 * 1024 * 1024)  # 12 MiB: its own 12 MiB segment
    gc.collect()
    before = sim.allocated
    with pytest.raises(torch.OutOfMemoryError, match=r"Tried to allocate 12\.00 MiB"):
        a * 2  # the product needs another 12 MiB segment: 24 MiB > 20
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


@pytest.mark.parametrize("conf", ["", "expandable_segments:True"])
def test_fragmentation_oom_on_the_cpu_and_the_fix(sim: Any, conf: str) -> None:
    """Real tensors through the caching allocator model: ten [7][6][7] MiB segments with the 7s freed
    leave 140 MiB reserved but unallocated, and a 10 MiB tensor fails; expandable segments fit it."""
    sim.caching = True
    sim.set_alloc_conf(conf)
    try:
        gc.collect()
        sim.empty_cache()
        sim.capacity = sim.reserved + 200 * MiB
        floats = (7 * MiB // 4, 6 * MiB // 4, 7 * MiB // 4)
        triples = [tuple(torch.empty(n) for n in floats) for _ in range(10)]
        middles = [middle for _first, middle, _last in triples]
        del triples
        gc.collect()
        if conf:
            fits = torch.empty(10 * MiB // 4)
            assert fits.numel() == 2621440 and sim.reserved == sim.capacity
            return
        with pytest.raises(torch.OutOfMemoryError) as info:
            torch.empty(10 * MiB // 4)
        message = str(info.value)
        assert "Tried to allocate 10.00 MiB" in message
        assert "and 140.00 MiB is reserved by PyTorch but unallocated" in message
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in message
        assert len(middles) == 10
    finally:
        sim.set_alloc_conf("")


def test_a_named_card_holds_its_context_and_takes_cublas_workspace_at_the_first_matmul(sim: Any) -> None:
    from oomnb.backends.simulated import SimulatedBackend
    from oomnb.model.units import CUDA_CONTEXT_BYTES, lookup_card

    backend = SimulatedBackend(sim)
    t4 = lookup_card("T4")
    assert t4 is not None and t4.cublas_workspace_bytes == 8_519_680
    h100 = lookup_card("H100")
    assert h100 is not None and h100.cublas_workspace_bytes == 32 * MiB
    before = backend.current_limit()
    try:
        backend.limit(t4.capacity_bytes, t4)
        assert sim.context == CUDA_CONTEXT_BYTES == 300 * MiB
        assert sim.alloc.capacity == t4.capacity_bytes - 300 * MiB
        assert backend.snapshot().free_bytes == t4.capacity_bytes - 300 * MiB - sim.reserved
        start = sim.allocated
        a = torch.ones(4, 4)
        assert sim.allocated - start == 512  # a factory: no workspace yet
        b = a @ a
        # 512 B for b, and cuBLAS's workspace (8,519,680 B is a multiple of 512), kept for good.
        assert sim.allocated - start == 512 + 512 + 8_519_680
        c = a @ a
        assert sim.allocated - start == 512 + 512 + 512 + 8_519_680
        del a, b, c
        assert sim.allocated - start == 8_519_680
        # --context 0: a raw capacity.
        backend.limit(t4.capacity_bytes, t4, 0)
        assert sim.context == 0 and sim.alloc.capacity == t4.capacity_bytes
    finally:
        backend.limit(*before)


def test_a_dry_run_goes_on_from_the_devices_allocator(sim: Any) -> None:
    """With the cache modelled, a dry run meets the notebook's fragmentation: reserved as the card would."""
    from oomnb.analysis.estimator import dry_run

    sim.caching = True
    gc.collect()
    sim.empty_cache()
    base = sim.reserved
    floats = (7 * MiB // 4, 6 * MiB // 4, 7 * MiB // 4)
    triples = [tuple(torch.empty(n) for n in floats) for _ in range(10)]
    middles = [middle for _first, middle, _last in triples]
    del triples
    gc.collect()
    assert sim.reserved - base == 200 * MiB

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.empty(10 * MiB // 4) + x.sum()

    run = dry_run(step, middles[0])
    assert run.whole_device and run.by_reserved
    assert run.start_reserved_bytes == sim.reserved
    # No free block of 10 MiB: the empty tensor and the sum each take a new 10 MiB segment, and
    # x.sum()'s 512 B a 2 MiB small-pool segment; the device itself is untouched.
    assert run.peak_bytes - run.start_bytes == 2 * 10 * MiB + 512
    assert run.peak_reserved_bytes == sim.reserved + 2 * 10 * MiB + 2 * MiB
    assert run.footprint(sim.allocated) == run.peak_reserved_bytes
    assert sim.reserved - base == 200 * MiB and len(middles) == 10
