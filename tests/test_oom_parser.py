"""The OOM message parser over real messages from several PyTorch versions."""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oomnb.allocator.oom import MAX_BYTES, OomFacts, is_oom_error, parse_oom_message

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


# -- hostile and absurd input --------------------------------------------------

KINDS = {"unknown", "simulated", "mps", "hip", "xpu", "cublas", "cudnn", "cuda", "cpu"}
FIGURES = [f.name for f in fields(OomFacts) if f.name != "kind"]


def assert_sane(facts: OomFacts) -> None:
    """Every figure is unknown or a whole number of bytes no allocator would refuse to print."""
    assert facts.kind in KINDS
    for name in FIGURES:
        value = getattr(facts, name)
        assert value is None or (type(value) is int and 0 <= value <= MAX_BYTES), (name, value)
    assert facts.shortfall_bytes is None or facts.shortfall_bytes >= 0


NEW_TEMPLATE = (
    "CUDA out of memory. Tried to allocate {0}. GPU {6} has a total capacity of {1} of which {2} is free. "
    "Including non-PyTorch memory, this process has {3} memory in use. Of the allocated memory {4} is "
    "allocated by PyTorch, and {5} is reserved by PyTorch but unallocated."
)
OLD_TEMPLATE = (
    "CUDA out of memory. Tried to allocate {0} (GPU {6}; {1} total capacity; {4} already allocated; "
    "{2} free; {5} reserved in total by PyTorch)"
)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 1e400 GiB",
        "CUDA out of memory. Tried to allocate " + "9" * 400 + " GiB",
        "CUDA out of memory. Tried to allocate " + "9" * 400 + ".00 GiB",
        "CUDA out of memory. Tried to allocate " + "9" * 10_000 + " bytes",
        "CUDA out of memory. Tried to allocate 16777217.00 TiB",
        "CUDA out of memory. Tried to allocate 18446744073709551617 bytes",
    ],
)
def test_absurd_request_is_unknown(message: str) -> None:
    facts = parse_oom_message(message)
    assert facts.kind == "cuda"
    assert facts.requested_bytes is None
    assert facts.shortfall_bytes is None


def test_largest_figure_is_kept_exactly() -> None:
    assert parse_oom_message("Tried to allocate 18446744073709551616 bytes").requested_bytes == 2**64
    assert parse_oom_message("Tried to allocate 16777216.00 TiB").requested_bytes == 2**64
    assert parse_oom_message("Tried to allocate 0000000000000000000000000001 GiB").requested_bytes == GiB
    # Exact, where reading through float() would round to 2**64.
    cpu = parse_oom_message(CPU.replace("429496729600", "18446744073709551615"))
    assert cpu.requested_bytes == 2**64 - 1


def test_long_fraction_is_read() -> None:
    facts = parse_oom_message("Tried to allocate 1." + "5" * 10_000 + " GiB")
    assert facts.requested_bytes == round(1.5555555555555556 * GiB)


def test_absurd_figures_leave_the_others_readable() -> None:
    huge = "9" * 10_000 + ".00 GiB"
    facts = parse_oom_message(NEW_TEMPLATE.format("2.00 GiB", huge, "1.00 GiB", huge, "3.00 GiB", huge, "0"))
    assert facts.requested_bytes == 2 * GiB
    assert facts.capacity_bytes is None
    assert facts.free_bytes == GiB
    assert facts.process_bytes is None
    assert facts.allocated_bytes == 3 * GiB
    assert facts.reserved_unallocated_bytes is None
    assert facts.reserved_bytes is None
    assert facts.device_index == 0
    assert facts.shortfall_bytes == GiB


def test_old_phrasings_with_absurd_figures() -> None:
    huge = "9" * 10_000 + " MiB"
    facts = parse_oom_message(OLD_TEMPLATE.format("4.00 MiB", huge, huge, huge, "1.00 MiB", huge, "1"))
    assert facts.requested_bytes == 4 * MiB
    assert facts.capacity_bytes is None
    assert facts.allocated_bytes == MiB
    assert facts.free_bytes is None
    assert facts.reserved_bytes is None
    assert facts.reserved_unallocated_bytes is None
    assert facts.device_index == 1


def test_absurd_device_index_is_unknown() -> None:
    assert parse_oom_message("CUDA out of memory. GPU " + "1" * 10_000 + " has").device_index is None
    assert parse_oom_message("CUDA out of memory. GPU 007 has").device_index == 7


def test_sum_past_the_largest_figure_is_unknown() -> None:
    big = "16777216.00 TiB"  # 2**64 bytes: each is kept, their sum is not
    facts = parse_oom_message(NEW_TEMPLATE.format("1 bytes", big, "0 bytes", big, big, big, "0"))
    assert facts.allocated_bytes == facts.reserved_unallocated_bytes == 2**64
    assert facts.reserved_bytes is None


def test_unicode_that_case_folds_into_a_unit() -> None:
    # Kelvin sign: lower() gives "kib", the unit itself.
    assert parse_oom_message("Tried to allocate 2 \u212aiB").requested_bytes == 2048
    # Dotless i matches "i" under re.I, but "gıb" is no unit: unknown, not bytes.
    assert parse_oom_message("Tried to allocate 2 G\u0131B").requested_bytes is None
    # Arabic-Indic digits are digits to re and to int().
    assert parse_oom_message("Tried to allocate \u0661\u0662 MiB").requested_bytes == 12 * MiB


def test_anything_but_a_str_gives_the_empty_facts() -> None:
    for message in (RuntimeError(V2_1), V2_1.encode(), None, 12, [V2_1]):
        assert parse_oom_message(message) == OomFacts()


class Sneaky(str):
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_str_subclass_is_read_as_its_characters() -> None:
    assert parse_oom_message(Sneaky(V2_4)) == parse_oom_message(V2_4)


class UnprintableError(RuntimeError):
    def __str__(self) -> str:
        raise ValueError("no")


def test_is_oom_error_on_unprintable_error() -> None:
    assert not is_oom_error(UnprintableError())


def test_ten_thousand_digits_are_linear() -> None:
    # Quadratic before: 50 seconds for this text.
    start = time.perf_counter()
    facts = parse_oom_message("9" * 10_000)
    assert time.perf_counter() - start < 2
    assert facts == OomFacts()


def _megabyte(piece: str) -> str:
    return (piece * (1_000_000 // len(piece) + 1))[:1_000_000]


@pytest.mark.parametrize(
    ("text", "requested"),
    [
        ("9" * 1_000_000, None),
        (_megabyte("1 "), None),
        (_megabyte("1."), None),
        ("1" + " " * 999_999, None),
        ("GPU " + "1" * 999_996, None),
        ("Process " + "1" * 999_992, None),
        (_megabyte("Tried to allocate 1"), None),
        (_megabyte("1 GiB "), None),
        (_megabyte(V2_1), 2 * GiB),
    ],
    ids=["digits", "digit-blank", "digit-dot", "blanks", "device-index", "process", "tried", "sizes", "messages"],
)
def test_a_megabyte_parses(text: str, requested: int | None) -> None:
    facts = parse_oom_message(text)
    assert facts.requested_bytes == requested
    assert_sane(facts)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_any_text_gives_sane_figures(text: str) -> None:
    assert_sane(parse_oom_message(text))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_binary_junk_gives_sane_figures(junk: bytes) -> None:
    assert_sane(parse_oom_message(junk.decode("utf-8", errors="replace")))
    assert_sane(parse_oom_message(junk.decode("latin-1")))


_UNITS = {"bytes": 1, "KiB": 1024, "MiB": MiB, "GiB": GiB, "TiB": 1024**4, "KB": 1024, "MB": MiB, "GB": GiB}

_figures = st.tuples(st.integers(0, 2**70), st.sampled_from(sorted(_UNITS)))

_absurd = st.one_of(
    st.integers(21, 10_000).map(lambda n: "9" * n + " GiB"),
    st.integers(1, 500).map(lambda n: "1" + "0" * n + ".00 MiB"),
    st.sampled_from(["1e400 GiB", "inf GiB", "nan bytes", "-1.00 GiB", "1.5.5 GiB", "99999999999999999999999 bytes"]),
    st.builds(lambda n, f: f"{n}.{f} GiB", st.integers(0, 10**30), st.text("0123456789", min_size=1, max_size=500)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_figures, min_size=6, max_size=6), st.integers(0, 2**70), st.sampled_from([NEW_TEMPLATE, OLD_TEMPLATE]))
def test_real_templates_read_every_figure_exactly(figures: list[tuple[int, str]], index: int, template: str) -> None:
    message = template.format(*(f"{n} {unit}" for n, unit in figures), index)
    facts = parse_oom_message(message)
    assert_sane(facts)
    expected = [n * _UNITS[unit] if n * _UNITS[unit] <= MAX_BYTES else None for n, unit in figures]
    assert facts.requested_bytes == expected[0]
    assert facts.capacity_bytes == expected[1]
    assert facts.free_bytes == expected[2]
    assert facts.allocated_bytes == expected[4]
    assert facts.device_index == (index if index <= MAX_BYTES else None)
    if template is NEW_TEMPLATE:
        assert facts.process_bytes == expected[3]
        assert facts.reserved_unallocated_bytes == expected[5]
    else:
        assert facts.reserved_bytes == expected[5]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(_absurd, st.builds(lambda f: f"{f:.2f} GiB", st.floats(0, 1e6))), min_size=7, max_size=7),
    st.sampled_from([NEW_TEMPLATE, OLD_TEMPLATE]),
)
def test_real_templates_with_absurd_figures(figures: list[Any], template: str) -> None:
    assert_sane(parse_oom_message(template.format(*figures)))
