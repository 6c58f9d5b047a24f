"""The HTTP transport: an HTTP/1.1 upgrade, then the same frames as streambus (§2.1).

Thin by design: the sans-IO :mod:`httpbus.handshake` decides, this module moves bytes.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream

from shared.errors import HandshakeError
from shared.sockets import connect_unix
from shared.transport import register_transport

from .handshake import DEFAULT_MAX_HEADER_BYTES, ClientHandshake, ServerHandshake, plain_response

__all__ = ["TRANSPORT", "HttpTransport"]

_READ_SIZE = 65536
#: How long a refused peer may take to finish sending its request (see ``refuse``).
_REFUSAL_DRAIN_SECONDS = 1.0


async def _receive_or_eof(stream: ByteStream) -> bytes:
    try:
        return await stream.receive(_READ_SIZE)
    except anyio.EndOfStream:
        return b""


class HttpTransport:
    """Args: max_header_bytes: the largest request head the broker side accepts."""

    name = "http"

    def __init__(self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> None:
        if max_header_bytes < 1:
            raise ValueError("max_header_bytes must be at least 1")
        self.max_header_bytes = max_header_bytes

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        return await self.connect_with(path, b"")

    async def connect_with(self, path: str, first: bytes) -> tuple[ByteStream, bytes]:
        """:meth:`connect`, with ``first`` (the hello) sent right behind the request, in
        the same write: the broker keeps what follows the request head for the frame
        stream, so the hello does not wait for the ``101`` (one round trip less per
        connect, which a failover's reconnects feel: docs/benchmarks.md)."""
        stream = await connect_unix(path)
        try:
            handshake = ClientHandshake()
            await stream.send(handshake.request + first)
            while True:
                trailing = handshake.receive_data(await _receive_or_eof(stream))
                if trailing is not None:
                    return stream, trailing
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise

    async def accept(self, stream: ByteStream) -> bytes:
        handshake = ServerHandshake(max_header_bytes=self.max_header_bytes)
        while True:
            outcome = handshake.receive_data(await _receive_or_eof(stream))
            if outcome is None:
                continue
            if outcome.response:
                await stream.send(outcome.response)
            if outcome.accepted:
                return outcome.trailing
            if not outcome.response:
                raise anyio.EndOfStream  # closed before sending a request: not an error
            raise HandshakeError(f"upgrade refused with {outcome.reason}")

    async def refuse(self, stream: ByteStream, status: int, text: str) -> None:
        # Answered at once, before the request is read. Then the request is read and
        # dropped until the peer closes (a second and one head's worth at most): closing
        # first could make the peer's write of its request fail before it reads the answer.
        await stream.send(plain_response(status, text))
        with anyio.move_on_after(_REFUSAL_DRAIN_SECONDS):
            received = 0
            while received <= self.max_header_bytes:
                try:
                    received += len(await stream.receive(_READ_SIZE))
                except anyio.EndOfStream:
                    return


TRANSPORT = HttpTransport()
register_transport(TRANSPORT)  # makes transport="http" work once this package is imported
