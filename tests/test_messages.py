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
from shared.profile import NATIVE, get_profile


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
        parse_target(bad)


def test_parse_target_forms() -> None:
    assert parse_target("current").kind is TargetKind.CURRENT
    assert str(parse_target("worker:3")) == "worker:3"
    assert str(parse_target("unique:a:b")) == "unique:a:b"


# --- negotiated extensions (docs/protocol.md §8) ------------------------------------------


def test_hello_with_caps_round_trip_and_plain_hello_unchanged() -> None:
    from shared.messages import MAX_CAP_LEN, MAX_CAPS

    raw = encode_hello(NATIVE, 3, 1234, ("welcome", "barrier"))
    assert msgpack.unpackb(raw) == {"id": 3, "pid": 1234, "caps": ["welcome", "barrier"]}
    assert decode_hello(NATIVE, raw).caps == {"welcome", "barrier"}
    # no caps: the same bytes as before the extensions
    assert encode_hello(NATIVE, 3, 1234, ()) == msgpack.packb({"id": 3, "pid": 1234})
    assert decode_hello(NATIVE, encode_hello(NATIVE, 3, 1234)).caps == frozenset()
    limit = ["x" * MAX_CAP_LEN] * MAX_CAPS
    assert len(decode_hello(NATIVE, msgpack.packb({"id": 1, "pid": 2, "caps": limit})).caps) == 1


@pytest.mark.parametrize(
    ("caps", "reason"),
    [
        ("welcome", "must be a list"),
        ([1], "must be strings"),
        (["x"] * 33, "33 names, over the limit of 32"),
        (["x" * 33], "33 bytes, over the limit of 32"),
    ],
)
def test_bad_caps_are_refused_with_a_reason(caps: object, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        decode_hello(NATIVE, msgpack.packb({"id": 1, "pid": 2, "caps": caps}))


def test_kong_hello_has_no_caps() -> None:
    from shared.profile import get_profile

    kong = get_profile("kong")
    with pytest.raises(ValueError):
        encode_hello(kong, -1, 1, ("welcome",))
    assert decode_hello(kong, kong.codec.dumps({"id": 1, "pid": 2, "caps": 5})).caps == frozenset()


def test_welcome_round_trip_and_first_key() -> None:
    from shared.messages import Welcome, decode_welcome, encode_welcome

    w = Welcome(1, "workerbus 0.1.0", "native", -7, frozenset({"welcome"}), 100, 10, 2.5)
    raw = encode_welcome(NATIVE, w)
    assert next(iter(msgpack.unpackb(raw))) == "welcome"
    assert decode_welcome(NATIVE, raw) == w


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        ({"source": "s", "event": "e"}, "not a welcome"),
        ({"welcome": 1}, "missing"),
        ({"welcome": 1, "broker": "b", "profile": "native", "id": 1, "caps": [],
          "max_payload_len": 0, "max_queue_len": 1, "unique_timeout": 1}, ">= 1"),
        ({"welcome": 1, "broker": "b", "profile": "native", "id": 1, "caps": [],
          "max_payload_len": 5, "max_queue_len": 1, "unique_timeout": "x"}, "unique_timeout"),
        ({"welcome": "1", "broker": "b", "profile": "native", "id": 1, "caps": [],
          "max_payload_len": 5, "max_queue_len": 1, "unique_timeout": 1}, "version"),
    ],
)
def test_bad_welcome(msg: dict[str, object], reason: str) -> None:
    from shared.messages import decode_welcome

    with pytest.raises(RemoteProtocolError, match=reason):
        decode_welcome(NATIVE, msgpack.packb(msg))


def test_ping_pong_round_trip_and_refusals() -> None:
    from shared.messages import decode_ping, decode_pong, encode_ping, encode_pong

    assert msgpack.unpackb(encode_ping(NATIVE, 5)) == {"ping": 5}
    assert decode_ping(NATIVE, encode_ping(NATIVE, 5)) == 5
    assert decode_pong(NATIVE, encode_pong(NATIVE, 9)) == 9
    for bad in ({"ping": "5"}, {"ping": 1, "x": 2}, {"pong": 1}):
        with pytest.raises(RemoteProtocolError):
            decode_ping(NATIVE, msgpack.packb(bad))


def test_a_pong_is_a_control_frame_for_the_event_decoders() -> None:
    from shared.messages import ControlFrame, decode_event_batch, encode_pong

    good = encode_event(NATIVE, "s", "e", 1, 0)
    events, errors = decode_event_batch(NATIVE, [good, encode_pong(NATIVE, 3), good])
    assert len(events) == 2
    assert len(errors) == 1 and type(errors[0]) is ControlFrame
    assert errors[0].message == {"pong": 3}
    # a map without "source" that is no pong stays an ordinary bad event
    _, errors = decode_event_batch(NATIVE, [msgpack.packb({"ping": 3})])
    assert type(errors[0]) is RemoteProtocolError


def test_broker_reads_a_ping_only_after_the_publishes_before_it() -> None:
    # decode_publish_batch stops at the ping with everything before it decoded: the broker
    # routes those, then answers (shared/broker.py _read_loop).
    from shared.messages import decode_publish_batch, encode_ping

    pub = encode_publish(NATIVE, ALL, encode_event(NATIVE, "s", "e", 1, 0))
    runs, error = decode_publish_batch(NATIVE, [pub, pub, encode_ping(NATIVE, 1), pub])
    assert error is not None
    assert sum(len(run) for _, run in runs) == 2


_PING_NS = (0, 5, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1)


@pytest.mark.parametrize("n", _PING_NS)
def test_usual_ping_knows_every_ping_encode_ping_makes(n: int) -> None:
    from shared.messages import decode_ping, encode_ping, usual_ping

    payload = encode_ping(NATIVE, n)
    assert usual_ping(NATIVE, payload) == n == decode_ping(NATIVE, payload)


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb({"ping": -1}),
        msgpack.packb({"ping": "5"}),
        msgpack.packb({"ping": 1.5}),
        msgpack.packb({"ping": None}),
        msgpack.packb({"ping": 1, "x": 2}),
        msgpack.packb({"pong": 1}),
        msgpack.packb({"ping": 300})[:-1],  # cut short
        msgpack.packb({"ping": 300}) + b"\x00",  # a byte too many
        msgpack.packb({"ping": 5}) + b"\x00",
        b"\x81\xa4ping",
        b"",
    ],
)
def test_usual_ping_leaves_anything_else_to_the_decoders(payload: bytes) -> None:
    from shared.messages import usual_ping

    assert usual_ping(NATIVE, payload) == -1


def test_usual_ping_only_for_native_bytes() -> None:
    from shared.messages import encode_ping, usual_ping

    assert usual_ping(NATIVE, bytearray(encode_ping(NATIVE, 3))) == -1
    assert usual_ping(get_profile("kong"), encode_ping(NATIVE, 3)) == -1


def test_usual_ping_agrees_with_decode_ping_on_every_tail() -> None:
    # Every payload the shortcut accepts is a ping decode_ping reads to the same n.
    from shared.messages import decode_ping, usual_ping

    head = b"\x81\xa4ping"
    tails = [bytes([tag]) + bytes(range(1, 1 + width)) for tag in range(256) for width in (0, 1, 2, 4, 8)]
    accepted = 0
    for tail in tails:
        n = usual_ping(NATIVE, head + tail)
        if n >= 0:
            accepted += 1
            assert decode_ping(NATIVE, head + tail) == n
    assert accepted == 128 + 4  # the positive fixints, and one width for each uint tag
