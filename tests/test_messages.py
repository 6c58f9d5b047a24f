from __future__ import annotations

import msgpack
import pytest

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.messages import (
    ALL,
    OTHERS,
    Target,
    TargetKind,
    decode_event,
    decode_hello,
    decode_publish,
    encode_event,
    encode_hello,
    encode_publish,
    parse_target,
)
from shared.profile import NATIVE


def test_hello_round_trip_and_wire_shape() -> None:
    raw = encode_hello(NATIVE, 3, 1234)
    assert msgpack.unpackb(raw) == {"id": 3, "pid": 1234}
    hello = decode_hello(NATIVE, raw)
    assert (hello.worker_id, hello.pid) == (3, 1234)


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb({"id": 1}),
        msgpack.packb({"id": "1", "pid": 2}),
        msgpack.packb({"id": True, "pid": 2}),
        msgpack.packb([1, 2]),
        b"\xc1",
        b"",
    ],
)
def test_bad_hello(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_hello(NATIVE, payload)


@pytest.mark.parametrize(
    ("target", "spec"),
    [
        (ALL, {}),
        (parse_target("unique:k"), {"unique": "k"}),
        (parse_target("worker:2"), {"worker": 2}),
        (parse_target(5), {"worker": 5}),
        (OTHERS, {"others": True}),
    ],
)
def test_publish_specs(target: Target, spec: dict[str, object]) -> None:
    inner = encode_event(NATIVE, "s", "e", {"a": 1}, 0)
    outer = encode_publish(NATIVE, target, inner)
    assert msgpack.unpackb(outer) == {"spec": spec, "data": inner}
    assert decode_publish(NATIVE, outer) == (target, inner)


@pytest.mark.parametrize(
    "msg",
    [
        {"data": b"x"},
        {"spec": {}},
        {"spec": {}, "data": "text"},
        {"spec": {}, "data": {"a": 1}},
        {"spec": [], "data": b"x"},
        {"spec": {"unique": ""}, "data": b"x"},
        {"spec": {"worker": "1"}, "data": b"x"},
        {"spec": {"others": False}, "data": b"x"},
        {"spec": {"bogus": 1}, "data": b"x"},
        {"spec": {}, "data": b"x", "extra": 1},
    ],
)
def test_bad_publish(msg: dict[str, object]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_publish(NATIVE, msgpack.packb(msg, use_bin_type=True))


def test_text_data_is_refused_in_native_but_not_a_crash() -> None:
    # msgpack str where bin belongs: refused, since native data must be bin.
    with pytest.raises(RemoteProtocolError):
        decode_publish(NATIVE, msgpack.packb({"spec": {}, "data": "x"}, use_bin_type=True))


def test_event_round_trip_and_absent_data() -> None:
    raw = encode_event(NATIVE, "s", "e", None, 7)
    assert msgpack.unpackb(raw) == {"source": "s", "event": "e", "wid": 7}
    ev = decode_event(NATIVE, raw)
    assert (ev.source, ev.event, ev.data, ev.wid) == ("s", "e", None, 7)
    with pytest.raises(LocalProtocolError, match="MessagePack"):
        encode_event(NATIVE, "s", "e", object(), 0)
    with pytest.raises(RemoteProtocolError):
        decode_event(NATIVE, msgpack.packb({"source": 1, "event": "e"}))


@pytest.mark.parametrize("bad", ["", "any", "worker:x", "unique:", 1.5, True])
def test_parse_target_rejects(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_target(bad)  # type: ignore[arg-type]


def test_parse_target_forms() -> None:
    assert parse_target("current").kind is TargetKind.CURRENT
    assert str(parse_target("worker:3")) == "worker:3"
    assert str(parse_target("unique:a:b")) == "unique:a:b"
