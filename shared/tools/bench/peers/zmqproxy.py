"""``pyzmq-proxy``: the XSUB/XPUB forwarder a pyzmq user would set up for pub/sub between
processes. Publishers are PUB sockets and subscribers SUB sockets (subscribed to
everything), both ``zmq.asyncio``; one zmq message is one msgpack event. High-water marks
are 0 so nothing is dropped; the harness's start-up probe waits out ZeroMQ's slow-joiner
window before anything is measured.
"""

from __future__ import annotations

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

__all__ = ["ZmqProxyPeer"]

#: Messages taken without waiting after the first one of a batch.
_DRAIN = 4096


class _ZmqPublisher:
    def __init__(self, ctx: Any, sock: Any) -> None:
        self._ctx = ctx
        self._sock = sock
        self._pack = msgpack.Packer().pack

    async def publish(self, source: str, event: str, data: Any) -> None:
        await self._sock.send(self._pack({"source": source, "event": event, "data": data}))

    async def flush(self) -> None:
        return None  # libzmq's I/O thread sends by itself

    async def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class _ZmqSubscription:
    def __init__(self, ctx: Any, sock: Any, tally: Tally) -> None:
        import zmq

        self._ctx = ctx
        self._sock = sock
        self._tally = tally
        # A blocking twin of the same socket, to drain what is already queued without
        # going through the event loop once per message.
        self._sync: Any = zmq.Socket.shadow(sock.underlying)
        self._again = zmq.Again
        self._noblock = zmq.NOBLOCK

    async def run(self) -> None:
        unpack = msgpack.unpackb
        tally = self._tally
        recv_now = self._sync.recv
        again, noblock = self._again, self._noblock
        while not tally.done:
            msg = unpack(await self._sock.recv())
            batch = [(msg["source"], msg["event"], msg["data"])]
            try:
                for _ in range(_DRAIN):
                    msg = unpack(recv_now(noblock))
                    batch.append((msg["source"], msg["event"], msg["data"]))
            except again:
                pass
            tally.take(batch)

    async def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()


class ZmqProxyPeer(Peer):
    """pyzmq `zmq.proxy(XSUB, XPUB)` on ipc://, PUB/SUB clients on zmq.asyncio."""

    def describe(self) -> str:
        return "pyzmq `zmq.proxy(XSUB, XPUB)` on ipc://, PUB/SUB clients on zmq.asyncio, HWM 0"

    def unavailable(self) -> str | None:
        return missing("zmq", "pyzmq", "bench")

    def start(self, setup: RunSetup) -> BrokerHandle:
        inbound = os.path.join(setup.workdir, "in.ipc")
        outbound = os.path.join(setup.workdir, "out.ipc")
        setup.state["in"] = f"ipc://{inbound}"
        setup.state["out"] = f"ipc://{outbound}"
        argv = [sys.executable, "-m", "shared.tools.bench.peers.zmqproxy_broker", setup.state["in"], setup.state["out"]]
        proc = spawn(argv)
        try:
            wait_for_socket(inbound, proc)
            wait_for_socket(outbound, proc)
        except BaseException:
            stopper(proc)()
            raise
        return BrokerHandle([proc.pid], stopper(proc))

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(setup.state["in"])
        return _ZmqPublisher(ctx, sock)

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(setup.state["out"])
        return _ZmqSubscription(ctx, sock, tally)
