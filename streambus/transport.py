"""The stream transport: no connection start, frames from the first byte (PROTOCOL §2.2)."""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream

__all__ = ["TRANSPORT", "StreamTransport"]


class StreamTransport:
    name = "stream"

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        return await anyio.connect_unix(path), b""

    async def accept(self, stream: ByteStream) -> bytes:
        return b""


TRANSPORT = StreamTransport()
