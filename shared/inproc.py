"""A connection inside one process: the embedded host's own client and its broker.

The worker that hosts the embedded broker (:mod:`shared.hosting`) also runs a client of
it. Over the Unix socket, each hop between the two costs system calls and, on asyncio,
two turns of the event loop (the selector reports the socket readable on one turn; the
waiting task runs on the next), and each of those turns waits behind the host's ready
HTTP callbacks. :func:`pipe` gives both ends an in-memory byte stream instead: the bytes
written are handed to the reader as they are (no copy, no system call), and a waiting
reader is woken directly (one turn).

Everything above the byte stream is unchanged: the same handshake frames (hello, welcome),
the same :class:`~shared.stream.FrameStream` / :class:`~shared.stream.ObjectStream` read
loops on both sides, the same queues, writers, lifecycle events, capabilities and
sequence numbers. Backpressure is a socket's: a writer waits while the reader has
:data:`PIPE_LIMIT` bytes unread (``send_nowait`` then takes nothing), so a host client
that stops reading fills its broker queue, whose overflow policy and drop counting apply
as to any worker. Closing an end is a socket's close: the peer reads what was written
before it and then the end of the stream; the peer's writes fail.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream

from .transport import Transport

__all__ = ["PIPE_LIMIT", "LocalFirst", "PipeEnd", "pipe"]

#: Unread bytes at which a writer waits (about a Unix socket's send buffer).
PIPE_LIMIT = 256 * 1024


class _Direction:
    """The bytes going one way, and who waits on them."""

    __slots__ = ("chunks", "eof", "readable", "reader_gone", "size", "writable")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        #: The writer half-closed or closed: the reader gets the end of the stream once
        #: the chunks are read.
        self.eof = False
        #: The reader closed its end: writes fail.
        self.reader_gone = False
        self.readable: anyio.Event | None = None
        self.writable: anyio.Event | None = None

    def wake_reader(self) -> None:
        event, self.readable = self.readable, None
        if event is not None:
            event.set()

    def wake_writer(self) -> None:
        event, self.writable = self.writable, None
        if event is not None:
            event.set()

    def take(self, max_bytes: int) -> bytes:
        chunks = self.chunks
        first = chunks.popleft()
        if len(first) > max_bytes:
            chunks.appendleft(first[max_bytes:])
            first = first[:max_bytes]
        elif chunks and len(first) + len(chunks[0]) <= max_bytes:
            # Several writes waiting (small control frames, a writer that ran twice):
            # one read, as a socket would give.
            parts = [first]
            total = len(first)
            while chunks and total + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                total += len(part)
            first = b"".join(parts)
        self.size -= len(first)
        if self.size < PIPE_LIMIT:
            self.wake_writer()
        return first


class PipeEnd(ByteStream):
    """One end of a :func:`pipe`; an anyio byte stream with a socket's behaviour (see the
    module docstring), plus ``send_nowait`` as :class:`shared.sockets.GuardedStream` has."""

    __slots__ = ("_closed", "_in", "_out")

    def __init__(self, incoming: _Direction, outgoing: _Direction) -> None:
        self._in = incoming
        self._out = outgoing
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        incoming = self._in
        if incoming.chunks:
            # Data waits: still a schedule point (a peer that writes without pause must
            # not starve the rest of the process, and a cancellation is taken here).
            await anyio.lowlevel.checkpoint()
        else:
            while not incoming.chunks:
                if self._closed:
                    raise anyio.ClosedResourceError
                if incoming.eof:
                    raise anyio.EndOfStream
                incoming.readable = event = anyio.Event()
                await event.wait()
        if self._closed:
            raise anyio.ClosedResourceError
        if not incoming.chunks:
            # (read by nobody else: only a close or an end of stream empties it meanwhile)
            raise anyio.EndOfStream
        return incoming.take(max_bytes)

    def _check_writable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._out.eof:
            raise anyio.ClosedResourceError  # (half-closed by this end)
        if self._out.reader_gone:
            raise anyio.BrokenResourceError

    async def send(self, item: bytes) -> None:
        # Like GuardedStream.send: a cancellation is taken before anything is written,
        # the schedule point comes after; the whole item is written at once.
        await anyio.lowlevel.checkpoint_if_cancelled()
        out = self._out
        while True:
            self._check_writable()
            if out.size < PIPE_LIMIT:
                break
            out.writable = event = anyio.Event()
            await event.wait()
        self._put(bytes(item))
        await anyio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes) -> int:
        """Write ``data`` at once if the reader has room for more: returns its length, or
        0 (nothing written) when the reader is :data:`PIPE_LIMIT` bytes behind. Raises as
        :meth:`send` does."""
        self._check_writable()
        if self._out.size >= PIPE_LIMIT:
            return 0
        self._put(bytes(data))
        return len(data)

    def _put(self, data: bytes) -> None:
        if not data:
            return
        out = self._out
        out.chunks.append(data)
        out.size += len(data)
        out.wake_reader()

    async def send_eof(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        self._out.eof = True
        self._out.wake_reader()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Our reading side: the peer's writes fail from now on (and a write waiting for
        # room wakes to fail); what it wrote and we did not read is gone, as in a socket.
        incoming = self._in
        incoming.reader_gone = True
        incoming.chunks.clear()
        incoming.size = 0
        incoming.wake_writer()
        incoming.wake_reader()  # (our own receive, if one waits: it raises Closed)
        # Our writing side: the peer reads what we wrote, then the end of the stream.
        self._out.eof = True
        self._out.wake_reader()
        self._out.wake_writer()  # (our own send, if one waits: it raises Closed)


def pipe() -> tuple[PipeEnd, PipeEnd]:
    """Two connected in-memory byte stream ends (e.g. a client's and a broker's)."""
    one, other = _Direction(), _Direction()
    return PipeEnd(one, other), PipeEnd(other, one)


class LocalFirst:
    """A client transport that connects in process when it can: ``attach()`` returns an
    end whose peer the broker serves (:meth:`shared.hosting.Hosting.attach`), or None, and
    then the ``inner`` transport connects over the socket as usual; an ``OSError`` from it
    is a failed connect (retried after the client's backoff).

    In process there is no connection start (the broker side skips it for a pipe end);
    the hello is written at once, as ``connect_with`` promises.
    """

    def __init__(
        self, inner: Transport, attach: Callable[[], PipeEnd | None], hosting: Callable[[], bool]
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self._attach = attach
        self._hosting = hosting
        #: Whether the latest connection made was in process.
        self.attached = False

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        return await self.connect_with(path, b"")

    async def connect_with(self, path: str, first: bytes) -> tuple[ByteStream, bytes]:
        self.attached = False
        mine = self._attach()  # (raises OSError while our own broker is starting)
        self.attached = mine is not None
        if mine is not None:
            if first:
                mine.send_nowait(first)  # (an empty pipe takes it whole)
            return mine, b""
        early = getattr(self.inner, "connect_with", None)
        if early is not None:
            stream, initial = await early(path, first)
            first = b""
        else:
            stream, initial = await self.inner.connect(path)
        if self._hosting():
            # This worker won the election while the socket connected (a takeover): that
            # is our own broker. Connect again, in process: a failed connect for the client
            # (with the http transport its hello is in already; the broker then sees it
            # come and go, in the takeover's held lifecycle events).
            await anyio.aclose_forcefully(stream)
            raise ConnectionRefusedError("this worker hosts the broker now")
        if first:
            try:
                await stream.send(first)
            except BaseException:
                await anyio.aclose_forcefully(stream)
                raise
        return stream, initial

    async def accept(self, stream: ByteStream) -> bytes:
        return await self.inner.accept(stream)
