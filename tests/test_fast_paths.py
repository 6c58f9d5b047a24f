"""Every fast path behaves exactly like the slow reference in tests/reference.py.

The references are written for clarity (plain codec calls and schema checks, no shortcuts);
each fast path is held to them on many generated inputs, never to another fast path:

- encode_publish, build_publish_frame: publishes built by concatenation;
- decode_publish_batch (the one recogniser of the usual publish) and decode_publish;
- decode_event_batch / decode_event_fields: the one event decoder; decode_event_objects
  (the same for unframed deliveries) and MsgpackStreamDecoder (bare objects on any
  chunking) against the codec's loads, payload by payload;
- FrameDecoder's parse loop, and encode_frame;
- Dispatcher.run and Dispatcher.dispatch against a plain level-by-level dispatch;
- EmbeddedClient's numbered encoder and its checked batch decoder (the sequence check
  against reference.SequenceCheck);
- MsgpackCodec.dumps: pooled packers;
- WorkerQueue.push_many, Router.route_many, WorkerQueue.take_batch: whole runs per queue;
- Dispatcher.push_many + wait_room: the bounded hand-over delivers what an unbounded inbox does.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any

import anyio
import anyio.lowlevel
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codec import MsgpackCodec, MsgpackStreamDecoder
from shared.dispatch import Dispatcher
from shared.errors import LocalProtocolError, PayloadTooLarge, RemoteProtocolError
from shared.frame import FrameDecoder, encode_frame
from shared.messages import (
    ALL,
    OTHERS,
    ControlFrame,
    Event,
    Target,
    TargetKind,
    build_publish,
    build_publish_frame,
    decode_event_batch,
    decode_event_fields,
    decode_event_objects,
    decode_publish,
    decode_publish_batch,
    encode_event,
    encode_publish,
    encode_publish_keyed,
    parse_target,
    publish_encoder,
)
from shared.profile import NATIVE, get_profile
from shared.router import OverflowPolicy, Router, WorkerQueue
from tests import reference

SIZES = [0, 1, 13, 200, 255, 256, 257, 1000, 65535, 65536, 70000]


# --- publish messages --------------------------------------------------------------------
# Every fast path against tests/reference.py (plain codec + schema checks), never against
# another fast path.


def _ref_or_error(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ControlFrame as exc:
        return ("control", exc.kind)
    except RemoteProtocolError:
        return "error"


def _or_error(fn: Any, *args: Any) -> Any:
    return _ref_or_error(fn, *args)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("target", [ALL, OTHERS], ids=["all", "others"])
def test_encode_publish_is_what_msgpack_makes(size: int, target: Any) -> None:
    inner = random.Random(size).randbytes(size)
    spec = {} if target is ALL else {"others": True}
    assert encode_publish(NATIVE, target, inner) == msgpack.packb({"spec": spec, "data": inner}, use_bin_type=True)
    assert encode_publish(NATIVE, target, inner) == reference.encode_publish(NATIVE, target, inner)


_TARGETS = st.sampled_from(
    [ALL, OTHERS, parse_target("worker:3"), parse_target("unique:k"), ALL.with_scope("cluster"),
     OTHERS.with_scope("cluster"), parse_target("unique:k").with_scope("cluster")]
)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(target=_TARGETS, size=st.sampled_from(SIZES) | st.integers(0, 600), kong=st.booleans())
def test_encode_publish_is_the_reference(target: Any, size: int, kong: bool) -> None:
    profile = get_profile("kong") if kong else NATIVE
    inner = bytes(size)
    try:
        expected: Any = reference.encode_publish(profile, target, inner)
    except ValueError:
        expected = "refused"
    try:
        got: Any = encode_publish(profile, target, inner)
    except ValueError:
        got = "refused"
    assert got == expected


def _variants(good: bytes) -> list[bytes]:
    # the bytes of a publish, and near misses of them: cut, lengthened, a wrong length
    out = [good, good + b"x", good[:-1], good[:13], good[:12], good[:1]]
    for i in (12, 13, 14, 19, 20, 21):
        if i < len(good):
            out.append(good[:i] + bytes([(good[i] + 1) % 256]) + good[i + 1 :])
    return out


@pytest.mark.parametrize("size", [s for s in SIZES if s < 65000])
@pytest.mark.parametrize("target", [ALL, OTHERS], ids=["all", "others"])
def test_decode_publish_batch_recognises_what_the_reference_decodes(size: int, target: Any) -> None:
    inner = random.Random(size).randbytes(size)
    good = encode_publish(NATIVE, target, inner)
    assert decode_publish(NATIVE, good) == (target, inner)
    for payload in _variants(good):
        _check_publish_batch(NATIVE, [payload])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_decode_publish_batch_agrees_on_noise_after_the_head(tail: bytes) -> None:
    for head in (b"\x82\xa4spec\x80\xa4data", b"\x82\xa4spec\x81\xa6others\xc3\xa4data"):
        _check_publish_batch(NATIVE, [head + tail])


def _check_publish_batch(profile: Any, payloads: list[bytes]) -> None:
    runs, error = decode_publish_batch(profile, payloads)
    flat = [(t, f) for t, run in runs for f in run]
    expected, stopped = reference.decode_publish_batch(profile, payloads)
    assert flat == expected
    assert (error is not None) == stopped
    # runs of the usual targets are maximal (others are cut per decoded, equal target)
    assert all(runs[i][0] is not runs[i + 1][0] or runs[i][0] not in (ALL, OTHERS) for i in range(len(runs) - 1))
    # (a transport may hand over bytearray slices: the same frames, as bytes)
    runs_ba, error_ba = decode_publish_batch(profile, [bytearray(p) for p in payloads])
    assert [(t, f) for t, run in runs_ba for f in run] == expected
    assert all(type(f) is bytes for _, run in runs_ba for f in run)
    assert (error_ba is not None) == stopped
    for payload in payloads:  # and decode_publish, one by one, is the reference too
        assert _or_error(decode_publish, profile, payload) == _ref_or_error(reference.decode_publish, profile, payload)


def _reference_keyed(payload: bytes) -> Any:
    # A keyed publish is a plain one plus "src"/"ev" (docs/protocol.md §8).
    try:
        msg = msgpack.unpackb(payload)
    except ValueError:
        return "error"
    key = None
    if isinstance(msg, dict) and "src" in msg:
        key = (msg.pop("src"), msg.pop("ev"))
    try:
        target, data = reference.decode_publish(NATIVE, msgpack.packb(msg))
    except RemoteProtocolError:
        return "error"
    return target, reference.frame(data, NATIVE.header_len), key


@pytest.mark.parametrize("seed", range(30))
def test_decode_publish_batch_keyed_is_the_reference(seed: int) -> None:
    # Runs of keyed publishes (repeated and changing src/ev, fixstr and str8 names, plain
    # publishes among them, a cut one): the same frames, keys and first error.
    rng = random.Random(seed)
    names = ["s", "s2", "é" * 3, "n" * 31, "n" * 32, "x" * 200]
    payloads = []
    for i in range(rng.randint(1, 40)):
        source, event = rng.choice(names[:3]), rng.choice(names)
        inner = encode_event(NATIVE, source, event, {"i": i, "pad": "x" * rng.choice([0, 10, 300])}, 1)
        target = rng.choice([ALL, OTHERS, parse_target("unique:k")])
        if rng.random() < 0.2:
            payloads.append(encode_publish(NATIVE, target, inner))
        else:
            payloads.append(encode_publish_keyed(NATIVE, target, inner, source, event))
    if rng.random() < 0.3:
        where = rng.randrange(len(payloads))
        payloads[where] = payloads[where][: rng.randrange(1, len(payloads[where]))]
    keys: list[Any] = []
    runs, error = decode_publish_batch(NATIVE, payloads, keys)
    got = [(t, f, None if rk is None else rk.key_of(i))
           for (t, run), rk in zip(runs, keys, strict=True) for i, f in enumerate(run)]  # fmt: skip
    # a run ends where the target changes, not where src/ev do
    assert all(a[0] is not b[0] for a, b in zip(runs, runs[1:], strict=False))
    assert all(rk is None or (len(set(rk.names)) == len(rk.names) and len(rk.index) == len(run))
               for (_, run), rk in zip(runs, keys, strict=True))  # fmt: skip
    expected = []
    for payload in payloads:
        one = _reference_keyed(payload)
        if one == "error":
            break
        expected.append(one)
    assert got == expected
    assert (error is not None) == (len(expected) < len(payloads))


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "plain"])
@pytest.mark.parametrize("target", [ALL, OTHERS], ids=["all", "others"])
def test_decode_publish_batch_shortcut_on_every_cut(target: Any, keyed: bool) -> None:
    # The shortcut knows a publish of a run after its first by its head and its length (or
    # a tail already seen in the run): a publish cut at any length after such ones (or
    # with a bin8 length that does not match, or followed by more bytes) must come out as
    # the reference decodes it.
    inner = encode_event(NATIVE, "s", "e", {"i": 1}, 1)
    if keyed:
        good = encode_publish_keyed(NATIVE, target, inner, "s", "e")
        other = encode_publish_keyed(NATIVE, target, inner, "s2", "e")
    else:
        good = other = encode_publish(NATIVE, target, inner)
    head = good.index(inner) - 1  # the bin8 length byte
    bad_len = [good[:head] + bytes([n]) + good[head + 1 :] for n in (0, len(inner) - 1, len(inner) + 1, 255)]
    for odd in [good[:cut] for cut in range(len(good))] + bad_len + [good + b"\xc0", good + good]:
        payloads = [good, other, odd, good]
        if not keyed:
            _check_publish_batch(NATIVE, payloads)
            continue
        keys: list[Any] = []
        runs, error = decode_publish_batch(NATIVE, payloads, keys)
        got = [(t, f, None if rk is None else rk.key_of(i))
               for (t, run), rk in zip(runs, keys, strict=True) for i, f in enumerate(run)]  # fmt: skip
        expected = []
        for payload in payloads:
            one = _reference_keyed(payload)
            if one == "error":
                break
            expected.append(one)
        assert got == expected, odd
        assert (error is not None) == (len(expected) < len(payloads))


def _publishes(profile: Any, rng: random.Random, count: int) -> list[bytes]:
    targets = [ALL, parse_target("unique:k")]
    if profile.extended_targets:
        targets += [OTHERS, parse_target("worker:3"), OTHERS.with_scope("cluster")]
    # (70000: a long event the kong frame holds; every payload here came in one frame)
    pads = [0, 10, 300, 70000] if profile.header_len == 3 else [0, 10, 300, 65000]
    out = []
    for i in range(count):
        inner = encode_event(profile, "s", "e", {"i": i, "pad": "x" * rng.choice(pads)}, 1)
        out.append(encode_publish(profile, rng.choice(targets), inner))
    return out


@pytest.mark.parametrize("kong", [False, True], ids=["native", "kong"])
@pytest.mark.parametrize("seed", range(20))
def test_decode_publish_batch_is_the_reference_in_runs(seed: int, kong: bool) -> None:
    profile = get_profile("kong") if kong else NATIVE
    rng = random.Random(seed)
    payloads = _publishes(profile, rng, rng.randint(0, 40))
    if payloads and rng.random() < 0.5:
        payloads[rng.randrange(len(payloads))] = b"\xc1"  # never valid MessagePack
    _check_publish_batch(profile, payloads)


# --- building a publish -----------------------------------------------------------------


def _build_or_refusal(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except PayloadTooLarge as exc:
        return ("too large", exc.args)
    except (ValueError, LocalProtocolError) as exc:
        return ("refused", type(exc).__name__)


def _reference_publish_frame(profile: Any, wid: int, source: Any, event: Any, data: Any, target: Any, limit: int) -> Any:
    if not isinstance(source, str) or not source or not isinstance(event, str) or not event:
        raise ValueError("source and event must be non-empty strings")
    outer = reference.encode_publish(profile, target, reference.encode_event(profile, source, event, data, wid))
    if len(outer) > limit:
        raise PayloadTooLarge(len(outer), limit)
    return reference.frame(outer, profile.header_len)


def _reference_keyed_publish_frame(profile: Any, wid: int, source: Any, event: Any, data: Any, target: Any, limit: int) -> Any:
    # The plain publish's checks, then {"spec", "data", "src", "ev"} within the limit too.
    plain = _reference_publish_frame(profile, wid, source, event, data, target, limit)
    msg = msgpack.unpackb(plain[profile.header_len :])
    msg["src"], msg["ev"] = source, event
    outer = msgpack.packb(msg)
    if len(outer) > limit:
        raise PayloadTooLarge(len(outer), limit)
    return reference.frame(outer, profile.header_len)


_ENCODERS: dict[tuple[bool, int, bool], Any] = {}


@settings(max_examples=400, deadline=None)
@given(
    target=_TARGETS,
    data=_VALUES | st.binary(min_size=200, max_size=300) | st.sampled_from(["y" * 70000, b"z" * 250]),
    source=st.sampled_from(["src", "", "s" * 300]),
    event=st.sampled_from(["ev", "e" * 40, "é" * 20]),
    limit=st.sampled_from([65535, 60, 300, 64, 70]),
    kong=st.booleans(),
    keyed=st.booleans(),
)
def test_build_publish_frame_is_the_reference(
    target: Any, data: Any, source: str, event: str, limit: int, kong: bool, keyed: bool
) -> None:
    profile = get_profile("kong") if kong else NATIVE
    keyed = keyed and not kong  # (only a native client is ever granted the filter)
    args = (profile, 3, source, event, data, target, limit)
    reference_frame = _reference_keyed_publish_frame if keyed else _reference_publish_frame
    expected = _build_or_refusal(reference_frame, *args)
    assert _build_or_refusal(build_publish_frame, *args, keyed) == expected
    # and a client's encoder of these settings, with what it kept from earlier examples
    encode = _ENCODERS.get((kong, limit, keyed))
    if encode is None:
        encode = _ENCODERS[(kong, limit, keyed)] = publish_encoder(profile, 3, limit, keyed)
    assert _build_or_refusal(encode, source, event, data, target) == expected
    if keyed:
        return
    if not isinstance(expected, tuple):
        inner, outer = build_publish(*args)
        assert reference.frame(outer, profile.header_len) == expected


def test_build_publish_frame_refuses_what_build_publish_refuses() -> None:
    for source, event in (("", "e"), ("s", ""), (1, "e")):
        with pytest.raises(ValueError, match="non-empty strings"):
            build_publish_frame(NATIVE, 1, source, event, None, ALL, 65535)
    with pytest.raises(LocalProtocolError):
        build_publish_frame(NATIVE, 1, "s", "e", object(), ALL, 65535)


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_publish_encoder_is_the_reference() -> None:
    # Once a (source, event) went through, a publish of it packs only its data: the same
    # bytes and refusals for every wid and target, around msgpack's nesting limit, at and
    # over the one-byte length of the short path and the payload limit, plain and keyed.
    values: list[Any] = [_nested(d) for d in (1, 200, 240, 509, 510, 511, 512)]
    values += [None, "x" * 200, "x" * 300, b"y" * 250, {"a": 1}, object(), 2**70, {"é": ["ü" * 40]}]
    values += ["z" * n for n in range(180, 240, 3)]
    names = [("cached", "parts"), ("c" * 40, "é" * 20), ("s" * 300, "e"), ("", "e"), ("s", "\ud800")]
    for keyed in (False, True):
        reference_frame = _reference_keyed_publish_frame if keyed else _reference_publish_frame
        for wid in (0, 3, 127, 128, -1, 2**40, -(2**63), 2**64 - 1, 2**64):
            for limit in (65535, 250, 120, 90):
                encode = publish_encoder(NATIVE, wid, limit, keyed)
                for source, event in names:
                    for target in (ALL, OTHERS, Target(TargetKind.WORKER, worker_id=2)):
                        for data in values:
                            args = (NATIVE, wid, source, event, data, target, limit)
                            expected = _build_or_refusal(reference_frame, *args)
                            for _ in range(2):  # (the first may fill the encoder's cache)
                                assert _build_or_refusal(encode, source, event, data, target) == expected
    # kong: build_publish_frame's
    kong = get_profile("kong")
    encode = publish_encoder(kong, -1, 65536)
    for data in values[7:12]:
        args = (kong, -1, "s", "e", data, ALL, 65536)
        assert _build_or_refusal(encode, "s", "e", data, ALL) == _build_or_refusal(_reference_publish_frame, *args)


@pytest.mark.parametrize("keyed", [False, True])
def test_publish_encoder_reentry_and_errors(keyed: bool) -> None:
    # Its own packer is taken out while in use: a publish made while packing (here from a
    # dict subclass's items()) gets the same bytes the long way, and so does the outer one;
    # after a refusal or a foreign error the encoder carries on with a fresh packer.
    reference_frame = _reference_keyed_publish_frame if keyed else _reference_publish_frame
    encode = publish_encoder(NATIVE, 5, 65535, keyed)
    inner_frames: list[bytes] = []

    class Publishing(dict[str, Any]):
        def items(self) -> Any:
            inner_frames.append(encode("s", "e", {"inner": 1}, OTHERS))
            return super().items()

    class Failing(dict[str, Any]):
        def items(self) -> Any:
            raise RuntimeError("items failed")

    def expect(data: Any) -> Any:
        return reference_frame(NATIVE, 5, "s", "e", data, OTHERS, 65535)

    assert encode("s", "e", {"warm": 1}, OTHERS) == expect({"warm": 1})
    assert encode("s", "e", Publishing(a=1), OTHERS) == expect({"a": 1})
    assert inner_frames == [expect({"inner": 1})]
    with pytest.raises(LocalProtocolError):
        encode("s", "e", {"x": object()}, OTHERS)
    with pytest.raises(RuntimeError, match="items failed"):
        encode("s", "e", Failing(a=1), OTHERS)
    for i in range(3):
        assert encode("s", "e", {"i": i}, OTHERS) == expect({"i": i})


# --- decoding deliveries ----------------------------------------------------------------

_EVENT_MAPS = st.fixed_dictionaries(
    {},
    optional={
        "source": st.sampled_from(["s", "", "workerbus"]) | st.integers(0, 3),
        "event": st.sampled_from(["e", "dropped"]) | st.none(),
        "data": _VALUES,
        "wid": st.integers(-5, 2**40) | st.sampled_from([2.0, 2.5, True, None, "3"]),
        "node": st.sampled_from(["n1", 7]),
        "pong": st.integers(0, 5),
    },
)


def _event_payloads(kong: bool) -> Any:
    profile = get_profile("kong") if kong else NATIVE
    dumps = MsgpackCodec().dumps if not kong else profile.codec.dumps
    return st.lists(
        _EVENT_MAPS.map(dumps) | st.binary(max_size=12) | st.sampled_from([b"\xc1", b"", b"\x92\x01\x02"]),
        max_size=12,
    )


def _check_event_batch(profile: Any, payloads: list[bytes]) -> None:
    expected = [_ref_or_error(reference.decode_event, profile, p) for p in payloads]
    events, errors = decode_event_batch(profile, payloads)
    good = [e for e in expected if isinstance(e, tuple) and e[0] != "control"]
    assert events == good
    # a NodeWid says which node: the same one
    assert [getattr(e[3], "node", None) for e in events] == [getattr(e[3], "node", None) for e in good]
    assert len(errors) == len(payloads) - len(good)
    kinds = [e for e in expected if not (isinstance(e, tuple) and e[0] != "control")]
    assert [("control", e.kind) if isinstance(e, ControlFrame) else "error" for e in errors] == kinds
    for payload, want in zip(payloads, expected, strict=True):
        assert _or_error(decode_event_fields, profile, payload) == want


@settings(max_examples=400, deadline=None)
@given(_event_payloads(kong=False))
def test_decode_event_batch_is_the_reference(payloads: list[bytes]) -> None:
    _check_event_batch(NATIVE, payloads)


def _check_event_objects(payloads: list[bytes]) -> None:
    # What the connection's Unpacker hands over is what the codec makes of each payload;
    # the unframed decode of those objects must be the framed decode of the payloads.
    objects = []
    decodable = []
    for payload in payloads:
        try:
            objects.append(NATIVE.codec.loads(payload))
        except RemoteProtocolError:
            continue
        decodable.append(payload)
    framed_events, framed_errors = decode_event_batch(NATIVE, decodable)
    events, errors = decode_event_objects(objects)
    assert events == framed_events
    assert [getattr(e[3], "node", None) for e in events] == [getattr(e[3], "node", None) for e in framed_events]
    assert [type(e) for e in errors] == [type(e) for e in framed_errors]
    assert [getattr(e, "kind", None) for e in errors] == [getattr(e, "kind", None) for e in framed_errors]


@settings(max_examples=400, deadline=None)
@given(_event_payloads(kong=False))
def test_decode_event_objects_is_the_reference(payloads: list[bytes]) -> None:
    _check_event_batch(NATIVE, payloads)  # (the framed decode is the reference's)
    _check_event_objects(payloads)


def _stream_reference(payloads: list[bytes]) -> tuple[list[object], bool]:
    # Back-to-back payloads read one by one with the codec: the objects up to the first
    # one it refuses, and whether there was one.
    out = []
    for payload in payloads:
        try:
            out.append(NATIVE.codec.loads(payload))
        except RemoteProtocolError:
            return out, True
    return out, False


def _feed_all(decoder: MsgpackStreamDecoder, data: bytes, cuts: list[int]) -> tuple[list[object], bool]:
    out: list[object] = []
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    try:
        for start, stop in zip(bounds, bounds[1:], strict=False):
            out += decoder.feed(data[start:stop])
        decoder.feed(b"")  # a latched error shows on the next call
    except RemoteProtocolError:
        return out, True
    return out, False


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        _EVENT_MAPS.map(MsgpackCodec().dumps)
        | st.sampled_from([b"\xc1", b"\xd4\x01\x00", b"\x81\x01\x02", MsgpackCodec().dumps("x" * 300)]),
        max_size=12,
    ),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.sampled_from([16, 100, 65535]),
)
def test_stream_decoder_is_the_codec_on_any_chunking(payloads: list[bytes], cuts: list[int], limit: int) -> None:
    # (every payload here is a whole object or bytes no object can start with, so the
    # reference knows where each begins; 0xc1 never occurs, an ext and an int key are refused)
    expected, bad = _stream_reference(payloads)
    sizes = [len(p) for p in payloads[: len(expected) + (1 if bad else 0)]]
    got, failed = _feed_all(MsgpackStreamDecoder(limit), b"".join(payloads), cuts)
    over = [i for i, size in enumerate(sizes) if size > limit]
    if not over:
        assert (got, failed) == (expected, bad)
        return
    # Over the limit: everything before the first such object passes; one of up to 1.5x
    # the limit may pass too (the check is per piece of limit // 4); a larger one never.
    assert got == expected[: len(got)] and len(got) >= over[0]
    never = [i for i, size in enumerate(sizes) if size > limit + 2 * (limit // 4)]
    if never:
        assert failed and len(got) <= never[0]


def test_stream_decoder_limit_and_end_of_stream() -> None:
    pack = MsgpackCodec().dumps
    at_limit = pack("x" * 98)  # 100 bytes
    assert len(at_limit) == 100
    decoder = MsgpackStreamDecoder(100)
    data = at_limit + pack({"a": 1}) + at_limit
    got = []
    for i in range(len(data)):  # byte by byte: the worst chunking
        got += decoder.feed(data[i : i + 1])
    assert got == ["x" * 98, {"a": 1}, "x" * 98]
    decoder.eof()  # between objects: a clean end
    # An array that never ends is refused once 1.25x the limit arrived, not later.
    decoder = MsgpackStreamDecoder(100)
    with pytest.raises(RemoteProtocolError, match="over the limit of 100 bytes"):
        for _ in range(200):
            decoder.feed(b"\x91")
    # Ending inside an object is an error; so is every call after an error.
    decoder = MsgpackStreamDecoder(100)
    assert decoder.feed(pack({"a": 1}) + at_limit[:50]) == [{"a": 1}]
    with pytest.raises(RemoteProtocolError, match="inside a delivery"):
        decoder.eof()
    with pytest.raises(RemoteProtocolError):
        decoder.feed(at_limit[50:])


def test_decode_event_batch_on_known_cases() -> None:
    pack = MsgpackCodec().dumps
    payloads = [
        encode_event(NATIVE, "s", "e", {"a": 1}, 4),
        encode_event(NATIVE, "s", "e", None, None),
        pack({"source": "s", "event": "e", "wid": 2.0}),  # a Lua number: accepted as 2
        pack({"source": "s", "event": "e", "wid": True}),
        pack({"source": "s"}),
        pack({"event": "e"}),
        pack([1, 2]),
        pack({"source": 1, "event": "e"}),
        pack({"pong": 1}),
        pack({"source": "s", "event": "e", "wid": 3, "node": "n"}),
        b"\xc1",
        b"",
        encode_event(NATIVE, "workerbus", "dropped", {"count": 3}, None),
    ]
    _check_event_batch(NATIVE, payloads)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["s", "t"]), st.sampled_from(["e", "f"]), _VALUES.filter(lambda v: not isinstance(v, float)), st.none() | st.integers(0, 100)), max_size=8))
def test_decode_event_batch_in_the_kong_profile(events: list[Any]) -> None:
    kong = get_profile("kong")
    payloads = []
    for source, event, data, wid in events:
        try:
            payloads.append(encode_event(kong, source, event, data, wid))
        except LocalProtocolError:
            continue  # (a value the Lua codec cannot hold)
    _check_event_batch(kong, payloads)


# --- the frame decoder's parse loop -----------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    header_len=st.sampled_from([2, 3]),
    payloads=st.lists(st.binary(max_size=300) | st.sampled_from([b"", bytes(1500)]), max_size=12),
    tail=st.binary(max_size=5),
    max_frame_len=st.sampled_from([None, 200, 1000]),
    cuts=st.lists(st.integers(0, 5000), max_size=8),
)
def test_frame_decoder_is_the_reference(
    header_len: int, payloads: list[bytes], tail: bytes, max_frame_len: int | None, cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(p, header_len) for p in payloads) + tail
    limit = (1 << (8 * header_len)) - 1 if max_frame_len is None else max_frame_len
    expected, outcome = reference.parse_frames(stream, header_len, limit)
    dec = FrameDecoder(header_len, max_frame_len)
    got: list[bytes] = []
    raised = False
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    try:
        for start, stop in zip(bounds, bounds[1:], strict=False):  # any chunking of the stream
            got += dec.feed(stream[start:stop])
        dec.eof()
    except RemoteProtocolError:
        raised = True
    assert got == expected
    assert raised == (outcome != "ok")
    assert [encode_frame(p, header_len) for p in payloads] == [reference.frame(p, header_len) for p in payloads]


# --- the codec's packer pool ------------------------------------------------------------


class _Sneaky(dict[str, Any]):
    """A dict whose items() packs something else first: a re-entrant dumps."""

    def __init__(self, codec: MsgpackCodec, *args: Any) -> None:
        super().__init__(*args)
        self.codec = codec
        self.inner: bytes = b""

    def items(self) -> Any:
        self.inner = self.codec.dumps({"inner": [1, 2, 3]})
        return super().items()


def test_pooled_packer_recovers_from_errors_and_reentry() -> None:
    codec = MsgpackCodec()
    value = {"source": "s", "event": "e", "data": [1, {"x": b"y"}], "wid": 3}
    assert codec.dumps(value) == msgpack.packb(value, use_bin_type=True)
    with pytest.raises(LocalProtocolError):
        codec.dumps({"a": [1, object()]})
    assert codec.dumps(value) == msgpack.packb(value, use_bin_type=True)
    sneaky = _Sneaky(codec, {"k": "v"})
    out = codec.dumps({"outer": sneaky})
    assert msgpack.unpackb(out) == {"outer": {"k": "v"}}
    assert msgpack.unpackb(sneaky.inner) == {"inner": [1, 2, 3]}
    assert codec.dumps(value) == msgpack.packb(value, use_bin_type=True)


# --- queues and routing -----------------------------------------------------------------


def _reference_take(frames: deque[bytes], max_bytes: int) -> list[bytes]:
    batch: list[bytes] = []
    size = 0
    while frames and (not batch or size + len(frames[0]) <= max_bytes):
        frame = frames.popleft()
        size += len(frame)
        batch.append(frame)
    return batch


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=3000), max_size=400),
    max_bytes=st.integers(min_value=1, max_value=20000),
)
def test_take_batch_takes_what_fits_like_the_plain_loop(sizes: list[int], max_bytes: int) -> None:
    frames = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    queue = WorkerQueue(0, 10**9, expected=False, now=0.0)
    queue.frames.extend(frames)
    reference = deque(frames)
    while queue.frames or reference:
        batch = queue.take_batch(max_bytes)
        assert batch == _reference_take(reference, max_bytes)
        assert queue.in_flight == len(batch)
        queue.mark_sent(len(batch))


def _state(router: Router) -> Any:
    stats = router.statistics()
    return stats, {wid: list(q.frames) for wid, q in router.queues.items()}


@pytest.mark.parametrize("policy", list(OverflowPolicy))
@pytest.mark.parametrize("seed", range(12))
def test_route_many_is_route_frame_by_frame(policy: OverflowPolicy, seed: int) -> None:
    rng = random.Random(seed)
    max_len = rng.choice([1, 3, 10, 1000])
    one, many = (
        Router(max_queue_len=max_len, expected_workers=4, overflow=policy, rng=random.Random(seed))
        for _ in range(2)
    )
    taps: list[list[Any]] = [[], []]
    for r, log in ((one, taps[0]), (many, taps[1])):
        for wid in range(4):
            r.attach(wid)
        r.taps.append(lambda *a, log=log: log.append(a))
    for step in range(30):
        target = rng.choice([ALL, OTHERS, parse_target("worker:1"), parse_target(f"unique:{step % 3}")])
        publisher = rng.choice([0, 1, None])
        frames = [f"{step}.{i}".encode() for i in range(rng.randint(1, 8))]
        landed_one = sum(one.route(publisher, target, f) for f in frames)
        landed_many = many.route_many(publisher, target, frames)
        assert landed_one == landed_many
        if rng.random() < 0.3:  # a writer drains one queue, the same way in both
            wid, max_bytes = rng.choice([0, 1, 2, 3]), rng.choice([5, 50, 1000])
            for r in (one, many):
                q = r.queues[wid]
                q.mark_sent(len(q.take_batch(max_bytes)))
        assert _state(one) == _state(many), step
    assert taps[0] == taps[1]


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(list(OverflowPolicy)),
    max_len=st.integers(1, 8),
    before=st.integers(0, 12),
    run=st.integers(1, 20),
)
def test_push_many_over_a_full_queue_is_push_frame_by_frame(
    policy: OverflowPolicy, max_len: int, before: int, run: int
) -> None:
    # ``before`` may exceed max_len: a failed write's put_back can overfill a queue.
    frames = [b"%d" % i for i in range(run)]
    one, many = (WorkerQueue(0, max_len, expected=False, now=0.0) for _ in range(2))
    wakes = [0, 0]
    for i, q in enumerate((one, many)):
        q.frames.extend(b"old%d" % j for j in range(before))
        q.wakeup = lambda i=i: wakes.__setitem__(i, wakes[i] + 1)
    landed = sum(one.push(f, policy) for f in frames)
    assert many.push_many(frames, policy) == landed
    assert list(many.frames) == list(one.frames)
    assert (many.routed, many.enqueued, many.dropped, many.dropped_unreported) == (
        one.routed, one.enqueued, one.dropped, one.dropped_unreported,
    )
    assert wakes[0] == wakes[1]


# --- the dispatcher ---------------------------------------------------------------------


def _dispatch_scenario(seed: int, mode: str) -> Any:
    rng = random.Random(seed)
    d = Dispatcher(1000)
    calls: list[tuple[str, str]] = []
    keys = [("*", "*"), ("s", "*"), ("s", "e"), ("s", "f")]
    ids: dict[str, str] = {}
    made = [0]

    def make(name: str) -> Any:
        action = rng.choice(["none", "none", "subscribe", "unsubscribe", "raise", "async"])
        target = rng.choice(keys)
        pick = rng.random()

        def handler(data: Any, event: str, source: str, wid: int | None) -> Any:
            calls.append((name, event))
            if action == "subscribe" and made[0] < 30:
                made[0] += 1
                ids[f"{name}+{made[0]}"] = d.subscribe(*target, make(f"{name}+{made[0]}"))
            elif action == "unsubscribe" and ids:
                d.unsubscribe(ids.pop(sorted(ids)[int(pick * len(ids))]))
            elif action == "raise":
                raise RuntimeError("handler failure (expected by the test)")
            elif action == "async":

                async def later() -> None:
                    calls.append((name, "awaited"))

                return later()
            return None

        return handler

    for i in range(rng.randint(1, 6)):
        ids[f"h{i}"] = d.subscribe(*rng.choice(keys), make(f"h{i}"))
    # (a literal "*" source or event: its levels coincide and must run once)
    events = [Event(rng.choice(["s", "s", "*"]), rng.choice(["e", "f", "g", "*"]), None, 1) for _ in range(5)]

    async def main() -> None:
        if mode == "reference":  # tests/reference.py over the dispatcher's subscriptions
            for ev in events:
                failed[0] += await reference.dispatch(d._subscriptions, (ev.source, ev.event, ev.data, ev.wid))
            return
        if mode == "dispatch":
            for ev in events:
                await d.dispatch(ev)
            return
        if mode == "take":  # the client's reader: handlers run in its task while the loop idles
            cuts = random.Random(seed + 1)
            fields = [(ev.source, ev.event, ev.data, ev.wid) for ev in events]
            async with anyio.create_task_group() as tg:
                tg.start_soon(d.run)
                with anyio.fail_after(5):
                    while fields:
                        size = cuts.randint(1, len(fields))
                        assert d.take(fields[:size]) == size
                        del fields[:size]
                        if cuts.random() < 0.7:  # else the next read finds the loop busy
                            while d.depth or d.busy:
                                await anyio.lowlevel.checkpoint()
                    while d.depth or d.busy:
                        await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            return
        for ev in events:
            d.push(ev)
        async with anyio.create_task_group() as tg:
            tg.start_soon(d.run)
            with anyio.fail_after(5):
                while d.depth or d.busy:
                    await anyio.lowlevel.checkpoint()
            tg.cancel_scope.cancel()

    failed = [0]
    anyio.run(main)
    if mode == "reference":
        return calls, failed[0], len(events)
    return calls, d.handler_errors, d.delivered


def test_run_and_dispatch_call_handlers_like_the_reference(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="shared.dispatch")
    for seed in range(400):
        expected = _dispatch_scenario(seed, "reference")
        assert _dispatch_scenario(seed, "run") == expected, seed
        assert _dispatch_scenario(seed, "dispatch") == expected, seed
        assert _dispatch_scenario(seed, "take") == expected, seed


@pytest.mark.anyio
async def test_push_many_takes_what_fits_and_drops_nothing() -> None:
    d = Dispatcher(3)
    seen: list[str] = []
    d.subscribe("*", "*", lambda data, event, source, wid: seen.append(event))
    events = [("s", str(i), None, 1) for i in range(5)]
    assert d.push_many(events) == 3
    assert (d.dropped, d.depth, d.full) == (0, 3, True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        with anyio.fail_after(5):
            await d.wait_room()  # woken after the handlers' burst
            assert d.push_many(events[3:]) == 2
            while d.depth or d.busy:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert seen == ["0", "1", "2", "3", "4"]
    assert (d.delivered, d.dropped) == (5, 0)


@pytest.mark.anyio
async def test_take_runs_handlers_in_the_callers_task_when_the_loop_is_idle() -> None:
    # The reader's shortcut (Dispatcher.take): synchronous handlers run in the caller's
    # task; a local event queued by one comes after the rest of the read, as in run();
    # a coroutine handler is awaited by the handler loop, with what follows it after it.
    d = Dispatcher(100)
    seen: list[tuple[str, Any, str]] = []
    reader = anyio.get_current_task().id

    def sync(data: Any, event: str, source: str, wid: int | None) -> None:
        where = "reader" if anyio.get_current_task().id == reader else "loop"
        seen.append(("sync", data, where))
        if data == "a":
            d.push(Event("local", "l", "L", None))

    async def coro(data: Any, event: str, source: str, wid: int | None) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(("coro", data, "reader" if anyio.get_current_task().id == reader else "loop"))

    d.subscribe("*", "*", sync)
    d.subscribe("s", "c", coro)
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        with anyio.fail_after(5):
            while d._wakeup is None:  # the loop reaches its wait
                await anyio.lowlevel.checkpoint()
            assert d.take([("s", "x", "0", 1), ("s", "y", "1", 1)]) == 2
            assert seen == [("sync", "0", "reader"), ("sync", "1", "reader")]
            assert (d.delivered, d.depth, d.busy) == (2, 0, False)
            assert d.take([("s", "a", "a", 1), ("s", "b", "b", 1), ("s", "c", "c", 1), ("s", "d", "d", 1)]) == 4
            while d.depth or d.busy:
                await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert seen[2:] == [
        ("sync", "a", "reader"),  # queued L: the rest of the read goes to the loop, ahead of L
        ("sync", "b", "loop"),
        ("sync", "c", "loop"),
        ("coro", "c", "loop"),
        ("sync", "d", "loop"),
        ("sync", "L", "loop"),
    ]
    assert d.delivered == 7


async def _hand_over_scenario(seed: int, bounded: bool, take: bool = False) -> tuple[list[Any], int]:
    """A reader pushing reads of random size into a dispatcher whose handlers are a mix
    of synchronous, asynchronous and an iterator with a small buffer. ``bounded``: the
    client's hand-over (push_many, then wait_room for the rest); else an unbounded inbox.
    ``take``: Dispatcher.take instead of push_many (what the client's reader calls).
    Returns what the handlers and the iterator saw, in order, and the deepest inbox."""
    rng = random.Random(seed)
    limit = rng.choice([1, 2, 7, 50])
    d = Dispatcher(limit if bounded else 10**9)
    seen: list[Any] = []
    deepest = 0

    async def slow(data: Any, event: str, source: str, wid: int | None) -> None:
        for _ in range(data % 3):
            await anyio.lowlevel.checkpoint()
        seen.append(("slow", data))

    d.subscribe("s", "*", lambda data, event, source, wid: seen.append(("sync", data)))
    d.subscribe("s", "e", slow)
    n = 0
    reads = []
    for _ in range(rng.randint(1, 12)):
        size = rng.randint(1, 30)
        reads.append([("s", "e", n + i, 1) for i in range(size)])
        n += size
    async with anyio.create_task_group() as tg:
        tg.start_soon(d.run)
        async with d.events("s", "e", max_buffer=rng.choice([1, 3])) as it:

            async def consume() -> None:
                for _ in range(n):
                    ev = await it.receive()
                    if ev.data % 5 == 0:
                        await anyio.lowlevel.checkpoint()
                    seen.append(("iter", ev.data))

            tg.start_soon(consume)
            with anyio.fail_after(20):
                for batch in reads:
                    taken = d.take(batch) if take else d.push_many(batch)
                    deepest = max(deepest, d.depth)
                    while taken < len(batch):
                        await d.wait_room()
                        taken += d.push_many(batch[taken:])
                        deepest = max(deepest, d.depth)
                while d.depth or d.busy or len([x for x in seen if x[0] == "iter"]) < n:
                    await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert d.dropped == 0
    if bounded:
        assert deepest <= limit
    return seen, n


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.anyio
async def test_hand_over_with_backpressure_delivers_what_an_unbounded_inbox_does(seed: int) -> None:
    bounded, n = await _hand_over_scenario(seed, bounded=True)
    taking, _ = await _hand_over_scenario(seed, bounded=True, take=True)
    reference, _ = await _hand_over_scenario(seed, bounded=False)
    # Each consumer sees every event once, in order; only the interleaving may differ.
    for kind in ("sync", "slow", "iter"):
        mine = [x[1] for x in bounded if x[0] == kind]
        assert mine == [x[1] for x in reference if x[0] == kind] == list(range(n))
        assert [x[1] for x in taking if x[0] == kind] == mine


# --- embed's numbered publishes and checked deliveries ------------------------------------
# EmbeddedClient encodes numbered events itself and checks deliveries in order (a "lost"
# notice right before the event that revealed a gap): both held to the reference.
# (Private methods: they are the fast paths under test; the client is built, never entered.)


def _embedded(worker_id: int) -> Any:
    from shared.embed import EmbeddedClient

    return EmbeddedClient("unix:/nonexistent/embed.sock", worker_id=worker_id, workers=2)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["s", "", "workerbus"]),
            st.sampled_from(["e", ""]),
            _VALUES | st.just("y" * 70000),
            _TARGETS | st.sampled_from([parse_target("worker:0"), parse_target(5)]),
        ),
        max_size=10,
    )
)
def test_embed_encoder_is_the_reference(publishes: list[Any]) -> None:
    from shared.sequence import BROADCAST_KEY, WORKER_KEY

    client = _embedded(1)
    broadcast = 0
    per_worker: dict[int, int] = {}
    for source, event, data, target in publishes:
        try:
            frame = client.sequencer.encode_publish(client, source, event, data, target)
        except (ValueError, LocalProtocolError, PayloadTooLarge) as exc:
            # refused exactly when the reference refuses (and the number is taken back)
            with pytest.raises(type(exc)):
                _reference_publish_frame(NATIVE, 1, source, event, data, target, client.max_payload_len)
            continue
        (payload,), outcome = reference.parse_frames(frame, 2, 65535)
        assert outcome == "ok"
        got_target, inner = reference.decode_publish(NATIVE, payload)
        assert got_target == target
        expected: dict[str, Any] = {"source": source, "event": event, "wid": 1}
        if data is not None:
            expected["data"] = data
        if source != "workerbus" and target.kind in (TargetKind.ALL, TargetKind.OTHERS):
            broadcast += 1
            expected[BROADCAST_KEY] = broadcast
        elif source != "workerbus" and target.kind is TargetKind.WORKER:
            per_worker[target.worker_id] = per_worker.get(target.worker_id, 0) + 1
            expected[WORKER_KEY] = per_worker[target.worker_id]
        assert msgpack.unpackb(inner, raw=False, strict_map_key=False) == expected
        assert reference.decode_event(NATIVE, inner) == (source, event, data, 1)


@settings(max_examples=300, deadline=None)
@given(_event_payloads(kong=False))
def test_embed_decoder_is_the_reference(payloads: list[bytes]) -> None:
    client = _embedded(0)
    expected = [_ref_or_error(reference.decode_event, NATIVE, p) for p in payloads]

    def decode(payload: bytes) -> Any:
        events, errors = client.sequencer.decode_batch(client, [payload])
        if errors:
            raise errors[0]
        (fields,) = events
        return fields

    assert [_or_error(decode, p) for p in payloads] == expected
    events, errors = client.sequencer.decode_batch(client, payloads)
    assert events == [e for e in expected if isinstance(e, tuple) and e[0] != "control"]
    assert len(errors) == len(payloads) - len(events)


_SEQ_NUMBERS = st.integers(0, 6) | st.sampled_from([True, 2.0, None, -1, 2**64 - 1])
_SEQ_WIDS = st.sampled_from([0, 1, 2]) | st.sampled_from([1.0, True, None])
# the usual delivery: one number from a worker (small range: in order, gaps, repeats)
_SEQ_USUAL = st.builds(
    lambda wid, key, number: {"source": "s", "event": "e", "wid": wid, key: number},
    st.sampled_from([1, 1, 2, 0]),
    st.sampled_from(["sb", "sw"]),
    st.integers(1, 4),
)
_SEQ_SMALL = st.integers(1, 4)
_SEQ_MAPS = st.one_of(
    _SEQ_USUAL,
    _SEQ_USUAL,
    _SEQ_USUAL,
    # both numbers at once, and sync markers as publishers send them (unnumbered)
    st.builds(
        lambda wid, sb, sw: {"source": "s", "event": "e", "wid": wid, "sb": sb, "sw": sw},
        st.sampled_from([1, 2]),
        _SEQ_SMALL,
        _SEQ_SMALL,
    ),
    st.builds(
        lambda wid, sb, sw: {"source": "workerbus", "event": "sync", "wid": wid, "data": {"sb": sb, "sw": [[0, sw]]}},
        st.sampled_from([1, 2]),
        _SEQ_SMALL,
        _SEQ_SMALL,
    ),
    st.builds(lambda wid: {"source": "s", "event": "e", "wid": wid}, st.sampled_from([0, 1, 2])),
    # numbered events of other workers and of the receiver (0): in order, gaps, repeats, restarts
    st.fixed_dictionaries(
        {"source": st.sampled_from(["s", "workerbus"]), "event": st.sampled_from(["e", "sync"]), "wid": _SEQ_WIDS},
        optional={"sb": _SEQ_NUMBERS, "sw": _SEQ_NUMBERS, "node": st.sampled_from(["n1", 7]), "data": st.none()},
    ),
    # sync markers
    st.fixed_dictionaries(
        {"source": st.just("workerbus"), "event": st.just("sync"), "wid": _SEQ_WIDS},
        optional={
            "data": st.fixed_dictionaries(
                {},
                optional={
                    "sb": _SEQ_NUMBERS,
                    "sw": st.lists(st.lists(st.integers(0, 2) | st.integers(0, 6), min_size=1, max_size=3), max_size=3),
                },
            )
            | st.just([1]),
            "sb": _SEQ_NUMBERS,
        },
    ),
    # the broker's lifecycle events
    st.builds(
        lambda count: {"source": "workerbus", "event": "dropped", "data": {"count": count}},
        st.integers(-1, 4) | st.sampled_from([2.0, True, "x"]),
    ),
    st.builds(
        lambda wid, pid: {"source": "workerbus", "event": "joined", "data": {"worker_id": wid, "pid": pid}},
        st.sampled_from([0, 1, 2, 1.0]),
        st.sampled_from([100, 101, 100.0, None]),
    ),
    st.just({"pong": 1}),
    st.just({"source": "s"}),
)
_SEQ_PAYLOADS = st.lists(
    st.one_of(_SEQ_MAPS.map(MsgpackCodec().dumps), st.sampled_from([b"\xc1", b"\x92\x01\x02"])),
    min_size=2,
    max_size=40,
)


@pytest.mark.parametrize("unframed", [False, True], ids=["frames", "objects"])
@settings(max_examples=600, deadline=None)
@given(_SEQ_PAYLOADS, st.lists(st.integers(1, 10), max_size=8))
def test_embed_sequence_check_is_the_reference(unframed: bool, payloads: list[bytes], cuts: list[int]) -> None:
    # Streams with gaps, repeats, restarts, sync markers, drops and rejoins, decoded in
    # reads of random sizes: the same events, the same "lost" notices at the same places,
    # the same errors, the same count as tests/reference.SequenceCheck one delivery at a time.
    # Unframed, the reads come as the connection's Unpacker makes them (an undecodable
    # object never gets that far: it ends the connection).
    if unframed:
        payloads = [p for p in payloads if p != b"\xc1"]
    loads = MsgpackCodec().loads
    client = _embedded(0)
    check = reference.SequenceCheck(0)
    expected: list[Any] = []
    for payload in payloads:
        got = _ref_or_error(check.deliver, NATIVE, payload)
        expected.extend(got if isinstance(got, list) else [got])
    events: list[Any] = []
    errors: list[Any] = []
    start = 0
    for cut in [*cuts, len(payloads)]:
        read = payloads[start : start + cut]
        start += len(read)
        if unframed:
            got_events, got_errors = client.sequencer.decode_objects(client, [loads(p) for p in read])
        else:
            got_events, got_errors = client.sequencer.decode_batch(client, read)
        events.extend(got_events)
        errors.extend(got_errors)
    assert start == len(payloads)
    assert events == [e for e in expected if isinstance(e, tuple) and e[0] != "control"]
    assert [getattr(e[3], "node", None) for e in events] == [
        getattr(e[3], "node", None) for e in expected if isinstance(e, tuple) and e[0] != "control"
    ]
    kinds = [e for e in expected if not (isinstance(e, tuple) and e[0] != "control")]
    assert [("control", e.kind) if isinstance(e, ControlFrame) else "error" for e in errors] == kinds
    assert client.lost == check.lost


def test_embed_sequence_check_on_known_cases() -> None:
    pack = MsgpackCodec().dumps

    def ev(wid: int, **numbers: int) -> bytes:
        return pack({"source": "s", "event": "e", "wid": wid, **numbers})

    client = _embedded(0)
    payloads = [
        ev(1, sb=1), ev(1, sb=2), ev(1, sb=5),  # gap of 2, before sb=5
        ev(1, sb=5), ev(1, sb=3),  # a repeat, then a restart: no gap
        ev(0, sb=9), ev(0, sb=1),  # our own stream: never checked
        ev(2, sw=1), ev(2, sw=3),  # per-worker stream: gap of 1
        pack({"source": "workerbus", "event": "dropped", "data": {"count": 1}}),
        ev(1, sb=5),  # gap of 1, explained by the drop
        pack({"source": "workerbus", "event": "sync", "wid": 1, "data": {"sb": 7, "sw": [[0, 0]]}}),
        pack({"pong": 1}),
        pack({"source": "s", "event": "e", "wid": 1, "sb": 99, "node": "n1"}),  # another node's
    ]
    events, errors = client.sequencer.decode_batch(client, payloads)
    lost = [(i, e[2]) for i, e in enumerate(events) if e[1] == "lost"]
    assert lost == [(2, {"count": 2, "wid": 1, "total": 2}), (9, {"count": 1, "wid": 2, "total": 3}),
                    (13, {"count": 2, "wid": 1, "total": 5})]  # fmt: skip
    assert events[3] == ("s", "e", None, 1) and events[10] == ("s", "e", None, 2)
    assert [type(e).__name__ for e in errors] == ["ControlFrame"]
    assert getattr(events[-1][3], "node", None) == "n1"
    assert client.lost == 5


# --- parse_target ------------------------------------------------------------------------


def _reference_parse_target(value: Any) -> Any:
    if isinstance(value, Target):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return "invalid"
    if isinstance(value, int):
        return Target(TargetKind.WORKER, worker_id=value)
    if value in ("all", "current", "others"):
        return Target(TargetKind(value))
    if value.startswith("unique:") and len(value) > len("unique:"):
        return Target(TargetKind.UNIQUE, key=value[len("unique:") :])
    if value.startswith("worker:"):
        try:
            return Target(TargetKind.WORKER, worker_id=int(value[len("worker:") :]))
        except ValueError:
            return "invalid"
    return "invalid"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["all", "current", "others", "unique:", "worker:", "worker:x", "unique:k:2", "ALL", ""])
    | st.builds(lambda k, v: f"{k}:{v}", st.sampled_from(["worker", "unique", "all"]), st.text(max_size=4) | st.integers(-3, 99).map(str))
    | st.integers(-(2**70), 2**70) | st.booleans() | st.none() | st.floats() | st.just(OTHERS)
)
def test_parse_target_is_the_reference(value: Any) -> None:
    try:
        got: Any = parse_target(value)
    except ValueError:
        got = "invalid"
    assert got == _reference_parse_target(value)
