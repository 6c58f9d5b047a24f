"""``limit-raw-uds``: the minimal broker of :mod:`.rawuds_broker` with plain asyncio-stream
clients. It does nothing a real bus must do (no hello, no queues that survive a reconnect,
no routing, no counters), so it marks how close a pure-Python broker with this wire format
can get to the machine: the yardstick for workerbus.

Publishers pack ``{"source", "event", "data"}`` with msgpack, frame it, and write whenever
64 KiB have collected (or on flush). Subscribers read up to 256 KiB at a time and decode
every frame in it.
"""

from __future__ import annotations

import asyncio  # noqa: TID251 - a plain-asyncio yardstick, outside the anyio library code
import os
import sys
from typing import Any

import msgpack

from shared.tools.bench.tally import Tally

from .base import (
    BrokerHandle,
    Peer,
    Publisher,
    RunSetup,
    Subscription,
    missing,
    spawn,
    stopper,
    wait_for_socket,
)

__all__ = ["RawPublisher", "RawUdsPeer", "open_publisher", "open_subscriber", "receive_events", "take_events"]

_HELLO_PUB = b"\x00\x01P"
_HELLO_SUB = b"\x00\x01S"
_ACK = b"\x00\x01A"
_WRITE_AT = 64 * 1024
_READ_SIZE = 256 * 1024


class RawPublisher:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._buf = bytearray()
        self._pack = msgpack.Packer().pack

    async def publish(self, source: str, event: str, data: Any) -> None:
        payload = self._pack({"source": source, "event": event, "data": data})
        buf = self._buf
        buf += len(payload).to_bytes(2, "big")
        buf += payload
        if len(buf) >= _WRITE_AT:
            await self.flush()

    async def flush(self) -> None:
        if self._buf:
            self._writer.write(self._buf)
            self._buf = bytearray()
        await self._writer.drain()

    async def close(self) -> None:
        await self.flush()
        self._writer.close()


def take_events(buf: bytearray, unpack: Any = msgpack.unpackb) -> list[tuple[str, str, Any]]:
    """Decode and remove the complete frames at the start of ``buf``: the subscriber's work.

    Also what benchmarks/client_path.py measures as the raw client's floor.
    """
    size = len(buf)
    pos = 0
    out = []
    view = memoryview(buf)
    while pos + 2 <= size:
        end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
        if end > size:
            break
        msg = unpack(view[pos + 2 : end])
        out.append((msg["source"], msg["event"], msg["data"]))
        pos = end
    view.release()
    del buf[:pos]
    return out


async def receive_events(reader: asyncio.StreamReader, buf: bytearray) -> list[tuple[str, str, Any]]:
    """Read until at least one whole frame is in ``buf``; return every event decoded.

    ``buf`` keeps a partial frame for the next call. Raises EOFError when the broker is gone.
    """
    read = reader.read
    while True:
        chunk = await read(_READ_SIZE)
        if not chunk:
            raise EOFError("the broker closed the connection")
        buf += chunk
        out = take_events(buf)
        if out:
            return out


async def open_publisher(path: str) -> RawPublisher:
    """A publisher connection to the broker at ``path`` (it receives nothing)."""
    _reader, writer = await asyncio.open_unix_connection(path)
    writer.write(_HELLO_PUB)
    await writer.drain()
    return RawPublisher(writer)


async def open_subscriber(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A subscriber connection, returned once the broker registered it (every frame
    published from then on reaches it)."""
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    writer.write(_HELLO_SUB)
    await writer.drain()
    ack = await reader.readexactly(len(_ACK))
    if ack != _ACK:
        raise RuntimeError(f"unexpected answer to the hello: {ack!r}")
    return reader, writer


class _RawSubscription:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally):
        self._reader = reader
        self._writer = writer
        self._tally = tally
        self._buf = bytearray()

    async def run(self) -> None:
        tally = self._tally
        reader, buf = self._reader, self._buf
        while not tally.done:
            tally.take(await receive_events(reader, buf))

    async def close(self) -> None:
        self._writer.close()


class RawUdsPeer(Peer):
    """Minimal pure-Python broker (asyncio Protocol) and asyncio-stream clients."""

    def __init__(self, backend: str) -> None:
        self.client_backend = backend

    def describe(self) -> str:
        loop = "asyncio + uvloop" if self.client_backend == "uvloop" else "asyncio"
        return f"minimal broker (`shared/tools/bench/peers/rawuds_broker.py`) and clients, on {loop}"

    def unavailable(self) -> str | None:
        return missing("uvloop", "uvloop", "bench") if self.client_backend == "uvloop" else None

    def start(self, setup: RunSetup) -> BrokerHandle:
        path = os.path.join(setup.workdir, "raw.sock")
        setup.state["path"] = path
        argv = [sys.executable, "-m", "shared.tools.bench.peers.rawuds_broker", path]
        if self.client_backend == "uvloop":
            argv.append("--uvloop")
        proc = spawn(argv)
        try:
            wait_for_socket(path, proc)
        except BaseException:
            stopper(proc)()
            raise
        return BrokerHandle([proc.pid], stopper(proc))

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        return await open_publisher(setup.state["path"])

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        reader, writer = await open_subscriber(setup.state["path"])
        return _RawSubscription(reader, writer, tally)
