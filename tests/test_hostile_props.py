"""Hostile input, property-based: the decoders take any bytes, in any chunking.

For the frame decoder, both sides of the HTTP upgrade, both payload codecs and the message
schemas: no crash (only the project's own error types), no hang (every example is small
and finishes under pytest-timeout), no unbounded allocation (memory is checked with
tracemalloc against the input size). The coverage-guided counterpart is in fuzz/.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from httpbus.handshake import REQUEST, ClientHandshake, ServerHandshake
from shared.errors import HandshakeError, LocalProtocolError, RemoteProtocolError
from shared.frame import FrameDecoder, frame_header
from shared.messages import (
    ALL,
    OTHERS,
    Target,
    decode_event,
    decode_hello,
    decode_ping,
    decode_pong,
    decode_publish,
    decode_publish_batch,
    decode_welcome,
    encode_publish,
    parse_target,
)
from shared.profile import Profile, get_profile

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILES = [get_profile("native"), get_profile("kong")]


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> list[bytes]:
    """``data`` cut at arbitrary points, the way socket reads might deliver it."""
    raw = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def frames_and_garbage(header_len: int) -> st.SearchStrategy[bytes]:
    frame = st.binary(max_size=300).map(lambda p: len(p).to_bytes(header_len, "big") + p)
    return st.lists(st.one_of(frame, st.binary(max_size=40)), max_size=8).map(b"".join)


# --- frames ----------------------------------------------------------------------------------


@SETTINGS
@given(header_len=st.sampled_from([2, 3]), limit=st.integers(0, 400), data=st.data())
def test_frame_decoder_takes_any_bytes(header_len: int, limit: int, data: st.DataObject) -> None:
    pieces = data.draw(chunked(frames_and_garbage(header_len)))
    decoder = FrameDecoder(header_len, limit)
    try:
        for piece in pieces:
            for payload in decoder.feed(piece):
                assert len(payload) <= limit
            # Never more than one incomplete frame is held, and never an oversize one.
            assert decoder.buffered <= limit + header_len
        decoder.eof()
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError):  # latched: never resumed mid-garbage
            decoder.feed(b"")


@SETTINGS
@given(header_len=st.sampled_from([2, 3]), length=st.integers(0, (1 << 24) - 1))
def test_oversize_frame_is_refused_on_its_header(header_len: int, length: int) -> None:
    limit = 1000
    length %= 1 << (8 * header_len)
    decoder = FrameDecoder(header_len, limit)
    header = length.to_bytes(header_len, "big")
    if length > limit:
        with pytest.raises(RemoteProtocolError, match="over the limit"):
            decoder.feed(header)  # refused before a byte of the payload arrives
    else:
        assert decoder.feed(header + b"x" * length) == [b"x" * length]


# --- the HTTP upgrade ------------------------------------------------------------------------

http_ish = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda a, b: REQUEST[:a] + b, st.integers(0, len(REQUEST)), st.binary(max_size=200)),
    st.lists(
        st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\n", b"Host: x\r\n", b"Upgrade: Kong-Worker-Events/1\r\n",
                         b"Upgrade: h2c\r\n", b"Connection: upgrade\r\n", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n",
                         b"\r\n", b"X: " + b"y" * 300 + b"\r\n", b"\x00\xff", b"0\r\n\r\n"]),
        max_size=12,
    ).map(b"".join),
)


@SETTINGS
@given(pieces=chunked(http_ish), max_header_bytes=st.integers(16, 1024))
def test_server_handshake_never_raises(pieces: list[bytes], max_header_bytes: int) -> None:
    hs = ServerHandshake(max_header_bytes=max_header_bytes)
    fed = b""
    for piece in [*pieces, b""]:
        fed += piece
        outcome = hs.receive_data(piece)
        if outcome is None:
            continue
        if outcome.accepted:
            assert fed.endswith(outcome.trailing)
        elif outcome.response:
            client = h11.Connection(h11.CLIENT)
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
            client.send(h11.EndOfMessage())
            client.receive_data(outcome.response)
            answer = client.next_event()
            assert isinstance(answer, h11.Response) and answer.status_code in (400, 405, 417, 426, 431, 505)
        return


@SETTINGS
@given(pieces=chunked(st.one_of(st.binary(max_size=600), http_ish.map(lambda b: b.replace(b"GET / ", b"")))))
def test_client_handshake_raises_only_handshake_errors(pieces: list[bytes]) -> None:
    hs = ClientHandshake()
    try:
        for piece in [*pieces, b""]:
            if hs.receive_data(piece) is not None:
                return
    except HandshakeError:
        pass


# --- codecs and messages ---------------------------------------------------------------------


@SETTINGS
@given(profile=st.sampled_from(PROFILES), payload=st.binary(max_size=400))
def test_decoders_raise_only_remote_protocol_errors(profile: Profile, payload: bytes) -> None:
    for decode in (decode_hello, decode_publish, decode_event, decode_welcome, decode_ping,
                   decode_pong):
        try:
            decode(profile, payload)
        except RemoteProtocolError:
            pass
    try:
        value = profile.codec.loads(payload)
    except RemoteProtocolError:
        return
    try:
        profile.codec.dumps(value)
    except LocalProtocolError:
        pass


def _peak_of(func: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        try:
            func()
        except RemoteProtocolError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Lengths and counts that announce far more than the input holds: a decoder that trusted
# them would allocate megabytes.
_LIES = {
    "native": [b"\xdb\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff", b"\xdd\x7f\xff\xff\xff\x00", b"\xdf\x7f\xff\xff\xff\xa1a"],
    # LuaJIT lengths: 0xff then 4 bytes little-endian (a string of ~2 GiB, tables of ~2**31)
    "kong": [b"\xff\xff\xff\xff\x7f", b"\x0c\xff\xff\xff\xff\x7f", b"\x09\xff\xff\xff\xff\x7f",
             b"\x0b\xff\xff\xff\xff\x7f\xff\xff\xff\xff\x7f"],
}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_announced_lengths_do_not_allocate(profile: Profile) -> None:
    for lie in _LIES[profile.name]:
        peak = _peak_of(lambda lie=lie: profile.codec.loads(lie))  # type: ignore[misc]
        assert peak < 64 * 1024, (lie, peak)


def test_frame_decoder_memory_is_bounded_by_its_limit() -> None:
    decoder = FrameDecoder(3, 4096)

    def feed() -> None:
        decoder.feed(b"\x00\x10\x00" + b"x" * 4000)  # a frame of 4096, 96 bytes short
        decoder.feed(b"\xff\xff\xff")  # does not complete it: still buffered, not grown

    assert _peak_of(feed) < 64 * 1024
    assert decoder.buffered <= 4096 + 3


# --- the broker's fast publish path ----------------------------------------------------------


def _publishes(profile: Profile) -> st.SearchStrategy[bytes]:
    targets = [ALL, parse_target("unique:k")]
    if profile.extended_targets:
        targets += [OTHERS, parse_target("worker:3")]
    valid = st.builds(
        lambda t, e: encode_publish(profile, t, e),
        st.sampled_from(targets),
        st.one_of(st.binary(max_size=300), st.integers(250, 260).map(lambda n: b"e" * n)),
    )
    # ...and the same bytes slightly damaged: a flipped byte, cut short, or extended.
    damaged = st.builds(
        lambda p, i, b, cut: (p[:i] + bytes([b]) + p[i + 1 :]) if not cut else p[: i % (len(p) + 1)] + b"\x00" * (cut - 1),
        valid, st.integers(0, 20), st.integers(0, 255), st.integers(0, 3),
    )
    return st.one_of(valid, damaged, st.binary(max_size=40))


@SETTINGS
@given(profile=st.sampled_from(PROFILES), data=st.data())
def test_publish_batch_agrees_with_decode_publish(profile: Profile, data: st.DataObject) -> None:
    """decode_publish_batch (which reads common publishes straight from their bytes) must
    give exactly what decode_publish gives, frame by frame, and stop at the same frame."""
    payloads = data.draw(st.lists(_publishes(profile), max_size=6))
    runs, error = decode_publish_batch(profile, payloads)
    expected: list[tuple[Target, bytes]] = []
    expected_error = None
    for payload in payloads:
        try:
            target, inner = decode_publish(profile, payload)
        except RemoteProtocolError as exc:
            expected_error = exc
            break
        expected.append((target, frame_header(len(inner), profile.header_len) + inner))
    assert [(t, f) for t, run in runs for f in run] == expected
    assert (error is None) == (expected_error is None)
