"""The stream transport: no connection start, frames from the first byte (PROTOCOL §2.2).

The broker still looks at the first bytes before it treats them as frames: an HTTP request
(``GET / HTTP/1.1`` and the like, e.g. a client configured for ``--transport http``, or
curl) reads as an absurd frame length that the broker would otherwise wait for until the
handshake deadline. It is recognised at once, answered with a plain ``400`` that says what
to do (an HTTP client shows it), and refused. A hello can never look like that: its length
is two or three bytes of which the first is 0 for any hello shorter than 256 bytes
(native) or 64 KiB (kong), while a request starts with an upper-case letter.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream

from httpbus.handshake import plain_response
from shared.errors import HandshakeError
from shared.sockets import connect_unix
from shared.transport import register_transport

__all__ = ["HTTP_ON_STREAM", "TRANSPORT", "StreamTransport", "looks_like_http"]

#: What the broker logs, and an HTTP client is told, when an HTTP request arrives here.
HTTP_ON_STREAM = "an HTTP request on the stream socket: use --transport http"
#: Request methods (RFC 9110, plus PATCH and HTTP/2's connection preface ``PRI``), each
#: followed by the space that ends it.
_METHODS = tuple(
    m + b" " for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH", b"PRI")
)
_LONGEST = max(map(len, _METHODS))
_READ_SIZE = 65536


def looks_like_http(start: bytes) -> bool | None:
    """Whether the first bytes of a connection are an HTTP request line (sans-IO).

    True or False once decided, None while ``start`` is a proper prefix of a method and
    more bytes are needed to tell.
    """
    for method in _METHODS:
        if start.startswith(method):
            return True
        if method.startswith(start):
            return None
    return False


class StreamTransport:
    name = "stream"

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        return await connect_unix(path), b""

    async def accept(self, stream: ByteStream) -> bytes:
        # (The broker's handshake deadline bounds this, like any connection start.)
        start = b""
        while True:
            start += await stream.receive(_READ_SIZE)
            verdict = looks_like_http(start[:_LONGEST])
            if verdict is None:
                continue
            if verdict:
                try:
                    await stream.send(plain_response(400, HTTP_ON_STREAM))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass  # it will not read the answer; the log line is what matters
                raise HandshakeError(HTTP_ON_STREAM)
            return start

    async def refuse(self, stream: ByteStream, status: int, text: str) -> None:
        # Nothing can be said before a hello: the peer may speak either profile, any
        # frame would be parsed as an event by an old client, and the kong profile must
        # stay byte-identical to lua-resty-events. The broker logs the refusal; the peer
        # sees the connection close.
        return


TRANSPORT = StreamTransport()
register_transport(TRANSPORT)  # makes transport="stream" work once this package is imported
