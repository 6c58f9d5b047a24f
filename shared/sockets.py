"""Unix socket streams that are safe to cancel while they wait for data.

anyio's asyncio backend waits for a readable socket with ``loop.add_reader(sock,
future.set_result, None)``. If the waiting task is cancelled in the same loop iteration in
which the socket turns readable (a peer's EOF while the broker shuts down, a replaced
connection), the queued ``set_result`` runs on a cancelled future and asyncio logs an
``InvalidStateError`` "Exception in callback" (and anyio's pytest plugin fails the test).
``anyio.wait_readable`` does not have that flaw, so :class:`GuardedStream` receives with
it and the raw socket; it sends the same way (``anyio.wait_writable``: a writer waiting for
room has the same race), and leaves everything else to the wrapped anyio stream.

Remove this module once anyio's ``_RawSocketMixin`` tolerates the race (it already does so
in ``aclose``, anyio PR #1269).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import ByteStream, SocketAttribute

__all__ = ["GuardedStream", "connect_unix", "guard"]


class GuardedStream(ByteStream):
    """A byte stream over a connected Unix socket; see the module docstring."""

    def __init__(self, inner: ByteStream, sock: socket.socket) -> None:
        self._inner = inner
        self._sock = sock
        self._closed = False

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await anyio.lowlevel.checkpoint()
        sock = self._sock
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(sock)
                continue
            except OSError as exc:
                if self._closed or exc.errno == errno.EBADF:
                    raise anyio.ClosedResourceError from None
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

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
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if self._closed or exc.errno == errno.EBADF:
                raise anyio.ClosedResourceError from None
            raise anyio.BrokenResourceError from exc

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        self._closed = True
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self._inner.extra_attributes


def guard(stream: ByteStream) -> ByteStream:
    """Wrap an anyio socket stream; any other stream is returned as it is."""
    try:
        sock = stream.extra(SocketAttribute.raw_socket)
    except anyio.TypedAttributeLookupError:
        return stream
    return GuardedStream(stream, sock)


async def connect_unix(path: str) -> ByteStream:
    """``anyio.connect_unix``, guarded."""
    return guard(await anyio.connect_unix(path))
