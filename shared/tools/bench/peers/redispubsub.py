"""``redis-pubsub``: Debian's ``redis-server`` on a Unix socket in the run's temp dir, with
redis-py's asyncio client (hiredis parser when installed).

The server runs without persistence and without the pub/sub output-buffer limit (by
default redis disconnects a subscriber that is 32 MB behind), so a flood is buffered, not
dropped. Publishers pipeline up to 256 PUBLISH commands per round trip; subscribers read
with ``PubSub.get_message``. One channel, one msgpack payload per message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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

__all__ = ["RedisPeer", "RedisPublisher", "RedisSubscription"]

_CHANNEL = "bench"
_PIPELINE = 256


class RedisPublisher:
    """Publishes to ``channel``, pipelining up to ``pipeline`` PUBLISH commands per round
    trip (also the cluster peers' engine-direct publisher)."""

    def __init__(self, client: Any, channel: str = _CHANNEL, pipeline: int = _PIPELINE) -> None:
        self._client = client
        self._channel = channel
        self._pipeline = pipeline
        self._pending: list[bytes] = []
        self._pack = msgpack.Packer().pack

    async def publish(self, source: str, event: str, data: Any) -> None:
        self._pending.append(self._pack({"source": source, "event": event, "data": data}))
        if len(self._pending) >= self._pipeline:
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        pipe = self._client.pipeline(transaction=False)
        for payload in self._pending:
            pipe.publish(self._channel, payload)
        self._pending = []
        await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()


class RedisSubscription:
    def __init__(self, client: Any, pubsub: Any, tally: Tally) -> None:
        self._client = client
        self._pubsub = pubsub
        self._tally = tally

    async def run(self) -> None:
        tally = self._tally
        get = self._pubsub.get_message
        unpack = msgpack.unpackb
        while not tally.done:
            m = await get(ignore_subscribe_messages=True, timeout=None)
            if m is not None:
                msg = unpack(m["data"])
                tally.take([(msg["source"], msg["event"], msg["data"])])

    async def close(self) -> None:
        await self._pubsub.aclose()
        await self._client.aclose()


class RedisPeer(Peer):
    """Debian redis-server on a Unix socket, redis-py asyncio clients."""

    events_scale = 0.25

    def describe(self) -> str:
        return (
            "Debian `redis-server` on a Unix socket (no persistence, no pub/sub buffer limit), "
            "redis-py asyncio + hiredis, pipelined PUBLISH (256)"
        )

    def unavailable(self) -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (apt-get install redis-server)"
        return missing("redis.asyncio", "redis-py", "bench")

    def start(self, setup: RunSetup) -> BrokerHandle:
        exe = shutil.which("redis-server")
        assert exe is not None
        path = os.path.join(setup.workdir, "redis.sock")
        setup.state["path"] = path
        argv = [
            exe, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", setup.workdir,
            "--client-output-buffer-limit", "pubsub 0 0 0", "--loglevel", "warning",
        ]  # fmt: skip
        proc = spawn(argv, stderr=subprocess.DEVNULL)
        try:
            wait_for_socket(path, proc)
        except BaseException:
            stopper(proc)()
            raise
        return BrokerHandle([proc.pid], stopper(proc))

    async def publisher(self, setup: RunSetup, index: int) -> Publisher:
        import redis.asyncio

        return RedisPublisher(redis.asyncio.Redis(unix_socket_path=setup.state["path"]))

    async def subscriber(self, setup: RunSetup, index: int, tally: Tally) -> Subscription:
        import redis.asyncio

        client = redis.asyncio.Redis(unix_socket_path=setup.state["path"])
        pubsub = client.pubsub()
        await pubsub.subscribe(_CHANNEL)
        for _ in range(100):  # the server confirms the subscription with a message
            m = await pubsub.get_message(timeout=5.0)
            if m is not None and m["type"] == "subscribe":
                break
        else:
            raise RuntimeError("redis never confirmed the subscription")
        return RedisSubscription(client, pubsub, tally)
