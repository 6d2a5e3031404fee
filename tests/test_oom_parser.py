"""The OOM message parser over real messages from several PyTorch versions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oomnb.allocator.oom import is_oom_error, parse_oom_message

MiB = 1024**2
GiB = 1024**3

# PyTorch 1.4 and earlier: "cached".
V1_4 = (
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 11.17 GiB total capacity; 10.73 GiB already "
    "allocated; 6.81 MiB free; 49.57 MiB cached)"
)
# PyTorch 1.5 - 1.13: "reserved in total by PyTorch", with the max_split_size_mb hint.
V1_13 = (
    "CUDA out of memory. Tried to allocate 36.00 MiB (GPU 0; 7.93 GiB total capacity; 130.35 MiB already "
    "allocated; 47.06 MiB free; 188.00 MiB reserved in total by PyTorch) If reserved memory is >> allocated "
    "memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory Management "
    "and PYTORCH_CUDA_ALLOC_CONF"
)
# PyTorch 2.1: the new sentence shape, with the "capacty" typo.
V2_1 = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacty of 79.15 GiB of which "
    "1.21 GiB is free. Including non-PyTorch memory, this process has 77.94 GiB memory in use. Of the "
    "allocated memory 70.11 GiB is allocated by PyTorch, and 5.94 GiB is reserved by PyTorch but unallocated. "
    "If reserved but unallocated memory is large try setting max_split_size_mb to avoid fragmentation.  See "
    "documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF"
)
# PyTorch 2.2+: another process on the card, expandable_segments hint.
V2_4 = (
    "CUDA out of memory. Tried to allocate 256.00 MiB. GPU 0 has a total capacity of 47.53 GiB of which "
    "16.88 MiB is free. Process 3652628 has 47.51 GiB memory in use. Of the allocated memory 47.14 GiB is "
    "allocated by PyTorch, and 57.79 MiB is reserved by PyTorch but unallocated. If reserved but unallocated "
    "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  "
    "See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
# With set_per_process_memory_fraction: "X allowed;".
ALLOWED = (
    "CUDA out of memory. Tried to allocate 1.00 GiB. GPU 1 has a total capacity of 79.10 GiB of which "
    "70.03 GiB is free. Including non-PyTorch memory, this process has 9.06 GiB memory in use. 8.00 GiB "
    "allowed; Of the allocated memory 8.00 GiB is allocated by PyTorch, and 1.20 MiB is reserved by PyTorch "
    "but unallocated."
)
HIP = (
    "HIP out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity of 63.98 GiB of which 2.31 GiB "
    "is free. Of the allocated memory 58.20 GiB is allocated by PyTorch, and 2.90 GiB is reserved by PyTorch "
    "but unallocated."
)
XPU = (
    "XPU out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.11 GiB of which 1.00 GiB "
    "is free. Of the allocated memory 14.00 GiB is allocated by PyTorch, and 12.00 MiB is reserved by PyTorch "
    "but unallocated. Please use `empty_cache` to release all unoccupied cached memory."
)
MPS = (
    "MPS backend out of memory (MPS allocated: 17.77 GB, other allocations: 388.00 KB, max allowed: 18.13 GB). "
    "Tried to allocate 1024.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
    "limit for memory allocations (may cause system failure)."
)
CPU = (
    "[enforce fail at alloc_cpu.cpp:83] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 429496729600 bytes. Error code 12 (Cannot allocate memory)"
)
CPU_OLD = (
    "[enforce fail at CPUAllocator.cpp:64] . DefaultCPUAllocator: not enough memory: you tried to allocate "
    "400000000000 bytes."
)


def test_pytorch_1_4() -> None:
    f = parse_oom_message(V1_4)
    assert f.kind == "cuda"
    assert f.requested_bytes == 20 * MiB
    assert f.capacity_bytes == round(11.17 * GiB)
    assert f.allocated_bytes == round(10.73 * GiB)
    assert f.free_bytes == round(6.81 * MiB)
    assert f.reserved_bytes == round(49.57 * MiB)
    assert f.device_index == 0


def test_pytorch_1_13() -> None:
    f = parse_oom_message(V1_13)
    assert (f.requested_bytes, f.free_bytes) == (36 * MiB, round(47.06 * MiB))
    assert f.reserved_bytes == 188 * MiB
    assert f.reserved_unallocated_bytes == 188 * MiB - round(130.35 * MiB)
    assert f.shortfall_bytes == 0


def test_pytorch_2_1_typo() -> None:
    f = parse_oom_message(V2_1)
    assert f.capacity_bytes == round(79.15 * GiB)
    assert f.free_bytes == round(1.21 * GiB)
    assert f.process_bytes == round(77.94 * GiB)
    assert f.allocated_bytes == round(70.11 * GiB)
    assert f.reserved_unallocated_bytes == round(5.94 * GiB)
    assert f.reserved_bytes == round(70.11 * GiB) + round(5.94 * GiB)
    assert f.shortfall_bytes == 2 * GiB - round(1.21 * GiB)


def test_pytorch_2_4_other_process() -> None:
    f = parse_oom_message(V2_4)
    assert f.requested_bytes == 256 * MiB
    assert f.process_bytes == round(47.51 * GiB)
    assert f.reserved_unallocated_bytes == round(57.79 * MiB)


def test_memory_fraction() -> None:
    f = parse_oom_message(ALLOWED)
    assert f.allowed_bytes == 8 * GiB
    assert f.device_index == 1


@pytest.mark.parametrize(("message", "kind"), [(HIP, "hip"), (XPU, "xpu")])
def test_hip_and_xpu(message: str, kind: str) -> None:
    f = parse_oom_message(message)
    assert f.kind == kind
    assert f.requested_bytes is not None and f.capacity_bytes is not None and f.free_bytes is not None


def test_mps() -> None:
    f = parse_oom_message(MPS)
    assert f.kind == "mps"
    assert f.requested_bytes == 1024 * MiB
    assert f.allocated_bytes == round(17.77 * GiB)
    assert f.capacity_bytes == round(18.13 * GiB)
    assert f.other_bytes == 388 * 1024
    assert f.free_bytes == round(18.13 * GiB) - round(17.77 * GiB) - 388 * 1024


@pytest.mark.parametrize("message", [CPU, CPU_OLD])
def test_cpu(message: str) -> None:
    f = parse_oom_message(message)
    assert f.kind == "cpu"
    assert f.requested_bytes in (429496729600, 400000000000)


def test_is_oom_error() -> None:
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_oom_error(RuntimeError(CPU))
    assert is_oom_error(RuntimeError(MPS))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom_error(MemoryError())
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom_error(ValueError("out of memory"))
    assert not is_oom_error(KeyboardInterrupt())


def test_nothing_to_read() -> None:
    f = parse_oom_message("something else entirely")
    assert f.kind == "unknown" and f.requested_bytes is None and f.shortfall_bytes is None


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_never_raises_on_unprintable() -> None:
    assert parse_oom_message(Unprintable()).kind == "unknown"


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_never_raises_on_any_text(text: str) -> None:
    parse_oom_message(text)


_sizes = st.builds(
    lambda n, unit: f"{n:.2f} {unit}", st.floats(0, 1e6, allow_nan=False), st.sampled_from(["KiB", "MiB", "GiB"])
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(_sizes, st.sampled_from(["Tried to allocate", "of which", "is free", "GPU 0", "(", ";"])), max_size=30
    )
)
def test_never_raises_on_message_like_text(parts: list[str]) -> None:
    facts = parse_oom_message(" ".join(parts))
    assert facts.requested_bytes is None or facts.requested_bytes >= 0


def test_other_processes_are_named_in_the_diagnosis() -> None:
    from oomnb.analysis.rules import diagnose
    from oomnb.model.report import OomInfo

    facts = parse_oom_message(V2_1)  # 79.15 GiB card, 1.21 GiB free, this process 77.94 GiB
    assert facts.capacity_bytes is not None and facts.free_bytes is not None and facts.process_bytes is not None
    others = facts.capacity_bytes - facts.free_bytes - facts.process_bytes
    assert others == 0  # everything in use is this process's
    oom = OomInfo(
        requested_bytes=facts.requested_bytes,
        free_bytes=facts.free_bytes,
        capacity_bytes=facts.capacity_bytes,
        message=V2_1,
        other_processes_bytes=20 * GiB,
    )
    text, _ = diagnose(
        oom, baseline_bytes=0, allocated_at_failure=0, capacity_bytes=facts.capacity_bytes, simulated=False
    )
    assert "20.00 GiB of the GPU is used by other processes" in text
