"""Unit and property tests of shared.luabuf, the kong profile codec (docs/kong-codec.md)."""

from __future__ import annotations

import math
import pickle
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.luabuf import (
    KONG_DICTIONARY,
    MAX_DEPTH,
    NULL,
    LuaBufferCodec,
    LuaNull,
    dumps,
    loads,
)


def h(text: str) -> bytes:
    """Hex with spaces allowed, so byte layouts can be written readably."""
    return bytes.fromhex(text)


def dbl(x: float) -> bytes:
    return b"\x07" + struct.pack("<d", x)


def same(a: object, b: object) -> bool:
    """Equality that also checks types (1 is not 1.0, -0.0 is not 0.0, nan is nan)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        assert isinstance(b, float)
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        assert isinstance(b, list)
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        assert isinstance(b, dict)
        if a.keys() != b.keys():
            return False
        bkeys = {k: k for k in b}
        return all(same(k, bkeys[k]) and same(v, b[k]) for k, v in a.items())
    return a == b


# ------------------------------------------------------------------ NULL and the codec object


def test_null_sentinel_is_distinct_falsy_and_picklable() -> None:
    assert NULL is LuaNull.NULL
    assert NULL is not None
    assert not NULL
    assert repr(NULL) == "LuaNull.NULL"
    assert pickle.loads(pickle.dumps(NULL)) is NULL
    assert dumps(NULL) == b"\x03"
    assert loads(b"\x03") is NULL


def test_codec_object_binds_the_kong_dictionary() -> None:
    codec = LuaBufferCodec()
    assert codec.name == "luajit-string-buffer"
    assert codec.dumps({"spec": {}}) == h("09 01 0f 00 08")
    assert codec.loads(h("09 01 0f 05 21 75")) == {"unique": "u"}
    other = LuaBufferCodec(["x"])
    assert other.dumps({"x": 1}) == h("09 01 0f 00") + dbl(1.0)
    assert other.loads(h("0f 00")) == "x"


def test_kong_dictionary_order() -> None:
    assert KONG_DICTIONARY == ("spec", "data", "source", "event", "wid", "unique")


# ------------------------------------------------------------------ scalars


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x00", None),
        (b"\x01", False),
        (b"\x02", True),
        (h("04 01 02 03 04"), 0x04030201),  # lightuserdata: its address as an int
        (h("05 08 07 06 05 04 03 02 01"), 0x0102030405060708),
        (h("06 07 00 00 00"), 7),  # int32, as ARM64 (dual-number) LuaJIT writes integers
        (h("06 ff ff ff ff"), -1),
        (h("06 00 00 00 80"), -(2**31)),
        (h("10 00 00 00 00 00 00 00 f0"), -(2**60)),  # int64_t cdata
        (h("10 ff ff ff ff ff ff ff ff"), -1),
        (h("11 ff ff ff ff ff ff ff ff"), 2**64 - 1),  # uint64_t cdata
        (h("12") + struct.pack("<dd", 1.5, -2.0), complex(1.5, -2.0)),
    ],
)
def test_decode_scalar_tags(payload: bytes, expected: object) -> None:
    assert same(loads(payload), expected)


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.0, 0),
        (1.0, 1),
        (-1.0, -1),
        (30758.0, 30758),
        (2.0**31, 2**31),
        (123456789.0, 123456789),
        (2.0**53, 2**53),
        (-(2.0**53), -(2**53)),
        (2.0**53 + 2, 2.0**53 + 2),  # beyond 2**53 an integral double may not be the int meant
        (1e300, 1e300),
        (1.5, 1.5),
        (-0.25, -0.25),
        (-0.0, -0.0),
        (math.inf, math.inf),
        (-math.inf, -math.inf),
        (math.nan, math.nan),
    ],
)
def test_decode_double_turns_integral_values_into_ints(x: float, expected: object) -> None:
    assert same(loads(dbl(x)), expected)


@pytest.mark.parametrize(
    ("value", "payload"),
    [
        (None, b"\x00"),
        (False, b"\x01"),
        (True, b"\x02"),  # bool is checked before int: True is not 1.0
        (0, dbl(0.0)),
        (-1, dbl(-1.0)),
        (1234, dbl(1234.0)),
        (2**53, dbl(2.0**53)),
        (-(2**53), dbl(-(2.0**53))),
        (2**53 + 1, h("10") + struct.pack("<q", 2**53 + 1)),
        (-(2**63), h("10") + struct.pack("<q", -(2**63))),
        (2**63 - 1, h("10") + struct.pack("<q", 2**63 - 1)),
        (2**63, h("11") + struct.pack("<Q", 2**63)),
        (2**64 - 1, h("11 ff ff ff ff ff ff ff ff")),
        (1.5, dbl(1.5)),
        (-0.0, dbl(-0.0)),
        (math.inf, dbl(math.inf)),
        (complex(1, 2), h("12") + struct.pack("<dd", 1.0, 2.0)),
        ("", b"\x20"),
        ("hello", b"\x25hello"),
        (b"\xff\xfe", b"\x22\xff\xfe"),
        (bytearray(b"ab"), b"\x22ab"),
        (memoryview(b"ab"), b"\x22ab"),
        ("é", b"\x22\xc3\xa9"),
        ("data", b"\x24data"),  # dictionary words are referenced as keys only, never as values
    ],
)
def test_encode_scalars(value: object, payload: bytes) -> None:
    assert dumps(value) == payload


def test_encode_nan_value_is_allowed() -> None:
    assert math.isnan(struct.unpack("<d", dumps(math.nan)[1:])[0])


@pytest.mark.parametrize("n", [2**64, -(2**63) - 1, 10**30])
def test_encode_int_beyond_64_bits_is_refused(n: int) -> None:
    with pytest.raises(LocalProtocolError, match="64 bits"):
        dumps(n)


# ------------------------------------------------------------------ strings and U lengths


@pytest.mark.parametrize(
    ("length", "prefix"),
    [
        (0, "20"),
        (191, "df"),  # 0x20+191 = 0xDF, the last one-byte U
        (192, "e0 00"),  # 0xE0, the first two-byte U
        (300, "e0 6c"),  # case 12 of the captures
        (8127, "fe ff"),  # 0x1FDF, the last two-byte U
        (8128, "ff e0 1f 00 00"),  # 0x1FE0, the first five-byte U
        (9000, "ff 48 23 00 00"),  # case 19 of the captures
    ],
)
def test_string_length_classes(length: int, prefix: str) -> None:
    text = "z" * length
    payload = h(prefix) + text.encode()
    assert dumps(text) == payload
    assert loads(payload) == text


@pytest.mark.parametrize(
    ("count", "prefix"),
    [(0xDF, "df"), (0xE0, "e0 00"), (0x1FDF, "fe ff"), (0x1FE0, "ff e0 1f 00 00")],
)
def test_table_count_length_classes(count: int, prefix: str) -> None:
    items = [True] * (count - 1)  # a 1-based array counts the unused slot 0
    payload = h("0c " + prefix) + b"\x02" * (count - 1)
    assert dumps(items) == payload
    assert loads(payload) == items


def test_decode_accepts_non_canonical_length_forms() -> None:
    # LuaJIT's reader takes a long form even for small values; so do we.
    assert loads(h("ff 25 00 00 00") + b"hello") == "hello"
    assert loads(h("e0 00") + b"y" * 192) == "y" * 192
    assert loads(h("0f ff 05 00 00 00")) == "unique"


def test_decode_string_that_is_not_utf8_gives_bytes() -> None:
    assert loads(b"\x22\xff\xfe") == b"\xff\xfe"
    assert loads(b"\x22\xed\xa0") == b"\xed\xa0"  # a lone surrogate is not valid UTF-8


def test_encode_str_with_lone_surrogate_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="UTF-8"):
        dumps("\ud800")


# ------------------------------------------------------------------ tables


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (h("08"), {}),
        (h("09 00"), {}),
        (h("0a 00"), {}),
        (h("0b 00 00"), {}),
        (h("0c 00"), {}),  # LuaJIT never writes these empty forms but reads them
        (h("0c 01"), {}),
        (h("0d 01 00"), {}),
        (h("09 01 21 6b 02"), {"k": True}),
        (h("0a 02 24 7a 65 72 6f 23 6f 6e 65"), {0: "zero", 1: "one"}),  # case 17
        (h("0b 02 01 21 7a 21 61 21 6b 02"), {0: "z", 1: "a", "k": True}),
        (h("0c 03 21 61 21 62"), ["a", "b"]),
        (h("0d 03 01 21 61 21 62 21 6b 21 76"), {1: "a", 2: "b", "k": "v"}),  # case 15
        (h("0c 04 21 61 00 21 63"), {1: "a", 3: "c"}),  # a hole in the array part
        (h("0c 03 21 61 00"), {1: "a"}),
        (h("0a 02 00 21 61"), {1: "a"}),
        (h("0d 03 01 00 21 62") + dbl(1.0) + h("21 63"), {1: "c", 2: "b"}),
        (h("09 02 21 61 00 21 62 02"), {"b": True}),  # a nil value is an absent key
        (h("09 01 03 02"), {NULL: True}),
        (h("09 02 02 21 74 01 21 66"), {True: "t", False: "f"}),
        (h("09 01") + dbl(1.5) + h("21 78"), {1.5: "x"}),
        (h("09 01 0f 00 0f 00"), {"spec": "spec"}),  # a reference may also be a value
        (
            h("0d 04 01") + dbl(1.0) + dbl(2.0) + h("21 78 21 6b 02"),
            {1: 1, 2: 2, 3: "x", "k": True},
        ),
    ],
)
def test_decode_table_forms(payload: bytes, expected: object) -> None:
    assert same(loads(payload), expected)


def test_decode_list_of_int_doubles_gives_ints() -> None:
    value = loads(h("0c 04") + dbl(1.0) + dbl(2.0) + dbl(3.0))  # case 14
    assert same(value, [1, 2, 3])


def test_encode_dict_uses_dictionary_refs_for_keys_only() -> None:
    assert (
        dumps({"data": "data", "k": "spec"})
        == h("09 02 0f 01 24") + b"data" + h("21 6b 24") + b"spec"
    )
    assert dumps({b"unique": 1}) == h("09 01 0f 05") + dbl(1.0)


def test_encode_dict_skips_none_values() -> None:
    assert dumps({"a": None, "b": 1}) == h("09 01 21 62") + dbl(1.0)
    assert dumps({"a": None}) == b"\x08"


def test_encode_empty_containers_are_the_empty_table() -> None:
    assert dumps({}) == dumps([]) == dumps(()) == b"\x08"
    assert loads(dumps([])) == {}


def test_encode_list_and_tuple_are_one_based_arrays() -> None:
    assert dumps(["a", "b"]) == h("0c 03 21 61 21 62")
    assert dumps(("a",)) == h("0c 02 21 61")
    assert dumps([NULL]) == h("0c 02 03")


def test_encode_none_in_list_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="hole"):
        dumps([1, None])


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({None: 1}, "cannot be a Lua table key"),
        ({math.nan: 1}, "NaN"),
        ({(1, 2): 1}, "cannot be a Lua table key"),
        ({2**60: 1}, "not exactly representable"),
        ({complex(1, 1): 1}, "cannot be a Lua table key"),
        ({"a": 1, b"a": 2}, "duplicate"),
        ({"spec": 1, b"spec": 2}, "duplicate"),
    ],
)
def test_encode_bad_keys_are_refused(mapping: dict[Any, object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        dumps(mapping)


def test_encode_accepts_scalar_keys() -> None:
    value = {7: "a", -2.5: "b", True: "c", NULL: "d", "s": "e", b"\xff": "f", 2**53: "g"}
    assert same(loads(dumps(value)), value)


@pytest.mark.parametrize("value", [{1, 2}, object(), frozenset(), bytes, print])
def test_encode_unsupported_types_are_refused(value: object) -> None:
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        dumps({"k": [value]})


# ------------------------------------------------------------------ depth


def nested_dicts(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def nested_lists(depth: int) -> object:
    value: object = ["leaf"]
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_limit_counts_every_table() -> None:
    assert MAX_DEPTH == 100
    for make in (nested_dicts, nested_lists):
        ok = dumps(make(MAX_DEPTH))
        assert loads(ok) == make(MAX_DEPTH)
        with pytest.raises(LocalProtocolError, match="deeper"):
            dumps(make(MAX_DEPTH + 1))
    too_deep = h("09 01 21 6a") * MAX_DEPTH + h("08")  # the empty table is the 101st level
    with pytest.raises(RemoteProtocolError, match="deeper"):
        loads(too_deep)
    with pytest.raises(RemoteProtocolError, match="deeper"):
        loads(h("0c 02") * 100_000)  # far beyond any recursion limit: still a clean error


def test_encode_cycle_is_refused_without_recursion_error() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(LocalProtocolError, match="deeper"):
        dumps(cycle)


# ------------------------------------------------------------------ worked examples (§2.4)

INNER = h("09 04 0f 02 21 73 0f 01 25 68 65 6c 6c 6f 0f 04") + dbl(0.0) + h("0f 03 21 65")


def test_worked_example_hello() -> None:
    lua_bytes = h("09 02 23 70 69 64") + dbl(1234.0) + h("22 69 64") + dbl(0.0)
    assert len(lua_bytes) == 27
    assert same(loads(lua_bytes), {"pid": 1234, "id": 0})
    assert dumps({"pid": 1234, "id": 0}) == lua_bytes  # same key order, same bytes
    assert dumps({"id": -1, "pid": 1}).endswith(dbl(1.0))
    assert h("07 00 00 00 00 00 00 f0 bf") in dumps({"id": -1})


def test_worked_example_inner_and_outer() -> None:
    assert len(INNER) == 29
    event = {"source": "s", "data": "hello", "wid": 0, "event": "e"}
    assert dumps(event) == INNER
    assert same(loads(INNER), event)
    outer_all = h("09 02 0f 00 08 0f 01 3d") + INNER
    assert dumps({"spec": {}, "data": INNER}) == outer_all
    # The inner bytes happen to be valid UTF-8, so this Lua string decodes as str: whoever
    # forwards `data` must turn a str back into its UTF-8 bytes (which are the original ones).
    decoded = loads(outer_all)
    assert decoded == {"spec": {}, "data": INNER.decode()}
    outer_u1 = h("09 02 0f 00 09 01 0f 05 22 75 31 0f 01 3d") + INNER
    assert dumps({"spec": {"unique": "u1"}, "data": INNER}) == outer_u1
    no_data = h("09 03 0f 02 21 73 0f 04") + dbl(2.0) + h("0f 03 21 65")
    assert same(loads(no_data), {"source": "s", "wid": 2, "event": "e"})


# ------------------------------------------------------------------ decode errors


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "truncated"),
        (h("25 68 65"), "truncated"),
        (h("07 00 00"), "truncated"),
        (h("e0"), "truncated"),
        (h("ff 00 00"), "truncated"),
        (h("09 01 21 61"), "truncated"),
        (h("02 00"), "trailing"),
        (h("08 08"), "trailing"),
        (h("13"), "unknown tag 0x13"),
        (h("1f"), "unknown tag 0x1f"),
        (h("0e 00 08"), "metatable"),
        (h("0f 06"), "dictionary index 6"),
        (h("0f ff ff ff ff ff"), "dictionary index 4294967295"),
        (h("09 02 21 61 02 21 61 01"), "duplicate"),
        (h("0d 03 01 21 61 21 62") + dbl(1.0) + h("21 63"), "duplicate"),  # array vs hash
        (h("0b 02 01 21 7a 21 61") + dbl(0.0) + h("21 63"), "duplicate"),
        (h("09 02 06 01 00 00 00 21 61") + dbl(1.0) + h("21 62"), "duplicate"),  # 1 == 1.0
        (h("09 02 02 21 61") + dbl(1.0) + h("21 62"), "duplicate"),  # true vs 1: Python's fault
        (h("09 01 00 21 61"), "nil used as a table key"),
        (h("09 01") + dbl(math.nan) + h("21 61"), "NaN"),
        (h("09 01 08 21 61"), "table used as a table key"),
        (h("09 01 0c 02 02 21 61"), "table used as a table key"),
        (h("09 ff ff ff ff ff"), "claims"),  # fails fast instead of allocating 2**32 slots
        (h("0c ff ff ff ff ff 02"), "claims"),
        (h("0b ff ff ff ff ff 00"), "claims"),
        (h("ff ff ff ff ff"), "truncated"),  # a 4 GiB string announced by a 5-byte tag
    ],
)
def test_decode_errors(payload: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        loads(payload)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert loads(bytearray(b"\x25hello")) == "hello"
    assert loads(memoryview(b"xx\x25hello")[2:]) == "hello"


def test_custom_dictionary() -> None:
    assert loads(h("0f 01"), dictionary=["a", "b"]) == "b"
    with pytest.raises(RemoteProtocolError, match="index 0"):
        loads(h("0f 00"), dictionary=[])
    assert dumps({"b": 1}, dictionary=["a", "b"]) == h("09 01 0f 01") + dbl(1.0)
    assert dumps({"spec": 1}, dictionary=[]) == h("09 01 24") + b"spec" + dbl(1.0)


# ------------------------------------------------------------------ properties

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Keys: text, or bytes that are not UTF-8 (so a str and a bytes key can never be the same Lua
# string), ints and floats a double holds exactly.
non_utf8 = st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b))
keys = st.one_of(
    st.text(max_size=8),
    non_utf8,
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False),
    st.booleans(),
    st.just(NULL),
)
scalars = st.one_of(
    st.booleans(),
    st.just(NULL),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=False),
)
values: st.SearchStrategy[object] = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(keys, st.one_of(st.none(), inner), max_size=5),
    ),
    max_leaves=25,
)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def normalise(value: object) -> object:
    """What ``loads(dumps(value))`` must give back (the module docstring's mapping)."""
    if isinstance(value, bool) or value is None or value is NULL or isinstance(value, complex):
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= 2**53 and (value or math.copysign(1.0, value) > 0):
            return int(value)
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8") if _is_utf8(value) else value
    if isinstance(value, list):
        return [normalise(v) for v in value] if value else {}
    if isinstance(value, dict):
        return {normalise(k): normalise(v) for k, v in value.items() if v is not None}
    return value


@SETTINGS
@given(st.one_of(st.none(), values))
def test_property_round_trip(value: object) -> None:
    assert same(loads(dumps(value)), normalise(value))


@SETTINGS
@given(st.binary(max_size=300))
def test_property_garbage_only_raises_remote_protocol_error(data: bytes) -> None:
    try:
        loads(data)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(values, st.data())
def test_property_mutated_encodings_only_raise_remote_protocol_error(
    value: object, data: st.DataObject
) -> None:
    # Mutating valid bytes reaches much deeper into the decoder than random bytes do.
    encoded = bytearray(dumps(value))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(encoded)))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.integers(0, 255))
        if op == "set" and at < len(encoded):
            encoded[at] = byte
        elif op == "insert":
            encoded.insert(at, byte)
        elif at < len(encoded):
            del encoded[at]
    try:
        loads(encoded)
    except RemoteProtocolError:
        pass


@SETTINGS
@given(values)
def test_property_every_truncation_and_extension_is_refused(value: object) -> None:
    encoded = dumps(value)
    for end in range(len(encoded)):
        with pytest.raises(RemoteProtocolError):
            loads(encoded[:end])
    with pytest.raises(RemoteProtocolError, match="trailing"):
        loads(encoded + b"\x00")


@SETTINGS
@given(
    st.recursive(
        st.none() | st.builds(object) | st.sets(st.integers(), max_size=1) | scalars,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=3) | st.none(), inner, max_size=3)
        ),
    )
)
def test_property_encode_only_raises_local_protocol_error(value: object) -> None:
    try:
        dumps(value)
    except LocalProtocolError:
        pass
