"""A byte stream seen as a stream of frames: the one frame read loop of the code base.
(:class:`ObjectStream`: the same for a client granted ``unframed`` deliveries.)

Both transports end up here once their connection start is done: the broker's per-peer
loop and the client's receive loop both call :meth:`FrameStream.receive`. Bytes that
arrived together with the HTTP head (h11's trailing data) are passed in as ``initial`` and
parsed before the socket is read again, so nothing pipelined is lost.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import ByteStream

from .codec import MsgpackStreamDecoder
from .frame import FrameDecoder

__all__ = ["OBJECT_RECEIVE_SIZE", "RECEIVE_SIZE", "FrameStream", "ObjectStream"]

#: Bytes asked for per read. Large enough that a busy peer's frames arrive many per read.
RECEIVE_SIZE = 256 * 1024
#: Bytes an ObjectStream asks for per read: a few hundred deliveries. The Unpacker decodes
#: a whole read at once, and a read's worth of decoded maps alive together costs more per
#: event than the call per read saved (measured: 761 ns/event at ~300 events per read,
#: 912 at ~3 000; docs/benchmarks.md). The transport's buffer is not smaller for it.
OBJECT_RECEIVE_SIZE = 16 * 1024


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

    __slots__ = ("_clock", "_decoder", "_initial", "frame_started", "stream")

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

    async def aclose(self) -> None:
        await self.stream.aclose()


class ObjectStream:
    """The client's receive side when the broker writes deliveries as bare MessagePack
    objects (``unframed``, docs/protocol.md §8): :meth:`receive` returns the decoded
    objects of each read, not payloads. Writing is unchanged (frames).

    Args:
        stream: the connected byte stream, after the welcome.
        max_len: the largest delivery accepted (the profile's frame payload limit).
        initial: bytes already read past the welcome.
    """

    __slots__ = ("_decoder", "_initial", "stream")

    def __init__(self, stream: ByteStream, *, max_len: int, initial: bytes = b"") -> None:
        self.stream = stream
        self._decoder = MsgpackStreamDecoder(max_len)
        self._initial = initial

    async def receive(self) -> list[object]:
        """Wait for at least one whole object; return every object completed so far.

        Raises:
            anyio.EndOfStream: the peer closed the stream cleanly between objects.
            RemoteProtocolError: undecodable bytes, an object over the limit, or the peer
                closed inside an object.
            anyio.BrokenResourceError: the connection broke.
        """
        decoder = self._decoder
        feed = decoder.feed
        if self._initial:
            objects = feed(self._initial)
            self._initial = b""
            if objects:
                return objects
        if decoder.failed:
            feed(b"")  # raises the latched error
        receive = self.stream.receive
        while True:
            try:
                objects = feed(await receive(OBJECT_RECEIVE_SIZE))
            except anyio.EndOfStream:
                decoder.eof()
                raise
            if objects:
                return objects

    async def send(self, data: bytes) -> None:
        """Write already framed bytes (one or many frames) in one call."""
        await self.stream.send(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
