from __future__ import annotations

import re

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


SIZE_HINT = "(use a number of bytes above zero, such as 4096, or one with a unit, such as 512MB or 4GiB)"
LIMIT_HINT = "(use a size such as 4GiB or 512MB, or a card name such as T4)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e400", "too large: '1e400' is more than 2**64 bytes"),
        ("1e400GiB", "too large: '1e400GiB' is more than 2**64 bytes"),
        ("1" * 400, "too large: '" + "1" * 52 + "… <str> is more than 2**64 bytes"),
        ("18446744073709551617", "too large: '18446744073709551617' is more than 2**64 bytes"),
        ("16777217TiB", "too large: '16777217TiB' is more than 2**64 bytes"),
        (2**64 + 1, "too large: 18446744073709551617 is more than 2**64 bytes"),
        (1e30, "too large: 1e+30 is more than 2**64 bytes"),
        ("inf", "not a finite size: 'inf'"),
        ("-Infinity", "not a finite size: '-Infinity'"),
        ("nan", "not a finite size: 'nan'"),
        ("nan GiB", "not a finite size: 'nan GiB'"),
        (float("inf"), "not a finite size: inf"),
        (float("nan"), "not a finite size: nan"),
        ("-3", "a size cannot be negative: '-3'"),
        ("-1.5GiB", "a size cannot be negative: '-1.5GiB'"),
        ("-1e400", "a size cannot be negative: '-1e400'"),
        (-3, "a size cannot be negative: -3"),
        (-0.5, "a size cannot be negative: -0.5"),
        ("0", "a size must be larger than zero: '0'"),
        ("0GiB", "a size must be larger than zero: '0GiB'"),
        ("-0", "a size must be larger than zero: '-0'"),
        (0, "a size must be larger than zero: 0"),
        (0.0, "a size must be larger than zero: 0.0"),
        ("0.5", "less than one byte: '0.5'"),
        (0.5, "less than one byte: 0.5"),
        ("1..2GB", "not a size: '1..2GB'"),
        ("+3", "not a size: '+3'"),
        ("5.", "not a size: '5.'"),
        (None, "not a size: None"),
    ],
)
def test_parse_size_rejects_what_is_not_a_size(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_size(text)  # type: ignore[arg-type]
    assert str(info.value) == f"{message} {SIZE_HINT}"
    assert info.value.__cause__ is None and info.value.__context__ is None
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_limit(text)  # type: ignore[arg-type]
    assert str(info.value) == f"{message} {LIMIT_HINT}"
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_unknown_unit_names_the_units() -> None:
    with pytest.raises(ValueError, match="unknown unit") as info:
        parse_size("4XB")
    assert str(info.value) == "unknown unit 'XB' in '4XB' (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"


def test_unknown_card_is_not_a_size_error() -> None:
    known = "T4, V100-16GB, V100-32GB, A10G, L4, RTX3090, RTX4090, A6000, A100-40GB, A100-80GB, H100, H200"
    with pytest.raises(ValueError, match="unknown card") as info:
        parse_limit("info")  # starts like "inf", but is no number
    assert str(info.value) == f"unknown card 'info'; known cards: {known}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18446744073709551616", 2**64),  # the largest size, exactly
        ("16777216TiB", 2**64),
        (2**64, 2**64),
        ("9007199254740993", 2**53 + 1),  # exact, where float() would round
        ("0" * 5000 + "1", 1),
        ("1", 1),
        (1.9, 1),
        (".5GiB", 512 * 1024**2),
        ("1e9", 1_000_000_000),
        ("0.1GB", 100_000_000),
    ],
)
def test_parse_size_edges_that_are_sizes(text: str | int | float, expected: int) -> None:
    assert parse_size(text) == expected
    assert parse_limit(text) == (expected, None)


@pytest.mark.parametrize("name", sorted(CARDS))
def test_every_card_still_parses(name: str) -> None:
    assert parse_limit(name) == (CARDS[name].capacity_bytes, CARDS[name])
    assert parse_limit(f" {name.lower()} ") == (CARDS[name].capacity_bytes, CARDS[name])
