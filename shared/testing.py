"""An in-process bus for users' unit tests: the client's API, no socket, no broker.

    async with LocalBus(worker_id=0) as bus:
        bus.subscribe("cache", "*", handler)
        await bus.publish("cache", "invalidate", {"key": 1})
        await bus.drain()          # every event so far has been handled

It refuses exactly what the real client refuses (empty names, unencodable data, payloads
over ``max_payload_len``) because it encodes every publish the same way, and handlers get
the data after a codec round trip, as they would from a broker. Routing is the broker's own
:class:`~shared.router.Router` with this process as the only worker: ``all`` and its own
``worker:N`` come back, ``others`` reaches nobody, ``unique`` is deduplicated.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from .dispatch import Dispatcher, Handler
from .messages import Event, Target, TargetKind, build_publish, decode_event, parse_target
from .profile import Profile, get_profile
from .router import DEFAULT_MAX_QUEUE_LEN, DEFAULT_UNIQUE_TIMEOUT, Router

__all__ = ["LocalBus"]


class LocalBus:
    """Same publish/subscribe API as :class:`shared.client.Client`, entirely in-process."""

    def __init__(
        self,
        *,
        worker_id: int = 0,
        profile: str | Profile = "native",
        max_payload_len: int | None = None,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        unique_timeout: float = DEFAULT_UNIQUE_TIMEOUT,
    ) -> None:
        self.worker_id = worker_id
        self.profile = get_profile(profile)
        self.max_payload_len = max_payload_len or self.profile.default_max_payload_len
        self._dispatcher = Dispatcher(max_queue_len)
        self._router = Router(max_queue_len=max_queue_len, unique_timeout=unique_timeout)
        self._queue = self._router.attach(worker_id)
        self._tg: anyio.abc.TaskGroup | None = None
        self._published = 0

    async def __aenter__(self) -> LocalBus:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._dispatcher.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None

    @property
    def is_ready(self) -> bool:
        return self._tg is not None

    async def wait_ready(self) -> None:
        await anyio.lowlevel.checkpoint()

    def publish_nowait(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        # A cluster scope is checked as the real client does; one bus is a one-node cluster.
        parsed = parse_target(target)
        if scope != "local":
            parsed = parsed.with_scope(scope)
        if parsed.kind is TargetKind.CURRENT:
            self._dispatcher.push(Event(source, event, data, None))
            return
        inner, _ = build_publish(
            self.profile, self.worker_id, source, event, data, parsed, self.max_payload_len
        )
        self._published += 1
        self._router.route(self.worker_id, parsed, inner)
        for payload in self._queue.take_all():
            self._dispatcher.push(decode_event(self.profile, payload))

    async def publish(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        self.publish_nowait(source, event, data, target, scope=scope)
        await anyio.lowlevel.checkpoint()

    async def flush(self) -> None:
        await anyio.lowlevel.checkpoint()

    async def drain(self) -> None:
        """Wait until every event published so far has been handled."""
        while self._dispatcher.depth or self._dispatcher.busy:
            await anyio.lowlevel.checkpoint()

    def subscribe(self, source: str, event: str, handler: Handler) -> str:
        return self._dispatcher.subscribe(source, event, handler)

    def unsubscribe(self, subscription_id: str) -> bool:
        return self._dispatcher.unsubscribe(subscription_id)

    def events(
        self, source: str = "*", event: str = "*", *, max_buffer: int = 1024
    ) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[Event]]:
        return self._dispatcher.events(source, event, max_buffer=max_buffer)

    def statistics(self) -> dict[str, int]:
        d = self._dispatcher
        return {
            "published": self._published,
            "delivered": d.delivered,
            "dropped": d.dropped,
            "handler_errors": d.handler_errors,
            "unique_duplicates": self._router.unique_duplicates,
        }
