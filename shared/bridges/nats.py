"""The NATS engine (nats-py, core NATS plus JetStream key-value for cluster unique).

Every node publishes and subscribes to the subject ``<cluster>.events``; core NATS is
at-most-once, so the bridge's numbering finds what it loses. A cluster-unique key is
claimed with a JetStream key-value ``create`` (atomic: exactly one creator) in the bucket
``<cluster>_unique_<ms>`` whose entries expire after the unique timeout; the node that
wins handles the event. That needs a server with JetStream on (``nats-server -js``);
without it a cluster-unique publish is dropped, counted and logged.

nats-py is an asyncio library: every method runs in the host's asyncio loop (made there,
see :mod:`shared.bridges.host`); this module itself needs nothing of asyncio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import anyio
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError, NoServersError
from nats.js.errors import (
    APIError,
    BucketNotFoundError,
    KeyWrongLastSequenceError,
    ServiceUnavailableError,
)

from shared.bridge import EngineRefused

__all__ = ["NatsEngine"]

#: Seconds between looks at the client's own state while waiting for the connection to end.
_STATE_CHECK = 0.25
#: Seconds nats-py gets to close the connection in order before its socket is aborted.
_CLOSE_TIMEOUT = 2.0


def _abort(nc: Any) -> None:
    """Close the client's socket at once, dropping what it still buffers.

    nats-py only closes in order: it writes what it holds, then waits until the socket has
    sent it. Over a dead link (a partition mid-stream) that wait lasts until TCP gives up,
    many minutes, and the client's callbacks (our ``on_gone``) come only after it. What is
    dropped here never reached the server; the bridge's numbering reports it lost.
    (nats-py has no abort of its own: this reaches its asyncio transport.)
    """
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    transport = getattr(writer, "transport", None)
    if transport is not None:
        transport.abort()


class NatsEngine:
    def __init__(self, url: str, cluster: str) -> None:
        self.url = url
        self.description = url
        self.subject = f"{cluster}.events"
        self.cluster = cluster
        self._nc: Any = None
        self._closed = anyio.Event()
        self._reason: BaseException | None = None
        self._kv: Any = None

    async def connect(self) -> None:
        async def on_error(exc: Exception) -> None:
            self._reason = exc  # reported by the host, once per outage

        async def on_gone() -> None:
            self._closed.set()

        # Made before connecting, so that close() finds it: a connect cut short (the
        # bridge stopping) has opened a socket that only the client can close.
        self._nc = NatsClient()
        try:
            await self._nc.connect(
                self.url,
                allow_reconnect=False,  # the host owns outages
                connect_timeout=2,
                # nats-py gives up on a server only past a positive number of attempts
                # (0 means: try it forever, every reconnect_time_wait, saying nothing):
                # two attempts back to back, then the host's backoff and its one WARNING.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=on_error,
                disconnected_cb=on_gone,
                closed_cb=on_gone,
                ping_interval=2,
                max_outstanding_pings=2,
            )
        except NoServersError:
            # The why (refused, timed out, ...) went to error_cb; NoServersError hides it.
            if isinstance(self._reason, Exception):
                raise self._reason from None
            raise

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        async def deliver(msg: Any) -> None:
            on_message(msg.data)

        await self._nc.subscribe(self.subject, cb=deliver, pending_msgs_limit=1_000_000)
        # A round trip: the server has the subscription before we count as connected, so
        # whatever another node publishes from then on reaches us.
        await self._nc.flush(timeout=2)

    @property
    def max_message(self) -> int:
        """The server's ``max_payload`` (1 MiB unless configured): the bridge keeps its
        messages within it."""
        nc = self._nc
        return int(nc.max_payload) if nc is not None else 1 << 20

    async def publish(self, payload: bytes) -> None:
        if self._closed.is_set():
            raise ConnectionError("the NATS connection is closed")
        await self._nc.publish(self.subject, payload)

    async def publish_many(self, payloads: list[bytes]) -> None:
        for payload in payloads:  # nats-py buffers and flushes by itself
            await self.publish(payload)

    async def claim(self, key: str, ttl: float) -> bool:
        try:
            if self._kv is None:
                js = self._nc.jetstream()
                bucket = f"{self.cluster}_unique_{int(ttl * 1000)}"
                try:
                    self._kv = await js.key_value(bucket)
                except BucketNotFoundError:
                    self._kv = await js.create_key_value(bucket=bucket, ttl=ttl, history=1)
            name = hashlib.sha256(key.encode("utf-8")).hexdigest()  # any key, in KV's alphabet
            await self._kv.create(name, b"1")
        except KeyWrongLastSequenceError:
            return False
        except (ServiceUnavailableError, NoRespondersError) as exc:
            # Nobody answers JetStream requests: the server runs without it. A new
            # connection would hear the same.
            raise EngineRefused("no JetStream: the server must run with it on (nats-server -js)") from exc
        except APIError as exc:  # the server answered no
            raise EngineRefused(f"JetStream: {exc.description or type(exc).__name__}") from exc
        return True

    async def wait_closed(self) -> BaseException | None:
        # The client's state, not only its callbacks: nats-py marks a stale connection
        # (max_outstanding_pings without an answer) disconnected at once, but calls back
        # only after its orderly close, which a dead link holds up (see _abort).
        nc = self._nc
        while not self._closed.is_set() and nc is not None and nc.is_connected:
            with anyio.move_on_after(_STATE_CHECK):
                await self._closed.wait()
        last = None if nc is None else nc.last_error
        return self._reason or last or ConnectionError("connection closed")

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is None:
            return
        if not nc.is_closed:
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                try:
                    await nc.close()
                except Exception:  # noqa: BLE001,S110 - closing a broken connection may fail
                    pass
        _abort(nc)
