"""A byte stream seen as a stream of frames: the one frame read loop of the code base.

Both transports end up here once their connection start is done: the broker's per-peer
loop and the client's receive loop both call :meth:`FrameStream.receive`. Bytes that
arrived together with the HTTP head (h11's trailing data) are passed in as ``initial`` and
parsed before the socket is read again, so nothing pipelined is lost.
"""

from __future__ import annotations

from collections.abc import Callable

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
        clock: what ``frame_started`` is read from (the broker's injected clock, if any).

    ``frame_started`` is when the incomplete frame now buffered began to arrive (on
    ``clock``, by default :func:`anyio.current_time`), or None between frames: the broker uses it to drop
    a peer that stops in the middle of a frame (``frame_timeout``).
    """

    __slots__ = ("_clock", "_decoder", "_initial", "_send_nowait", "frame_started", "stream")

    def __init__(
        self,
        stream: ByteStream,
        *,
        header_len: int,
        max_frame_len: int | None = None,
        initial: bytes = b"",
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.stream = stream
        self._send_nowait: Callable[[bytes], int] | None = getattr(stream, "send_nowait", None)
        self._clock = clock
        self._decoder = FrameDecoder(header_len, max_frame_len)
        self._initial = initial
        self.frame_started: float | None = None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held (see :attr:`FrameDecoder.buffered`)."""
        return self._decoder.buffered

    @property
    def frame_size(self) -> int:
        """Header plus payload of the incomplete frame held, once its header is in."""
        return self._decoder.wanted

    async def receive(self) -> list[bytes]:
        """Wait for at least one whole frame; return every frame completed so far.

        Raises:
            anyio.EndOfStream: the peer closed the stream cleanly between frames.
            RemoteProtocolError: the peer closed inside a frame or announced an oversize one.
            anyio.BrokenResourceError: the connection broke.
        """
        decoder = self._decoder
        if self._initial:
            frames = decoder.feed(self._initial)
            self._initial = b""
            self._track(frames)
            if frames:
                return frames
        receive = self.stream.receive
        feed = decoder.feed
        if decoder.failed:
            feed(b"")  # raises the latched error instead of waiting on a broken peer
        while True:
            # The chunk read is never bound to a name that outlives the feed: a local kept
            # it alive through the next wait, so a peer stopped inside a frame pinned its
            # bytes twice (the chunk and the decoder's copy of it).
            try:
                frames = feed(await receive(RECEIVE_SIZE))
            except anyio.EndOfStream:
                decoder.eof()
                raise
            self._track(frames)
            if frames:
                return frames

    def _track(self, frames: list[bytes]) -> None:
        # A read that completed frames and left a tail started a new frame just now.
        if self._decoder.buffered:
            if frames or self.frame_started is None:
                self.frame_started = self._clock()
        else:
            self.frame_started = None

    async def send(self, data: bytes) -> None:
        """Write already framed bytes (one or many frames) in one call."""
        await self.stream.send(data)

    def send_nowait(self, data: bytes) -> int:
        """Write what the socket takes at once, without a schedule point; returns the bytes
        written: 0 when the socket is full, or when the stream cannot write without waiting
        (not a socket we own: shared/sockets.py). Never call it while a :meth:`send` is in
        progress. Raises as :meth:`send` does."""
        if self._send_nowait is None:
            return 0
        return self._send_nowait(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
