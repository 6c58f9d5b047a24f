"""A byte stream seen as a stream of frames: the one frame read loop of the code base.

Both transports end up here once their connection start is done: the broker's per-peer
loop and the client's receive loop both call :meth:`FrameStream.receive`. Bytes that
arrived together with the HTTP head (h11's trailing data) are passed in as ``initial`` and
parsed before the socket is read again, so nothing pipelined is lost.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream

from .frame import FrameDecoder

__all__ = ["RECEIVE_SIZE", "FrameStream"]

#: Bytes asked for per read. Large enough that a busy peer's frames arrive many per read.
RECEIVE_SIZE = 256 * 1024


class FrameStream:
    """Frames over any anyio byte stream.

    Args:
        stream: the connected byte stream (after any handshake).
        header_len: frame header width of the profile (2 or 3).
        max_frame_len: the largest payload accepted from the peer.
        initial: bytes already read from ``stream`` that belong to the frame stream.
    """

    __slots__ = ("_decoder", "_initial", "stream")

    def __init__(
        self,
        stream: ByteStream,
        *,
        header_len: int,
        max_frame_len: int | None = None,
        initial: bytes = b"",
    ) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(header_len, max_frame_len)
        self._initial = initial

    async def receive(self) -> list[bytes]:
        """Wait for at least one whole frame; return every frame completed so far.

        Raises:
            anyio.EndOfStream: the peer closed the stream cleanly between frames.
            RemoteProtocolError: the peer closed inside a frame or announced an oversize one.
            anyio.BrokenResourceError: the connection broke.
        """
        if self._initial:
            data, self._initial = self._initial, b""
            frames = self._decoder.feed(data)
            if frames:
                return frames
        receive = self.stream.receive
        feed = self._decoder.feed
        if self._decoder.failed:
            feed(b"")  # raises the latched error instead of waiting on a broken peer
        while True:
            try:
                data = await receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                self._decoder.eof()
                raise
            frames = feed(data)
            if frames:
                return frames

    async def send(self, data: bytes) -> None:
        """Write already framed bytes (one or many frames) in one call."""
        await self.stream.send(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
