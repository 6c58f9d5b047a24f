from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from httpbus.handshake import REQUEST, ClientHandshake, ServerHandshake, plain_response
from shared.errors import HandshakeError, UpgradeRejected
from shared.frame import encode_frame
from shared.messages import encode_hello
from shared.profile import get_profile
from streambus.transport import looks_like_http


def test_request_is_the_contracts_87_bytes() -> None:
    assert len(REQUEST) == 87
    assert ClientHandshake.request == REQUEST


def feed_bytewise(hs: ServerHandshake, data: bytes) -> object:
    outcome = None
    for i in range(len(data)):
        outcome = hs.receive_data(data[i : i + 1])
        if outcome is not None:
            return outcome
    return outcome


@pytest.mark.parametrize(
    "request_bytes",
    [
        REQUEST,
        REQUEST.lower().replace(b"get / http/1.1", b"GET / HTTP/1.1"),
        b"GET /events HTTP/1.1\r\nUpgrade: kong-worker-events/1\r\nX-Extra: 1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: foo, Kong-Worker-Events/1\r\n\r\n",
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_server_accepts_variants_and_keeps_trailing_bytes(request_bytes: bytes, bytewise: bool) -> None:
    hs = ServerHandshake()
    data = request_bytes + b"\x00\x03abc"
    outcome = feed_bytewise(hs, data) if bytewise else hs.receive_data(data)
    assert outcome is not None and outcome.accepted  # type: ignore[attr-defined]
    response = outcome.response  # type: ignore[attr-defined]
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nUpgrade: Kong-Worker-Events/1\r\n" in response
    # Byte by byte the head completes before the frame bytes arrive; at once they trail.
    if not bytewise:
        assert outcome.trailing == b"\x00\x03abc"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 426),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: Kong-Worker-Events/2\r\n\r\n", 426),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", 426),
        (b"\x00\x0b\x82\xa2id\x00\xa3pid\x01", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nContent-Length: 3\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nExpect: 100-continue\r\n"
         b"Content-Length: 3\r\n\r\n", 417),
    ],
)
def test_server_refusals_are_real_http_errors(request_bytes: bytes, status: int) -> None:
    outcome = ServerHandshake().receive_data(request_bytes)
    assert outcome is not None and not outcome.accepted
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(outcome.response)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    headers = dict(response.headers)
    assert headers[b"connection"] == b"close"
    assert headers[b"content-type"].startswith(b"text/plain")
    if status == 426:
        assert headers[b"upgrade"] == b"Kong-Worker-Events/1"
    body = client.next_event()
    assert isinstance(body, h11.Data) and body.data.strip()
    assert body.data.count(b"\n") == 1 and body.data.endswith(b"\n")  # one line
    assert b"b'" not in body.data and b"bytearray(" not in body.data  # no Python repr


def test_oversize_head_is_refused() -> None:
    hs = ServerHandshake(max_header_bytes=1024)
    outcome = hs.receive_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000)
    assert outcome is not None and not outcome.accepted
    assert outcome.response.startswith(b"HTTP/1.1 431 ")


def test_server_sees_eof() -> None:
    hs = ServerHandshake()
    assert hs.receive_data(b"GET / HT") is None
    outcome = hs.receive_data(b"")
    assert outcome is not None and not outcome.accepted


def test_client_accepts_101_with_extra_headers_and_trailing() -> None:
    hs = ClientHandshake()
    response = (
        b"HTTP/1.1 101 Switching Protocols\r\nServer: openresty\r\nDate: x\r\n"
        b"Connection: upgrade\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n\x00\x02hi"
    )
    assert hs.receive_data(response[:20]) is None
    assert hs.receive_data(response[20:]) == b"\x00\x02hi"


def test_client_requires_101() -> None:
    hs = ClientHandshake()
    with pytest.raises(UpgradeRejected) as info:
        hs.receive_data(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno route\n")
    assert info.value.status_code == 404 and info.value.body == b"no route\n"
    assert "404" in str(info.value) and "no route" in str(info.value)


def test_client_requires_the_upgrade_token() -> None:
    with pytest.raises(UpgradeRejected):
        ClientHandshake().receive_data(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")


def test_client_error_body_until_close() -> None:
    hs = ClientHandshake()
    assert hs.receive_data(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbroken") is None
    with pytest.raises(UpgradeRejected) as info:
        hs.receive_data(b"")
    assert info.value.body == b"broken"


@pytest.mark.parametrize("data", [b"", b"HTTP/1.1 10", b"\x00\x01garbage\r\n\r\n"])
def test_client_eof_or_garbage(data: bytes) -> None:
    hs = ClientHandshake()
    with pytest.raises(HandshakeError):
        hs.receive_data(data)
        hs.receive_data(b"")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_server_never_raises_on_garbage(data: bytes) -> None:
    hs = ServerHandshake()
    out = hs.receive_data(data)
    if out is None:
        out = hs.receive_data(b"")
    assert out is not None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_client_raises_only_handshake_errors(data: bytes) -> None:
    hs = ClientHandshake()
    try:
        if hs.receive_data(data) is None:
            hs.receive_data(b"")
    except HandshakeError:
        pass


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.0\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nContent-Length: 100000\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nExpect: 100-continue\r\n\r\n",
])
def test_refused_as_soon_as_the_head_is_in(request_bytes: bytes) -> None:
    # Not a byte of the announced body is needed to decide (the broker used to wait for
    # it, or for a 100 Continue nobody sends, until its handshake deadline).
    outcome = feed_bytewise(ServerHandshake(), request_bytes)
    assert outcome is not None and not outcome.accepted  # type: ignore[attr-defined]


def test_a_zero_content_length_is_no_body() -> None:
    request = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nContent-Length: 0\r\n\r\n\x00\x01h"
    outcome = ServerHandshake().receive_data(request)
    assert outcome is not None and outcome.accepted and outcome.trailing == b"\x00\x01h"


def test_malformed_request_details_stay_in_the_log_reason() -> None:
    outcome = ServerHandshake().receive_data(b"GARBAGE\r\n\r\n")
    assert outcome is not None
    assert outcome.response.endswith(b"\r\n\r\nmalformed HTTP request: illegal request line\n")
    assert "GARBAGE" in outcome.reason  # the log may show what arrived


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_refusal_bodies_are_one_line_without_reprs(data: bytes) -> None:
    hs = ServerHandshake()
    out = hs.receive_data(data) or hs.receive_data(b"")
    assert out is not None
    if out.accepted or not out.response:
        return
    body = out.response.partition(b"\r\n\r\n")[2]
    assert body.endswith(b"\n") and body.count(b"\n") == 1
    assert b"b'" not in body and b'b"' not in body and b"bytearray(" not in body


@pytest.mark.parametrize("status", [403, 503, 400])
def test_plain_response_is_valid_http(status: int) -> None:
    raw = plain_response(status, "broker full: max_connections=1 reached\r\nInjected: no")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    response = client.next_event()
    assert isinstance(response, h11.Response) and response.status_code == status
    assert dict(response.headers)[b"connection"] == b"close"
    body = client.next_event()
    assert isinstance(body, h11.Data)
    assert body.data == b"broker full: max_connections=1 reached  Injected: no\n"  # one line, always
    assert isinstance(client.next_event(), h11.EndOfMessage)


def test_the_client_reads_a_503_as_upgrade_rejected() -> None:
    with pytest.raises(UpgradeRejected) as info:
        ClientHandshake().receive_data(plain_response(503, "broker full: max_connections=1 reached, try again later"))
    assert info.value.status_code == 503
    assert "broker full: max_connections=1 reached" in str(info.value)


# --- an HTTP request on the stream socket ---------------------------------------------------


@pytest.mark.parametrize("start", [b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1", b"HEAD ", b"PUT ", b"DELETE ",
                                   b"OPTIONS * HTTP/1.1", b"PATCH ", b"CONNECT a:1 HTTP/1.1", b"TRACE ",
                                   b"PRI * HTTP/2.0\r\n"])
def test_http_request_lines_are_recognised(start: bytes) -> None:
    assert looks_like_http(start) is True
    for cut in range(1, start.index(b" ") + 1):
        assert looks_like_http(start[:cut]) is None  # a method's prefix: wait for more


@pytest.mark.parametrize("start", [b"\x00", b"\x00\x0b\x82", b"GETX", b"get / HTTP/1.1", b"G\x00", b"\xffGET "])
def test_other_first_bytes_are_frames(start: bytes) -> None:
    assert looks_like_http(start) is False


@settings(max_examples=300, deadline=None)
@given(worker_id=st.integers(-(2**31), 2**31), pid=st.integers(0, 2**22), profile=st.sampled_from(["native", "kong"]))
def test_a_hello_never_looks_like_http(worker_id: int, pid: int, profile: str) -> None:
    prof = get_profile(profile)
    frame = encode_frame(encode_hello(prof, worker_id, pid), prof.header_len)
    assert looks_like_http(frame[:8]) is False
