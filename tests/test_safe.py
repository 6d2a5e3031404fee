"""Showing a user's values without trusting them."""

from __future__ import annotations

import enum
import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oomnb.model.safe import safe_repr, safe_value

MB16 = 16 * 1024 * 1024


class Bad:
    def __repr__(self) -> str:
        raise ValueError("no")


class Loop:
    def __repr__(self) -> str:
        return repr(self)


class Five:
    def __repr__(self) -> Any:
        return 5


class Huge:
    def __repr__(self) -> str:
        raise MemoryError


class Interrupted:
    def __repr__(self) -> str:
        raise KeyboardInterrupt


class Sliceless(str):
    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError("no slicing")


class ReturnsSliceless:
    def __repr__(self) -> str:
        return Sliceless("y" * 500)


class Nameless(type):
    @property
    def __name__(cls) -> str:  # type: ignore[override]
        raise RuntimeError("no name")


class Anonymous(metaclass=Nameless):
    def __repr__(self) -> str:
        raise KeyError("k")


class Disguised:
    """isinstance() asks for __class__, which raises here."""

    @property
    def __class__(self) -> type:  # type: ignore[override]
        raise ValueError("no class")

    def __repr__(self) -> str:
        return "Disguised()"


class Colour(enum.IntEnum):
    RED = 3


class Precise(float):
    def __repr__(self) -> str:
        return "Precise!"


def test_repr_that_fits_is_unchanged() -> None:
    assert safe_repr([1, 2, 3]) == "[1, 2, 3]"
    assert safe_repr("it's") == '"it\'s"'
    assert safe_repr(None) == "None"
    assert safe_repr("x" * 198) == "'" + "x" * 198 + "'"  # 200 characters: fits exactly


def test_repr_that_raises() -> None:
    assert safe_repr(Bad()) == "<repr of Bad failed: ValueError>"
    assert safe_repr(Five()) == "<repr of Five failed: TypeError>"
    assert safe_repr(Huge()) == "<repr of Huge failed: MemoryError>"


def test_repr_that_recurses() -> None:
    assert safe_repr(Loop()) == "<repr of Loop failed: RecursionError>"
    looped: list[Any] = []
    looped.append(looped)
    assert safe_repr(looped) == "[[...]]"


def test_sixteen_megabyte_string() -> None:
    text = safe_repr("a" * MB16)
    assert text == "'" + "a" * 192 + "… <str>"
    assert len(text) == 200


def test_long_bytes_and_bytearray() -> None:
    assert safe_repr(b"x" * MB16, limit=20) == "b'xxxxxxxxx… <bytes>"
    assert safe_repr(bytearray(b"z" * MB16), limit=30) == "bytearray(b'zzzzz… <bytearray>"


def test_long_repr_of_any_type_is_cut() -> None:
    assert safe_repr(list(range(100)), limit=20) == "[0, 1, 2, 3,… <list>"
    assert safe_repr(ReturnsSliceless(), limit=30) == "y" * 10 + "… <ReturnsSliceless>"


def test_short_limits() -> None:
    assert safe_repr("abcdefgh", limit=5) == "'abc…"  # the note would not fit
    assert safe_repr("abcdefgh", limit=1) == "…"
    assert safe_repr("abcdefgh", limit=0) == ""
    assert safe_repr("abcdefgh", limit=-3) == ""
    assert safe_repr(Bad(), limit=20) == "<repr of Bad failed…"


def test_type_name_that_raises() -> None:
    assert safe_repr(Anonymous()) == "<repr of object failed: KeyError>"


def test_interrupts_pass() -> None:
    with pytest.raises(KeyboardInterrupt):
        safe_repr(Interrupted())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.integers(), st.floats(), st.lists(st.text())), st.integers(-5, 300))
def test_repr_is_bounded_and_exact_when_it_fits(value: object, limit: int) -> None:
    text = safe_repr(value, limit)
    assert len(text) <= max(limit, 0)
    if 0 < len(repr(value)) <= limit:
        assert text == repr(value)


def test_plain_values_are_unchanged() -> None:
    for value in (None, True, False, 0, -7, 1.5, -0.0, "", "short"):
        kept = safe_value(value)
        assert kept == value and type(kept) is type(value)
    assert safe_value(10**199) == 10**199  # 200 digits


def test_subclasses_become_the_plain_type() -> None:
    colour = safe_value(Colour.RED)
    assert colour == 3 and type(colour) is int
    precise = safe_value(Precise(2.5))
    assert precise == 2.5 and type(precise) is float
    assert safe_value(Sliceless("abc")) == "abc"


def test_floats_json_cannot_hold() -> None:
    assert safe_value(float("nan")) == "nan"
    assert safe_value(float("inf")) == "inf"
    assert safe_value(float("-inf")) == "-inf"


def test_long_strings_are_cut() -> None:
    assert safe_value("x" * 300) == "x" * 199 + "…"
    assert safe_value("x" * MB16, limit=4) == "xxx…"
    assert safe_value("x" * 200) == "x" * 200


def test_long_ints_become_their_repr() -> None:
    assert safe_value(10**200) == "1" + "0" * 192 + "… <int>"  # 201 digits
    assert safe_value(-(10**20), limit=12) == "-1000… <int>"


def test_ints_past_the_digit_limit() -> None:
    limit = getattr(sys, "get_int_max_str_digits", lambda: 0)()
    expected = "<repr of int failed: ValueError>" if 0 < limit < 5001 else "1" + "0" * 192 + "… <int>"
    assert safe_value(10**5000) == expected


def test_everything_else_is_its_safe_repr() -> None:
    assert safe_value([1, 2]) == "[1, 2]"
    assert safe_value(b"ab") == "b'ab'"
    assert safe_value(Bad()) == "<repr of Bad failed: ValueError>"
    assert safe_value(Disguised()) == "Disguised()"


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(),
        st.binary(),
        st.lists(st.integers()),
        st.dictionaries(st.text(), st.floats()),
    ),
    st.integers(1, 300),
)
def test_values_are_json_and_bounded(value: object, limit: int) -> None:
    kept = safe_value(value, limit)
    json.dumps(kept, allow_nan=False)
    if isinstance(kept, str):
        assert len(kept) <= limit
