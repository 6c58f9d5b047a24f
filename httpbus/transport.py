"""The HTTP transport: an HTTP/1.1 upgrade, then the same frames as streambus (§2.1).

Thin by design: the sans-IO :mod:`httpbus.handshake` decides, this module moves bytes.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream

from shared.errors import HandshakeError

from .handshake import ClientHandshake, ServerHandshake

__all__ = ["TRANSPORT", "HttpTransport"]

_READ_SIZE = 65536


async def _receive_or_eof(stream: ByteStream) -> bytes:
    try:
        return await stream.receive(_READ_SIZE)
    except anyio.EndOfStream:
        return b""


class HttpTransport:
    name = "http"

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        stream = await anyio.connect_unix(path)
        try:
            handshake = ClientHandshake()
            await stream.send(handshake.request)
            while True:
                trailing = handshake.receive_data(await _receive_or_eof(stream))
                if trailing is not None:
                    return stream, trailing
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise

    async def accept(self, stream: ByteStream) -> bytes:
        handshake = ServerHandshake()
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


TRANSPORT = HttpTransport()
