"""Canonical JSON: known-answer vectors, refusals, and encode/parse round trips."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from enum import IntEnum, StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckms.errors import ProtocolError
from ckms.protocol.canonical import canonical_json, parse_canonical_json
from tests.support.vectors import load_vectors

VECTORS = load_vectors("canonical_json.json")


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=[v["name"] for v in VECTORS["valid"]])
def test_valid_vectors_encode_exactly(vector: dict[str, Any]) -> None:
    expected = bytes.fromhex(vector["expected_hex"])
    assert expected == vector["expected"].encode("utf-8")
    assert canonical_json(vector["input"]) == expected
    assert parse_canonical_json(expected) == vector["input"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=[v["name"] for v in VECTORS["invalid"]])
def test_invalid_vectors_are_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_canonical_json(bytes.fromhex(vector["input_hex"]))


def test_vectors_cover_the_rules() -> None:
    names = {v["name"] for v in VECTORS["valid"]}
    assert {"unicode_raw_utf8", "sorted_keys_nested", "scalars", "string_escapes"} <= names
    bad = {v["name"] for v in VECTORS["invalid"]}
    assert {"whitespace", "unsorted_keys", "duplicate_key", "nan"} <= bad


def test_key_order_does_not_matter_and_tuples_are_arrays() -> None:
    a = canonical_json({"b": [1, 2], "a": {"y": 1, "x": 2}})
    b = canonical_json(OrderedDict([("a", OrderedDict([("x", 2), ("y", 1)])), ("b", (1, 2))]))
    assert a == b == b'{"a":{"x":2,"y":1},"b":[1,2]}'


def test_str_enums_encode_as_their_value() -> None:
    from enum import StrEnum

    class Colour(StrEnum):
        RED = "red"

    assert canonical_json({"c": Colour.RED}) == b'{"c":"red"}'


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, math.nan], {"a": math.inf}])
def test_nan_and_infinity_are_refused(value: Any) -> None:
    with pytest.raises(ProtocolError):
        canonical_json(value)


@pytest.mark.parametrize(
    "value",
    [
        {1: "a"},
        {None: 1},
        {("a",): 1},
        {"a": {2.5: 1}},
        {True: 1},
        b"bytes",
        {"a": b"bytes"},
        {1, 2},
        object(),
        "\ud800",
        {"\udfff": 1},
    ],
)
def test_unencodable_values_are_refused(value: Any) -> None:
    with pytest.raises(ProtocolError):
        canonical_json(value)


def test_deep_nesting_is_refused_not_crashing() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ProtocolError):
        canonical_json(deep)
    with pytest.raises(ProtocolError):
        parse_canonical_json(b"[" * 100_000 + b"]" * 100_000)


def test_parse_refuses_oversized_and_non_bytes() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_canonical_json(b'"' + b"a" * 100 + b'"', max_bytes=50)
    assert parse_canonical_json(b'"' + b"a" * 48 + b'"', max_bytes=50) == "a" * 48
    with pytest.raises(ProtocolError):
        parse_canonical_json('{"a":1}')  # type: ignore[arg-type]
    assert parse_canonical_json(bytearray(b'{"a":1}')) == {"a": 1}


def test_duplicate_keys_are_refused_even_when_nested() -> None:
    with pytest.raises(ProtocolError, match="duplicate"):
        parse_canonical_json(b'{"a":{"b":1,"b":2}}')


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_encode_then_parse_round_trips(value: Any) -> None:
    try:
        encoded = canonical_json(value)
    except ProtocolError:
        # Only lone surrogates in text are unencodable among these values.
        assert "\\ud" in json.dumps(value)
        return
    assert parse_canonical_json(encoded) == value
    assert canonical_json(parse_canonical_json(encoded)) == encoded
    # The encoding is what the stdlib produces with the documented settings.
    assert encoded == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


class _Colour(StrEnum):
    RED = "red"


class _Level(IntEnum):
    HIGH = 3


# Everything the one-walk path writes itself (no floats): it must give the stdlib's bytes.
PLAIN_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.text()
    | st.sampled_from([_Colour.RED, _Level.HIGH]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(max_size=12), PLAIN_VALUES, max_size=12))
def test_objects_of_plain_values_encode_as_the_stdlib_does(value: dict[str, Any]) -> None:
    try:
        encoded = canonical_json(value)
    except ProtocolError:
        assert "\\ud" in json.dumps(value)  # a lone surrogate, as above
        return
    assert encoded == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def test_nesting_deeper_than_the_one_walk_path_still_encodes() -> None:
    value: Any = {"leaf": [1, "two", None]}
    for depth in range(12):
        value = {f"k{depth}": value, "n": depth}
    assert canonical_json(value) == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


class _LookAlike(str):
    """A key that claims to equal (and hashes as) another string: its text is its own."""

    def __hash__(self) -> int:
        return hash("canonical-probe-role")

    def __eq__(self, other: object) -> bool:
        return True

    __ne__ = str.__ne__


def test_a_key_that_claims_equality_does_not_change_another_objects_bytes() -> None:
    # The one-walk path keeps each key's escaped text: a look-alike key must neither be
    # written as another key's text nor leave its own text to be written for later keys.
    first = {_LookAlike("admin"): 1}
    assert canonical_json(first) == b'{"admin":1}'
    assert canonical_json({"canonical-probe-role": 1}) == b'{"canonical-probe-role":1}'
    assert canonical_json({_LookAlike("other"): 1}) == b'{"other":1}'


def test_keys_equal_but_distinct_sort_as_the_stdlib_does() -> None:
    value = {"a": 2, _LookAlike("a"): 1}
    assert canonical_json(value) == json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
