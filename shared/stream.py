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
import anyio.lowlevel
from anyio.abc import ByteStream

from .codec import MsgpackStreamDecoder
from .errors import RemoteProtocolError
from .frame import FrameDecoder
from .sockets import TransportStream

__all__ = ["OBJECT_PIECE", "RECEIVE_SIZE", "FrameStream", "ObjectStream"]

#: Bytes asked for per read. Large enough that a busy peer's frames arrive many per read.
RECEIVE_SIZE = 256 * 1024
#: Bytes of a read an ObjectStream decodes per call: a few hundred deliveries.
OBJECT_PIECE = 16 * 1024


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

    __slots__ = ("_clock", "_decoder", "_gate", "_initial", "_on_frames", "_send_nowait", "frame_started", "stream")

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
        self._on_frames: Callable[[list[bytes]], None] | None = None
        self._gate: Callable[[], bool] | None = None

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
            frames = self._feed(self._initial)
            self._initial = b""
            if frames:
                return frames
        receive = self.stream.receive
        feed = self._feed
        if decoder.failed:
            decoder.feed(b"")  # raises the latched error instead of waiting on a broken peer
        while True:
            # The chunk read is never bound to a name that outlives the feed: a local kept
            # it alive through the next wait, so a peer stopped inside a frame pinned its
            # bytes twice (the chunk and the decoder's copy of it).
            try:
                frames = feed(await receive(RECEIVE_SIZE))
            except anyio.EndOfStream:
                decoder.eof()
                raise
            if frames:
                return frames

    def peek(self) -> tuple[list[bytes], int]:
        """The whole frames waiting in the socket now, left there: the frames and their
        bytes (``take`` them after use). Nothing when that cannot be told without waiting
        or without taking: a stream that cannot peek (shared/sockets.py's streams can),
        bytes or an error already held, a bad frame."""
        peek = getattr(self.stream, "peek_nowait", None)
        decoder = self._decoder
        if peek is None or self._initial or decoder.buffered or decoder.failed:
            return [], 0
        data = peek(RECEIVE_SIZE)
        if not data:
            return [], 0
        probe = decoder.fresh()
        try:
            frames = probe.feed(data)
        except RemoteProtocolError:
            return [], 0  # the read task meets it, as always
        return frames, len(data) - probe.buffered

    def take(self, size: int) -> None:
        """Take the ``size`` bytes of frames that :meth:`peek` returned."""
        self.stream.discard_nowait(size)  # type: ignore[attr-defined]

    def _feed(self, data: bytes) -> list[bytes]:
        # The one parse step of a read, for receive and for _read_inline alike.
        frames = self._decoder.feed(data)
        self._track(frames)
        return frames

    def read_inline(self, on_frames: Callable[[list[bytes]], None] | None, gate: Callable[[], bool]) -> None:
        """Let the frames of a read go to ``on_frames`` right in the transport's callback
        while a task waits in :meth:`receive` and ``gate()`` says yes; None turns it off.

        Only on a stream that can hand over its bytes there (shared/sockets.py's
        TransportStream, asyncio's selector loop); elsewhere nothing changes. At a fixed
        rate every read wakes the process, and waking the waiting task costs one more turn
        of the event loop per read (docs/benchmarks.md, "Broker reads in the transport
        callback, session 5"). The parse is :meth:`receive`'s own (the same decoder, the
        same limits, the same ``frame_started``); whatever ``on_frames`` or the parse
        raises is raised by the waiting :meth:`receive` instead, so the reader ends exactly
        as if it had read the bytes itself."""
        stream = self.stream
        if not isinstance(stream, TransportStream):
            return
        self._on_frames = on_frames
        self._gate = gate
        stream.on_data = None if on_frames is None else self._read_inline

    def _read_inline(self) -> bool:
        on_frames = self._on_frames
        if on_frames is None or self._initial or self._decoder.failed:
            return False
        gate = self._gate
        if gate is not None and not gate():
            return False
        stream = self.stream
        assert isinstance(stream, TransportStream)
        try:
            frames = self._feed(stream.receive_nowait(RECEIVE_SIZE))
            if frames:
                on_frames(frames)
            if self._decoder.failed:
                self._decoder.feed(b"")  # raises what it latched (after the frames before it)
        except Exception as exc:  # noqa: BLE001 - raised by the reader's receive instead (see read_inline)
            stream.fail_receive(exc)
        return True

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


class ObjectStream:
    """The client's receive side when the broker writes deliveries as bare MessagePack
    objects (``unframed``, docs/protocol.md §8): :meth:`receive` returns decoded objects,
    not payloads. Writing is unchanged (frames).

    Reads are as large as a FrameStream's, but each is decoded a piece
    (:data:`OBJECT_PIECE`, a few hundred deliveries) per call: the Unpacker decodes what
    it is fed at once, and a whole read's maps alive together cost more per event than
    the calls saved (761 vs 912 ns/event at ~300 vs ~3 000 events; docs/benchmarks.md).
    (Asking the socket for 16 KiB per read instead was measured too: the broker's CPU per
    delivery rose, 0.35 -> 0.53 s/M in one window.) Between the pieces
    of one read the rest of the process gets a turn, shielded like the client's other
    turns between chunks: bytes read are handed over even if the connection is cancelled
    meanwhile (:meth:`rest`).

    Args:
        stream: the connected byte stream, after the welcome.
        max_len: the largest delivery accepted (the profile's frame payload limit).
        initial: bytes already read past the welcome.
    """

    __slots__ = ("_decoder", "_held", "_pos", "_send_nowait", "stream")

    def __init__(self, stream: ByteStream, *, max_len: int, initial: bytes = b"") -> None:
        self.stream = stream
        self._send_nowait: Callable[[bytes], int] | None = getattr(stream, "send_nowait", None)
        self._decoder = MsgpackStreamDecoder(max_len)
        #: The last read (or the initial bytes) and how much of it was fed so far.
        self._held = initial
        self._pos = 0

    async def receive(self) -> list[object]:
        """Wait for at least one whole object; return the objects of the next piece.

        Raises:
            anyio.EndOfStream: the peer closed the stream cleanly between objects.
            RemoteProtocolError: undecodable bytes, an object over the limit, or the peer
                closed inside an object.
            anyio.BrokenResourceError: the connection broke.
        """
        if self._pos < len(self._held):
            if self._pos:
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()
            objects = self._next_piece()
            if objects:
                return objects
        decoder = self._decoder
        if decoder.failed:
            decoder.feed(b"")  # raises the latched error
        receive = self.stream.receive
        while True:
            try:
                self._held = await receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                decoder.eof()
                raise
            self._pos = 0
            objects = self._next_piece()
            if objects:
                return objects

    def _next_piece(self) -> list[object]:
        # Feed pieces of the held read until one completes an object (or it is all fed).
        held = self._held
        feed = self._decoder.feed
        step = min(OBJECT_PIECE, self._decoder.piece_size)
        while self._pos < len(held):
            start = self._pos
            self._pos = start + step
            objects = feed(held[start : self._pos])
            if objects:
                return objects
        self._held = b""
        self._pos = 0
        return []

    def rest(self) -> list[object]:
        """Every object of the bytes read and not yet returned (the connection is being
        cut off: what was read still goes to the handlers). Stops at a bad one."""
        out: list[object] = []
        try:
            while self._pos < len(self._held):
                out += self._next_piece()
        except RemoteProtocolError:
            pass
        return out

    async def send(self, data: bytes) -> None:
        """Write already framed bytes (one or many frames) in one call."""
        await self.stream.send(data)

    def send_nowait(self, data: bytes) -> int:
        """As :meth:`FrameStream.send_nowait`."""
        if self._send_nowait is None:
            return 0
        return self._send_nowait(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
