"""The Redis engine (redis-py asyncio, pub/sub plus ``SET NX PX`` for cluster unique).

Every node publishes and subscribes to the channel ``<cluster>:events``; pub/sub is
at-most-once (a subscriber that is away misses what is published), so the bridge's
numbering finds what it loses. A cluster-unique key is claimed with
``SET <cluster>:unique:<key> <node> NX PX <unique timeout>``: exactly one node's ``SET``
succeeds until the key expires, and that node handles the event.

The engine reads its subscription in :meth:`RedisEngine.wait_closed`, which the host runs
for the whole session: no task of its own to look after.

URLs: ``redis://HOST:PORT[/DB]`` and ``redis+unix:///path/to/redis.sock``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.bridge import EngineRefused, describe

__all__ = ["RedisEngine"]

#: Seconds of silence on the subscription before the engine pings Redis over it; after
#: three such spans with nothing heard, not even the answer, the link is taken for dead (a
#: partition: nothing fails on our side, the bytes just never arrive).
KEEPALIVE = 2.0


class RedisEngine:
    def __init__(self, url: str, cluster: str) -> None:
        if url.startswith("redis+unix://"):
            url = "unix://" + url[len("redis+unix://") :]
        self.url = url
        self.description = url
        self.channel = f"{cluster}:events"
        self.prefix = f"{cluster}:unique:"
        self._redis: Any = None
        self._pubsub: Any = None
        self._on_message: Callable[[bytes], None] | None = None

    async def connect(self) -> None:
        self._redis = aioredis.from_url(
            self.url, socket_connect_timeout=2, socket_timeout=None, retry_on_timeout=False
        )
        await self._redis.ping()

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
        await self._pubsub.subscribe(self.channel)
        # Wait for the server's confirmation: from then on every publish reaches us.
        for _ in range(100):
            msg = await self._pubsub.get_message(timeout=2.0)
            if msg is None:
                raise ConnectionError("no subscribe confirmation from Redis")
            if msg.get("type") == "subscribe":
                break
        # Published messages wait in the connection until wait_closed reads them.
        self._on_message = on_message

    async def publish(self, payload: bytes) -> None:
        await self._redis.publish(self.channel, payload)

    async def publish_many(self, payloads: list[bytes]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for payload in payloads:
                pipe.publish(self.channel, payload)
            await pipe.execute()

    async def claim(self, key: str, ttl: float) -> bool:
        try:
            won = await self._redis.set(self.prefix + key, b"1", nx=True, px=max(1, int(ttl * 1000)))
        except ResponseError as exc:
            # The server answered with an error (an ACL without SET, a renamed command):
            # a new connection would hear the same.
            raise EngineRefused(describe(exc)) from exc
        return bool(won)

    async def wait_closed(self) -> BaseException | None:
        """Deliver what the subscription receives until the connection fails: the reason."""
        on_message = self._on_message
        assert on_message is not None, "subscribe first"
        heard = time.monotonic()
        try:
            while True:
                msg = await self._pubsub.get_message(timeout=KEEPALIVE)
                now = time.monotonic()
                if msg is not None:
                    heard = now
                    if msg.get("type") == "message":
                        on_message(msg["data"])
                    continue
                if now - heard >= 3 * KEEPALIVE:
                    return ConnectionError(f"nothing from Redis for {now - heard:.1f}s, not even a PONG (is the link down?)")
                await self._pubsub.ping()
        except Exception as exc:  # noqa: BLE001 - any failure ends this connection
            return exc

    async def close(self) -> None:
        for thing in (self._pubsub, self._redis):
            if thing is not None:
                try:
                    await thing.aclose()
                except Exception:  # noqa: BLE001,S110 - closing a broken connection may fail
                    pass
