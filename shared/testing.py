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

Backpressure works as with a broker: routed events wait in the router's bounded queue
(``max_queue_len``, drop-newest) until the handlers' inbox has room; what that queue has to
drop is reported to the handlers as a ``("workerbus", "dropped", {"count", "total"})`` event,
as a broker would. ``current`` publishes go straight to the inbox, as in the client.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from types import TracebackType

import anyio
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream

from .dispatch import Dispatcher, Handler
from .messages import Event, Target, TargetKind, build_publish, decode_event_batch, parse_target
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
        #: Same attribute as the client's; there is no broker, so no welcome.
        self.welcome = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._published = 0
        #: The pump holds a batch taken from the queue (so drain() must wait for it).
        self._pumping = 0

    async def __aenter__(self) -> LocalBus:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._dispatcher.run)
        self._tg.start_soon(self._pump)
        return self

    async def _pump(self) -> None:
        """The broker's writer and the client's reader in one: queue → inbox, waiting for
        room in the inbox (backpressure) and reporting the queue's drops first."""
        queue = self._queue
        dispatcher = self._dispatcher
        while True:
            if not queue.frames and not queue.dropped_unreported:
                wakeup = anyio.Event()
                queue.wakeup = wakeup.set
                await wakeup.wait()
                continue
            batch = queue.take_all()
            self._pumping = len(batch)
            events, _ = decode_event_batch(self.profile, batch)
            if queue.dropped_unreported:
                count, queue.dropped_unreported = queue.dropped_unreported, 0
                notice = {"count": count, "total": queue.dropped}
                events.insert(0, ("workerbus", "dropped", notice, None))
            taken = dispatcher.push_many(events)
            while taken < len(events):
                await dispatcher.wait_room()
                taken += dispatcher.push_many(events[taken:])
            queue.mark_sent(len(batch))
            self._pumping = 0
            await anyio.lowlevel.checkpoint()

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
        self._router.route(self.worker_id, parsed, inner)  # the pump delivers it

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
        """Every publish is routed when publish returns: the barrier holds at once."""
        await anyio.lowlevel.checkpoint()

    async def drain(self) -> None:
        """Wait until every event published so far has been handled."""
        d = self._dispatcher
        while self._queue.frames or self._pumping or d.depth or d.busy:
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
            "dropped_by_queue": self._queue.dropped,
            "queued": len(self._queue.frames),
            "inbox": d.depth,
            "handler_errors": d.handler_errors,
            "unique_duplicates": self._router.unique_duplicates,
            "unconfirmed": 0,
        }
