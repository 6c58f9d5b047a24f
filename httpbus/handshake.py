"""Sans-IO HTTP/1.1 upgrade to ``Kong-Worker-Events/1``, on both sides, driven by h11.

No I/O here: feed bytes in, get bytes to send and an outcome back. The only module that
imports h11, so h11's exceptions are translated here and nowhere else.

Server rules (docs/protocol.md §2.1): any well-formed HTTP/1.1 GET without a body whose
``Upgrade`` header carries the token (case-insensitive) is answered ``101``; malformed HTTP
gets ``400`` (or h11's hint, e.g. ``431`` for an oversize head), HTTP/1.0 ``505``, another
method ``405``, ``Expect: 100-continue`` ``417``, a body (``Content-Length`` over 0, any
``Transfer-Encoding``) ``400``, a missing or wrong token ``426`` with
``Upgrade: Kong-Worker-Events/1``; each at once, as soon as the request head is in, with a
one-line text body (never a Python repr) and ``Connection: close``. Bytes after the request
head are the start of the frame stream. :func:`plain_response` builds the same kind of
answer for refusals that come before any parsing (a full broker's ``503``).

Client rules: send exactly the contract's 87 bytes; require ``101`` and the ``Upgrade``
token; anything else is an error carrying the status and body received.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import h11

from shared.errors import HandshakeError, UpgradeRejected

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "REQUEST",
    "UPGRADE_TOKEN",
    "ClientHandshake",
    "ServerHandshake",
    "ServerOutcome",
    "plain_response",
]

UPGRADE_TOKEN = b"Kong-Worker-Events/1"
#: The exact request of the contract, byte for byte the one lua-resty-events sends.
REQUEST = (
    b"GET / HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: Kong-Worker-Events/1\r\n"
    b"\r\n"
)
#: Largest request or response head accepted; h11's own default, which it justifies with
#: the limits of common servers. A legitimate head here is under 200 bytes.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
#: Largest error body a client keeps to report a refused upgrade.
_MAX_ERROR_BODY = 4096
_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    405: b"Method Not Allowed",
    417: b"Expectation Failed",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}
#: The ``: bytearray(b'...')`` or ``: b'...'`` that h11 appends to some messages: fine in a
#: log line, never in a response body.
_REPR_TAIL = re.compile(r":\s*(?:bytearray\()?b['\"].*$", re.DOTALL)


def _one_line(text: str) -> str:
    # A response body is one line of printable text.
    return "".join(c if c.isprintable() else " " for c in text).strip()


def plain_response(status: int, text: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole HTTP/1.1 response: ``status``, ``text`` as a one-line ``text/plain`` body,
    ``Connection: close`` (sans-IO: just the bytes)."""
    body = _one_line(text).encode("utf-8", "replace") + b"\n"
    head = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        (b"Connection", b"close"),
        *headers,
    ]
    out = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
    return out + b"".join(k + b": " + v + b"\r\n" for k, v in head) + b"\r\n" + body


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _has_token(headers: Iterable[tuple[bytes, bytes]], name: bytes, token: bytes) -> bool:
    wanted = token.lower()
    for key, value in headers:
        if key == name and any(t.strip().lower() == wanted for t in value.split(b",")):
            return True
    return False


@dataclass(frozen=True, slots=True)
class ServerOutcome:
    """What the server does once the request head is complete (or broken)."""

    accepted: bool
    #: Bytes to send: the 101, or the error response.
    response: bytes
    #: Bytes that followed the request head (accepted only).
    trailing: bytes = b""
    #: Why the request was refused (refused only).
    reason: str = ""


class ServerHandshake:
    """The broker's side of the upgrade."""

    def __init__(self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        if max_header_bytes < 1:
            raise ValueError("max_header_bytes must be at least 1")
        self.max_header_bytes = max_header_bytes
        # h11 enforces the limit only on an *incomplete* head; a whole oversize head that
        # arrives in one read is caught by counting below (memory: one read at most).
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self._received = 0

    def receive_data(self, data: bytes) -> ServerOutcome | None:
        """Feed bytes (``b""`` = EOF). None while the request head is incomplete."""
        conn = self._conn
        self._received += len(data)
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                detail = str(exc)
                return self._refuse(
                    exc.error_status_hint,
                    "malformed HTTP request" + (f": {_REPR_TAIL.sub('', detail)}" if detail else ""),
                    detail,
                )
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.Request):
                refusal = self._check(event)
                if refusal is not None:
                    return refusal
            elif event is h11.PAUSED:
                head = self._received - len(conn.trailing_data[0])
                if head > self.max_header_bytes:
                    return self._refuse(431, f"request head of {head} bytes, over {self.max_header_bytes}")
                response = conn.send(
                    h11.InformationalResponse(
                        status_code=101,
                        headers=[(b"Connection", b"Upgrade"), (b"Upgrade", UPGRADE_TOKEN)],
                        reason=b"Switching Protocols",
                    )
                )
                return ServerOutcome(True, response or b"", trailing=conn.trailing_data[0])
            elif isinstance(event, h11.ConnectionClosed):
                return ServerOutcome(False, b"", reason="peer closed before the request head")
            # Data / EndOfMessage of the request: keep going until PAUSED.

    def _check(self, request: h11.Request) -> ServerOutcome | None:
        # Decided on the head alone, at once: waiting for a body or for a 100 Continue that
        # never comes would only hold the connection until the handshake deadline.
        headers = request.headers
        if request.http_version != b"1.1":
            version = request.http_version.decode("ascii", "replace")
            return self._refuse(505, f"HTTP/{version} is not supported: the upgrade needs HTTP/1.1")
        if request.method != b"GET":
            return self._refuse(405, f"method {request.method.decode('ascii', 'replace')} not allowed, use GET")
        if _header(headers, b"expect") is not None:
            return self._refuse(417, "Expect is not supported: an upgrade request has no body")
        length = _header(headers, b"content-length")
        if _header(headers, b"transfer-encoding") is not None or (length is not None and length.strip() != b"0"):
            return self._refuse(400, "an upgrade request must not have a body")
        if not _has_token(headers, b"upgrade", UPGRADE_TOKEN):
            return self._refuse(426, "expected Upgrade: Kong-Worker-Events/1")
        return None

    def _refuse(self, status: int, text: str, detail: str = "") -> ServerOutcome:
        # ``text`` is the body; ``detail`` (for the log only) may say more, e.g. in a repr.
        text = _one_line(text)
        reason = f"{status}: {text}" if not detail or detail in text else f"{status}: {text} ({detail})"
        body = text.encode("utf-8", "replace") + b"\n"
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ]
        if status == 426:
            headers.append((b"Upgrade", UPGRADE_TOKEN))
        try:
            response = h11.Response(
                status_code=status, headers=headers, reason=_REASONS.get(status, b"Error")
            )
            out = self._conn.send(response)
            out = (out or b"") + (self._conn.send(h11.Data(data=body)) or b"")
            out += self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # h11 will not answer in its current state (e.g. the peer already broke the
            # message framing twice); write the response by hand, it is always valid.
            out = plain_response(status, text, headers[3:])
        return ServerOutcome(False, out, reason=reason)


class ClientHandshake:
    """The worker's side of the upgrade.

    Send :data:`REQUEST`, then feed the response bytes to :meth:`receive_data` until it
    returns the bytes that followed the ``101`` head.
    """

    request = REQUEST

    def __init__(self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_bytes)
        # Tell h11 what went out so it expects a switch; the bytes are the contract's own.
        self._conn.send(
            h11.Request(
                method="GET",
                target="/",
                headers=[("Host", "localhost"), ("Connection", "Upgrade"), ("Upgrade", "Kong-Worker-Events/1")],
            )
        )
        self._conn.send(h11.EndOfMessage())
        self._refusal: h11.Response | None = None
        self._body = bytearray()

    def receive_data(self, data: bytes) -> bytes | None:
        """Feed response bytes (``b""`` = EOF).

        Returns:
            None while the head is incomplete, else the bytes after the ``101`` head.

        Raises:
            UpgradeRejected: the server answered with another status, or a 101 without
                the ``Upgrade: Kong-Worker-Events/1`` header.
            HandshakeError: the response was not valid HTTP or the server closed.
        """
        conn = self._conn
        conn.receive_data(data)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._refusal is not None:
                    raise self._rejected() from None
                raise HandshakeError(f"invalid upgrade response: {exc}") from exc
            if event is h11.NEED_DATA:
                return None
            if event is h11.PAUSED:
                return conn.trailing_data[0]
            if isinstance(event, h11.InformationalResponse):
                if event.status_code != 101:
                    continue  # e.g. a 100 Continue: the final answer follows
                if not _has_token(event.headers, b"upgrade", UPGRADE_TOKEN):
                    raise UpgradeRejected(101, event.reason.decode("latin-1"), b"missing Upgrade: Kong-Worker-Events/1")
            elif isinstance(event, h11.Response):
                self._refusal = event
            elif isinstance(event, h11.Data):
                if len(self._body) < _MAX_ERROR_BODY:
                    self._body += event.data[: _MAX_ERROR_BODY - len(self._body)]
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                if self._refusal is not None:
                    raise self._rejected()
                raise HandshakeError("server closed the connection before answering the upgrade")

    def _rejected(self) -> UpgradeRejected:
        assert self._refusal is not None
        r = self._refusal
        return UpgradeRejected(r.status_code, r.reason.decode("latin-1"), bytes(self._body))
