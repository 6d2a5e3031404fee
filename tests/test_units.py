from __future__ import annotations

import pytest

from oomnb.model.units import CARDS, format_bytes, format_size_like_torch, parse_limit, parse_size, round_allocation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 1024**3),
        ("4 GiB", 4 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("1.5g", 1_500_000_000),
        ("64KiB", 65536),
        ("100", 100),
        ("2tib", 2 * 1024**4),
        (4096, 4096),
        (1e3, 1000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4XB", "", "GiB", "-3", "four", "1..2GB", True])
def test_parse_size_rejects_with_one_line(text: object) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]+$"):
        parse_size(text)  # type: ignore[arg-type]


def test_round_allocation_matches_the_caching_allocator() -> None:
    assert round_allocation(0) == 0
    assert round_allocation(1) == 512
    assert round_allocation(512) == 512
    assert round_allocation(513) == 1024
    assert round_allocation(4096) == 4096
    assert round_allocation(40) == 512  # ten float32 values


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(4096) == "4.00 KiB"
    assert format_bytes(64 * 1024**2) == "64.00 MiB"
    assert format_bytes(-3 * 1024**2) == "-3.00 MiB"
    assert format_bytes(1024**2, signed=True) == "+1.00 MiB"
    assert format_bytes(3 * 1024**4) == "3.00 TiB"


def test_format_size_like_torch() -> None:
    # c10's format_size: bytes up to 1024, then KiB/MiB/GiB with two decimals.
    assert format_size_like_torch(1024) == "1024 bytes"
    assert format_size_like_torch(2 * 1024**2) == "2.00 MiB"
    assert format_size_like_torch(20 * 1024**2) == "20.00 MiB"
    assert format_size_like_torch(int(14.75 * 1024**3)) == "14.75 GiB"


def test_cards_and_limits() -> None:
    nbytes, card = parse_limit("t4")
    assert card is not None and card.name == "T4"
    assert nbytes == round(14.75 * 1024) * 1024**2
    assert parse_limit("A100-80GB")[1] is CARDS["A100-80GB"]
    assert parse_limit("4GiB") == (4 * 1024**3, None)
    with pytest.raises(ValueError, match="unknown card 'K80'"):
        parse_limit("K80")
    with pytest.raises(ValueError, match="larger than zero"):
        parse_limit("0")
    assert {"T4", "A10G", "L4", "A100-40GB", "A100-80GB", "H100", "RTX4090"} <= set(CARDS)
