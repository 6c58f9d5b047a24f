from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import LocalProtocolError, RemoteProtocolError
from shared.frame import FrameDecoder, encode_frame, frame_header


@pytest.mark.parametrize("header_len", [2, 3])
def test_whole_bytewise_and_with_trailing_partial(header_len: int) -> None:
    payloads = [b"hello", b"", b"x" * 300, b"\x00\x01"]
    wire = b"".join(encode_frame(p, header_len) for p in payloads)
    assert FrameDecoder(header_len).feed(wire) == payloads
    dec = FrameDecoder(header_len)
    out: list[bytes] = []
    for i in range(len(wire)):
        out += dec.feed(wire[i : i + 1])
    assert out == payloads and dec.buffered == 0
    dec = FrameDecoder(header_len)
    assert dec.feed(wire + wire[:3]) == payloads
    assert dec.buffered == 3
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        dec.eof()


def test_header_widths() -> None:
    assert encode_frame(b"abc", 2) == b"\x00\x03abc"
    assert encode_frame(b"abc", 3) == b"\x00\x00\x03abc"
    assert frame_header(65535, 2) == b"\xff\xff"
    with pytest.raises(LocalProtocolError):
        frame_header(65536, 2)
    assert frame_header(2**24 - 1, 3) == b"\xff\xff\xff"


def test_oversize_is_refused_before_buffering_and_latches() -> None:
    dec = FrameDecoder(2, max_frame_len=10)
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        dec.feed(b"\x00\x0b")  # only the header: nothing of the payload was buffered
    assert dec.buffered == 0
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"\x00\x01x")  # latched: never resumed after an error
    with pytest.raises(RemoteProtocolError):
        dec.eof()


def test_frames_before_an_oversize_header_are_kept() -> None:
    dec = FrameDecoder(2, max_frame_len=10)
    assert dec.feed(b"\x00\x01a\x00\x02bc\x00\x0b") == [b"a", b"bc"]
    assert dec.failed
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        dec.feed(b"")


def test_http_request_on_the_stream_socket_looks_like_a_huge_frame() -> None:
    dec = FrameDecoder(3, max_frame_len=65535)
    with pytest.raises(RemoteProtocolError):
        dec.feed(b"GET / HTTP/1.1\r\n")


def test_max_frame_len_validated() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(2, max_frame_len=70000)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=600), max_size=8),
    st.lists(st.integers(min_value=1, max_value=97), min_size=1, max_size=20),
    st.sampled_from([2, 3]),
)
def test_round_trip_under_any_chunking(payloads: list[bytes], cuts: list[int], hlen: int) -> None:
    wire = b"".join(encode_frame(p, hlen) for p in payloads)
    dec = FrameDecoder(hlen)
    out: list[bytes] = []
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        out += dec.feed(wire[pos : pos + step])
        pos += step
        i += 1
    dec.eof()
    assert out == payloads


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=1000))
def test_garbage_only_raises_remote_protocol_error_and_stays_bounded(data: bytes, limit: int) -> None:
    dec = FrameDecoder(2, max_frame_len=limit)
    try:
        for payload in dec.feed(data):
            assert len(payload) <= limit
        assert dec.buffered <= limit + 2
        dec.eof()
    except RemoteProtocolError:
        pass


def _traced(action: Callable[[], object]) -> int:
    """Bytes still allocated after ``action`` that it allocated."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_frame_in_pieces_is_held_as_it_arrived() -> None:
    # Reads of some size are kept as the very objects that arrived: no copy, no spare room,
    # nothing sized from the header (which announces 60 000).
    pieces = [(60000).to_bytes(2, "big") + bytes(20000), bytes(20000), bytes(10000)]
    decoder = FrameDecoder(2)
    extra = _traced(lambda: [decoder.feed(p) for p in pieces])
    assert decoder.buffered == 50002
    assert extra < 2048
    assert decoder.feed(bytes(10000)) == [bytes(60000)]
    assert decoder.buffered == 0


def test_a_dribbled_frame_costs_what_arrived() -> None:
    # Tiny reads are gathered in one buffer, not kept as one object each (~50 bytes apiece).
    decoder = FrameDecoder(2)
    decoder.feed((60000).to_bytes(2, "big"))
    dribble = [bytes([i % 256]) for i in range(20000)]
    extra = _traced(lambda: [decoder.feed(b) for b in dribble])
    assert decoder.buffered == 20002
    assert extra < 20002 * 1.25 + 2048
    out = decoder.feed(bytes(40000))
    assert out == [bytes(i % 256 for i in range(20000)) + bytes(40000)]
