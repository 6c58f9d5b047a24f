"""The stream transport: no connection start, frames from the first byte (PROTOCOL §2.2)."""

from __future__ import annotations

from anyio.abc import ByteStream

from shared.sockets import connect_unix

__all__ = ["TRANSPORT", "StreamTransport"]


class StreamTransport:
    name = "stream"

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        return await connect_unix(path), b""

    async def accept(self, stream: ByteStream) -> bytes:
        return b""


TRANSPORT = StreamTransport()
