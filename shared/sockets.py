"""Unix socket streams that are safe to cancel while they wait for data.

anyio's asyncio backend waits for a readable socket with ``loop.add_reader(sock,
future.set_result, None)``. If the waiting task is cancelled in the same loop iteration in
which the socket turns readable (a peer's EOF while the broker shuts down, a replaced
connection), the queued ``set_result`` runs on a cancelled future and asyncio logs an
``InvalidStateError`` "Exception in callback" (and anyio's pytest plugin fails the test).
``anyio.wait_readable`` does not have that flaw, so :class:`GuardedStream` receives with
it and the raw socket; it sends the same way (``anyio.wait_writable``: a writer waiting for
room has the same race), and leaves everything else to the wrapped anyio stream.

Remove :class:`GuardedStream` once anyio's ``_RawSocketMixin`` tolerates the race (it
already does so in ``aclose``, anyio PR #1269).

On asyncio's own (selector) event loop the socket goes to an asyncio transport instead
(:class:`TransportStream`): the socket stays registered for reading while the connection
lives, and what arrives is read by the loop's callback, so a receive that waits costs one
task wake-up and no system call beyond the read itself. A raw-socket receive costs a
schedule point, a ``recv`` that finds nothing, an ``epoll_ctl`` to register and one to
unregister, and a loop turn more, per wake-up: at a fixed rate, where every event wakes
every process, that is a good part of each process's CPU per event (docs/benchmarks.md,
"Latency at a fixed rate, session 4"). A transport has no such race: a cancelled receive
leaves the bytes in the buffer. The broker may also take a read right in the transport's
callback while its reader waits (:attr:`TransportStream.on_data`, used by
shared/stream.py's ``FrameStream.read_inline``), which saves the task wake-up too.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 - the transport below is asyncio's; used only on asyncio's loop
import errno
import socket
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, SocketAttribute

__all__ = ["GuardedStream", "TransportStream", "connect_unix", "guard"]


def _send_at_once(sock: socket.socket, data: bytes) -> int:
    """The bytes of ``data`` the socket takes without waiting (0 when its buffer is full),
    for a stream its caller has checked is open: a descriptor closed under it (EBADF) is
    a closed stream, any other error a broken one, as in the streams' ``send``."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise anyio.ClosedResourceError from None
        raise anyio.BrokenResourceError from exc


def _peek(sock: socket.socket, max_bytes: int) -> bytes:
    try:
        return sock.recv(max_bytes, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return b""


def _discard(sock: socket.socket, size: int) -> None:
    # (a stream socket gives a reader every byte it peeked, in one call)
    taken = sock.recv(size, socket.MSG_DONTWAIT)
    if len(taken) != size:
        raise anyio.BrokenResourceError(f"took {len(taken)} of {size} peeked bytes")


class GuardedStream(ByteStream):
    """A byte stream over a connected Unix socket; see the module docstring."""

    def __init__(self, inner: ByteStream, sock: socket.socket) -> None:
        self._inner = inner
        self._sock = sock
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        # As trio's own socket streams: a cancellation is taken first; a receive that has
        # to wait yields in the wait; one that finds bytes at once yields after reading
        # them, shielded (so a cancellation cannot lose them). One schedule point per
        # receive either way, not one plus the wait.
        await anyio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        waited = False
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                if self._closed or exc.errno == errno.EBADF:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            if not waited:
                await anyio.lowlevel.cancel_shielded_checkpoint()
            if not data:
                raise anyio.EndOfStream
            return data

    def peek_nowait(self, max_bytes: int) -> bytes:
        """The bytes a receive would get now, left in the socket; b"" when none wait (or
        the socket is closed or broken: the next receive finds out)."""
        return b"" if self._closed else _peek(self._sock, max_bytes)

    def discard_nowait(self, size: int) -> None:
        """Take ``size`` bytes that :meth:`peek_nowait` showed (this is their only reader)."""
        _discard(self._sock, size)

    async def send(self, item: bytes) -> None:
        # The same race on the way out: a writer blocked on a full socket and cancelled
        # just as the peer reads (the broker does exactly that when a client half-closes
        # and drains, see Client._close_politely). Like trio's send: a cancellation is
        # taken before anything is written, the schedule point comes after.
        await anyio.lowlevel.checkpoint_if_cancelled()
        sock = self._sock
        view = memoryview(item)
        while view:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(sock)
                continue
            except OSError as exc:
                if self._closed or exc.errno == errno.EBADF:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            view = view[sent:]
        await anyio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes) -> int:
        """Write what the socket takes at once, without waiting: returns the bytes written
        (0 when its buffer is full). The caller must not have a :meth:`send` of this stream
        in progress (the bytes would interleave). Raises as :meth:`send` does."""
        if self._closed:
            raise anyio.ClosedResourceError
        return _send_at_once(self._sock, data)

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


#: Bytes a TransportStream holds unread before it stops reading the socket (then the
#: kernel's buffer fills and the peer's writes wait, as without the transport).
_READ_AHEAD = 256 * 1024
#: Bytes the transport asks for per read at first (asyncio's default is 256 KiB). Below
#: glibc malloc's mmap threshold (128 KiB at start): a read of 256 KiB is allocated with
#: ``mmap``, shrunk to what came with ``mremap`` and freed with ``munmap``, three system
#: calls and a page fault per read, and at a fixed rate every read is a wake-up of its
#: own (docs/benchmarks.md, "Broker reads in the transport callback, session 5").
_TRANSPORT_READ = 64 * 1024
#: ... and once a read fills that (a busy peer): larger reads mean fewer, larger batches
#: (64 KiB ones cost a flood's broker ~20 % more CPU per delivery, compiled), and after the
#: first full 256 KiB read is freed, malloc serves reads of that size from its heap.
_TRANSPORT_READ_BUSY = 256 * 1024


class _Protocol(asyncio.Protocol):
    """What the transport calls back: bytes in, end of stream, loss, write pressure."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.lost = False
        self.exc: BaseException | None = None
        self.reading_paused = False
        self.writing_paused = False
        #: The task waiting in receive (a future it awaits), if any.
        self.waiter: asyncio.Future[None] | None = None
        #: The task waiting in send for the transport's buffer to empty, if any.
        self.drained: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        #: Called by data_received while a task waits in receive (TransportStream.on_data):
        #: True when it took the bytes itself, so the waiting task need not be woken.
        self.on_data: Callable[[], bool] | None = None
        #: What the next receive raises (TransportStream.fail_receive), if anything.
        self.failure: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        size = len(data)
        self.size += size
        if size == _TRANSPORT_READ and self.transport is not None:
            setattr(self.transport, "max_size", _TRANSPORT_READ_BUSY)  # noqa: B010 - see guard()
        if self.size >= _READ_AHEAD and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        on_data = self.on_data
        if on_data is not None and on_data() and not self.chunks:
            return
        self.wake()

    def eof_received(self) -> bool:
        self.eof = True
        self.wake()
        return True  # half-closed: we may still write (a polite close drains both ways)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None:
            self.exc = exc
        self.wake()
        self.writing_paused = False
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drained = self.drained
        if drained is not None and not drained.done():
            drained.set_result(None)


class TransportStream(ByteStream):
    """A connected Unix socket on an asyncio transport (asyncio's selector loop only); see
    the module docstring. Same contract as :class:`GuardedStream`: ``receive`` and
    ``send`` are schedule points, ``send`` returns once the socket took every byte (the
    transport's buffer holds nothing: its high-water mark is 0), ``send_nowait`` writes
    what the socket takes at once."""

    def __init__(self, inner: ByteStream, sock: socket.socket, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._inner = inner
        self._sock = sock
        self._transport = transport
        self._protocol = protocol
        self._closed = False
        # (asyncio.get_running_loop() asks the kernel for the pid each time: once is enough)
        self._loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=0, low=0)

    def _broken(self) -> BaseException:
        if self._closed:
            return anyio.ClosedResourceError()
        return anyio.BrokenResourceError()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        proto = self._protocol
        if proto.chunks:
            # Bytes are here already: still a schedule point (a busy peer must not keep
            # this task from letting others run); a cancellation leaves them buffered.
            await anyio.lowlevel.checkpoint()
        else:
            # (No checkpoint_if_cancelled first: a cancelled scope cancels the wait below.)
            while not proto.chunks and not proto.eof and not proto.lost and not self._closed and proto.failure is None:
                proto.waiter = waiter = self._loop.create_future()
                try:
                    await waiter
                finally:
                    proto.waiter = None
        if proto.failure is not None:
            failure, proto.failure = proto.failure, None
            raise failure
        data = self.receive_nowait(max_bytes)
        if not data:
            if self._closed:
                raise anyio.ClosedResourceError
            if proto.exc is not None:
                raise anyio.BrokenResourceError from proto.exc
            raise anyio.EndOfStream  # (eof, or lost without an error: the peer closed)
        return data

    def receive_nowait(self, max_bytes: int = 65536) -> bytes:
        """What :meth:`receive` returns, taken from the bytes already here without a
        schedule point: b"" when there are none (whether or not the stream has ended)."""
        proto = self._protocol
        chunks = proto.chunks
        if not chunks:
            return b""
        data = chunks.popleft()
        if len(data) > max_bytes:
            chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        elif chunks and len(data) + len(chunks[0]) <= max_bytes:
            parts = [data]
            size = len(data)
            while chunks and size + len(chunks[0]) <= max_bytes:
                part = chunks.popleft()
                parts.append(part)
                size += len(part)
            data = b"".join(parts)
        proto.size -= len(data)
        if proto.reading_paused and proto.size < _READ_AHEAD and not proto.lost:
            proto.reading_paused = False
            self._transport.resume_reading()
        return data

    def peek_nowait(self, max_bytes: int) -> bytes:
        """As :meth:`GuardedStream.peek_nowait`, while the transport holds no bytes (else
        b""): what the socket holds comes after them."""
        proto = self._protocol
        if self._closed or proto.chunks or proto.eof or proto.lost or proto.reading_paused:
            return b""
        return _peek(self._sock, max_bytes)

    def discard_nowait(self, size: int) -> None:
        """As :meth:`GuardedStream.discard_nowait` (the transport's next read of the
        socket then finds nothing, which it takes in its stride)."""
        _discard(self._sock, size)

    @property
    def on_data(self) -> Callable[[], bool] | None:
        """Called, in the transport's callback, when bytes arrive while a task waits in
        :meth:`receive`: it may take them (:meth:`receive_nowait`) and return True, and the
        waiting task is not woken (a burst then costs no task wake-up and no loop turn). It
        must not raise: what it fails with goes to :meth:`fail_receive`."""
        return self._protocol.on_data

    @on_data.setter
    def on_data(self, callback: Callable[[], bool] | None) -> None:
        self._protocol.on_data = callback

    def fail_receive(self, exc: BaseException) -> None:
        """Make the waiting (or the next) :meth:`receive` raise ``exc``, before any bytes."""
        self._protocol.failure = exc
        self._protocol.wake()

    async def send(self, item: bytes) -> None:
        # As GuardedStream.send: a cancellation is taken before anything is written, the
        # schedule point comes after.
        await anyio.lowlevel.checkpoint_if_cancelled()
        proto = self._protocol
        if self._closed or proto.lost or self._transport.is_closing():
            raise self._broken()
        transport = self._transport
        try:
            transport.write(item)
        except RuntimeError:  # after send_eof: a raw socket says EPIPE
            raise anyio.BrokenResourceError from None
        if transport.is_closing():
            # The write failed (the transport closes itself; connection_lost comes later).
            raise self._broken()
        while proto.writing_paused and not proto.lost:
            # The socket did not take it all: wait until the transport has written the rest.
            proto.drained = drained = self._loop.create_future()
            try:
                await drained
            finally:
                proto.drained = None
        if proto.lost:
            raise self._broken()
        await anyio.lowlevel.cancel_shielded_checkpoint()

    def send_nowait(self, data: bytes) -> int:
        """As :meth:`GuardedStream.send_nowait`. (The transport's buffer is empty whenever
        no :meth:`send` is in progress, so writing to the socket directly keeps the order.)"""
        proto = self._protocol
        if self._closed or proto.lost:
            raise self._broken()
        if self._transport.get_write_buffer_size():
            return 0
        return _send_at_once(self._sock, data)

    async def send_eof(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._protocol.lost:
            raise anyio.BrokenResourceError
        # (after what is buffered, if anything; send() leaves nothing buffered)
        self._transport.write_eof()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Like closing a raw socket: what a cancelled send left behind is not written.
            self._transport.abort()
            self._protocol.wake()
        await anyio.lowlevel.checkpoint()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


def _on_selector_loop() -> bool:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False  # (trio)
    return isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)


async def guard(stream: ByteStream) -> ByteStream:
    """Wrap an anyio socket stream: on asyncio's selector loop in a :class:`TransportStream`,
    elsewhere (trio, uvloop) in a :class:`GuardedStream`; any other stream is returned as
    it is."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return stream
    if _on_selector_loop() and sock.family == socket.AF_UNIX:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.connect_accepted_socket(_Protocol, sock)
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        assert isinstance(transport, asyncio.Transport) and isinstance(protocol, _Protocol)
        # (an attribute of the selector loop's socket transports, read at every read)
        setattr(transport, "max_size", _TRANSPORT_READ)  # noqa: B010
        return TransportStream(stream, sock, transport, protocol)
    return GuardedStream(stream, sock)


async def connect_unix(path: str) -> ByteStream:
    """``anyio.connect_unix``, guarded."""
    return await guard(await anyio.connect_unix(path))
