"""The ``limit-raw-uds`` broker: the least a pure-Python fan-out broker can do.

Wire: every frame is a 2-byte big-endian length and a payload. A client's first frame is
one byte, ``P`` (publisher) or ``S`` (subscriber); a subscriber gets the frame ``A`` back
once it is registered. Frames from publishers go to every subscriber byte for byte: each
read's run of whole frames is collected, and all runs collected during one event-loop
iteration are written to each subscriber in one call. While any subscriber has more than
1 MiB unsent, the broker stops reading from publishers.

No hello, no routing, no counters, no validation: a yardstick, not a product.

usage: python -m shared.tools.bench.peers.rawuds_broker PATH [--uvloop]
"""

from __future__ import annotations

import asyncio  # noqa: TID251 - a plain-asyncio yardstick, outside the anyio library code
import os
import signal
import sys
from typing import cast

_ACK = b"\x00\x01A"
_HIGH_WATER = 1 << 20


def complete_end(data: bytes) -> int:
    """Where the complete 2-byte-length frames at the start of ``data`` end: the broker's
    only look at the bytes (also what benchmarks/broker_path.py measures as the floor)."""
    size = len(data)
    pos = 0
    while pos + 2 <= size:
        end = pos + 2 + ((data[pos] << 8) | data[pos + 1])
        if end > size:
            break
        pos = end
    return pos


class _Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.subscribers: list[asyncio.WriteTransport] = []
        self.publishers: set[_Conn] = set()
        self.blocked: set[_Conn] = set()
        self.pending: list[bytes] = []
        self.flush_scheduled = False

    def forward(self, chunk: bytes) -> None:
        self.pending.append(chunk)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        pending = self.pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        for sub in self.subscribers:
            sub.write(data)

    def block(self, conn: _Conn) -> None:
        if not self.blocked:
            for pub in self.publishers:
                pub.pause()
        self.blocked.add(conn)

    def unblock(self, conn: _Conn) -> None:
        self.blocked.discard(conn)
        if not self.blocked:
            for pub in self.publishers:
                pub.resume()


class _Conn(asyncio.Protocol):
    def __init__(self, hub: _Hub) -> None:
        self.hub = hub
        self.role = b""
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes.
        self.transport = cast(asyncio.Transport, transport)

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.tail:
            data = self.tail + data
            self.tail = b""
        if not self.role:
            if len(data) < 3:
                self.tail = data
                return
            self.role, data = data[2:3], data[3:]
            self._join()
        if self.role != b"P":
            return
        size = len(data)
        pos = complete_end(data)
        if pos:
            self.hub.forward(data if pos == size else data[:pos])
        if pos != size:
            self.tail = data[pos:]

    def _join(self) -> None:
        hub = self.hub
        assert self.transport is not None
        if self.role == b"S":
            self.transport.set_write_buffer_limits(high=_HIGH_WATER, low=_HIGH_WATER // 4)
            self.transport.write(_ACK)
            hub.subscribers.append(self.transport)
        else:
            hub.publishers.add(self)
            if hub.blocked:
                self.pause()

    def pause_writing(self) -> None:
        self.hub.block(self)

    def resume_writing(self) -> None:
        self.hub.unblock(self)

    def connection_lost(self, exc: Exception | None) -> None:
        hub = self.hub
        if self.role == b"S":
            if self.transport in hub.subscribers:
                hub.subscribers.remove(self.transport)
            hub.unblock(self)
        else:
            hub.publishers.discard(self)


async def _serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    hub = _Hub(loop)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await loop.create_unix_server(lambda: _Conn(hub), path, backlog=512)
    try:
        await stop
    finally:
        server.close()


def main(argv: list[str]) -> None:
    path = argv[0]
    if "--uvloop" in argv[1:]:
        import uvloop

        uvloop.run(_serve(path))
    else:
        asyncio.run(_serve(path))
    try:
        os.unlink(path)
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
