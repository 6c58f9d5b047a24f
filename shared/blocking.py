"""The bus for synchronous code (WSGI apps, gunicorn sync workers, scripts).

The bus runs in a background thread with its own event loop, started through
:func:`anyio.from_thread.start_blocking_portal`; every method here is a blocking call into
that loop. The semantics are the async client's, with two differences to know:

- handlers run **in the bus thread**, one event at a time, as in the async client. Keep
  them short, and guard any state they share with your request threads;
- start the client *after* the server forks its workers (e.g. lazily on first use, or in
  gunicorn's ``post_fork`` hook): a thread does not survive ``fork``.

``BlockingClient(address, embed=True)`` joins the embedded bus (:func:`shared.embed.join`);
with ``embed=False`` it is a plain :class:`shared.client.Client` of an external broker.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .client import Client, ClientStatistics
from .dispatch import Handler
from .embed import EmbeddedClient, join
from .messages import Target
from .transportnames import with_transport

__all__ = ["BlockingClient"]


class BlockingClient:
    """A blocking facade over :class:`Client` / :class:`EmbeddedClient`.

    Args:
        address: ``unix:/path/bus.sock``.
        embed: join the embedded bus (every worker may host the broker) instead of
            connecting to an external broker.
        backend: the event loop of the bus thread, ``"asyncio"`` or ``"trio"``.
        options: passed to :func:`shared.embed.join` (e.g. ``workers=4``) or to
            :class:`Client` (e.g. ``worker_id=0``).
    """

    def __init__(
        self, address: str, *, embed: bool = True, backend: str = "asyncio", **options: Any
    ) -> None:
        self.address = address
        self.embed = embed
        self.backend = backend
        self._options = options
        self._lock = threading.Lock()
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._bus_cm: AbstractContextManager[Client] | None = None
        self._bus: Client | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> BlockingClient:
        """Start the bus thread and join. Idempotent.

        Raises:
            WorkerIdUnavailable, OSError, ValueError: as :func:`shared.embed.join`.
        """
        with self._lock:
            if self._bus is not None:
                return self
            portal_cm = start_blocking_portal(self.backend)
            portal = portal_cm.__enter__()
            try:
                if self.embed:
                    bus_cm: AbstractContextManager[Client] = portal.wrap_async_context_manager(
                        join(self.address, **self._options)
                    )
                else:
                    bus_cm = portal.wrap_async_context_manager(Client(self.address, **with_transport(self._options)))
                bus = bus_cm.__enter__()
            except BaseException:
                portal_cm.__exit__(None, None, None)
                raise
            self._portal_cm, self._portal, self._bus_cm, self._bus = portal_cm, portal, bus_cm, bus
        return self

    def close(self) -> None:
        """Leave the bus (flushing what was published) and stop the thread. Idempotent."""
        with self._lock:
            bus_cm, portal_cm = self._bus_cm, self._portal_cm
            self._bus_cm = self._portal_cm = None
            self._bus = None
            self._portal = None
        try:
            if bus_cm is not None:
                bus_cm.__exit__(None, None, None)
        finally:
            if portal_cm is not None:
                portal_cm.__exit__(None, None, None)

    def __enter__(self) -> BlockingClient:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _running(self) -> tuple[BlockingPortal, Client]:
        portal, bus = self._portal, self._bus
        if portal is None or bus is None:
            raise RuntimeError("the blocking client is not started (call start())")
        return portal, bus

    # --- the async client's API, blocking --------------------------------------------------

    @property
    def worker_id(self) -> int:
        return self._running()[1].worker_id

    @property
    def is_broker(self) -> bool:
        """True while this process hosts the embedded broker."""
        bus = self._running()[1]
        return isinstance(bus, EmbeddedClient) and bus.is_broker

    @property
    def client(self) -> Client:
        """The async client living in the bus thread (touch it only from that thread)."""
        return self._running()[1]

    def publish(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        """Publish; blocks only while connected and the publish buffer is full.

        Raises: as :meth:`Client.publish`.
        """
        portal, bus = self._running()
        portal.call(functools.partial(bus.publish, source, event, data, target, scope=scope))

    def publish_nowait(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        """Raises: as :meth:`Client.publish_nowait` (``anyio.WouldBlock`` when full)."""
        portal, bus = self._running()
        portal.call(functools.partial(bus.publish_nowait, source, event, data, target, scope=scope))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has routed everything published so far (native: the
        ping/pong barrier of :meth:`Client.flush`; kong: written to the socket).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
            BarrierBroken: the connection ended before the broker confirmed it.
        """
        portal, bus = self._running()
        portal.call(_bounded, bus.flush, timeout)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until connected to a broker (native: welcomed).

        Raises: TimeoutError; NoWelcome (see :meth:`Client.wait_ready`).
        """
        portal, bus = self._running()
        portal.call(_bounded, bus.wait_ready, timeout)

    def subscribe(self, source: str, event: str, handler: Handler) -> str:
        """Register ``handler(data, event, source, wid)``; it runs in the bus thread."""
        portal, bus = self._running()
        return portal.call(bus.subscribe, source, event, handler)

    def unsubscribe(self, subscription_id: str) -> bool:
        portal, bus = self._running()
        return portal.call(bus.unsubscribe, subscription_id)

    def statistics(self) -> ClientStatistics:
        portal, bus = self._running()
        return portal.call(bus.statistics)


async def _bounded(func: Callable[[], Any], seconds: float | None) -> None:
    # anyio.fail_after(None) waits without a deadline
    with anyio.fail_after(seconds):
        await func()
