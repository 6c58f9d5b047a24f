"""A backend for the ``broadcaster`` package: its ``Broadcast`` API, workerbus underneath.

``broadcaster`` (the publish/subscribe helper Starlette's docs point to for websocket
chat) ships backends for Redis, Postgres and Kafka; this one carries its messages
between the worker processes of one host instead, with no server to run::

    from broadcaster import Broadcast
    from shared.integrations.broadcaster import WorkerbusBackend

    broadcast = Broadcast(backend=WorkerbusBackend("unix:/run/app/bus.sock", workers=4))

    @asynccontextmanager
    async def lifespan(app):
        async with broadcast:            # connect() ... disconnect(), in the same task
            yield

``broadcaster`` itself is asyncio-only (its ``Broadcast`` uses asyncio tasks and queues),
so this backend is used under asyncio, although it is written against anyio like the rest
of workerbus.

A channel is the ``event`` name of events of one ``source`` (``"broadcast"`` unless told
otherwise); a message is any value workerbus can encode (``str`` as with Redis, but also
``bytes``, numbers, lists and dicts) up to ``max_payload_len``. Every worker receives the
messages of the channels it subscribed to, its own included, in the order each publisher
sent them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from broadcaster import BroadcastBackend, Event

from shared.client import Client
from shared.embed import join
from shared.transportnames import with_transport

__all__ = ["DEFAULT_SOURCE", "WorkerbusBackend"]

#: The workerbus ``source`` that carries broadcaster's channels.
DEFAULT_SOURCE = "broadcast"
#: Seconds :meth:`WorkerbusBackend.connect` waits for the broker.
DEFAULT_CONNECT_TIMEOUT = 10.0


class WorkerbusBackend(BroadcastBackend):
    """``Broadcast(backend=WorkerbusBackend(address))``.

    Args:
        address: ``unix:/path/bus.sock``. By default every worker *joins* the bus there
            (:func:`shared.embed.join`: the workers elect a broker among themselves).
        bus: an already running :class:`Client` (e.g. the one your lifespan got from
            ``join``) to use instead of joining; it is left running on disconnect.
        embedded: False connects a plain :class:`Client` to a broker you run yourself
            (``workerbus broker --listen ...``) instead of joining.
        source: the workerbus source of the channels.
        max_buffer: messages received but not yet taken by ``Broadcast``; when it is full
            the bus's handler loop waits (backpressure) rather than drop.
        connect_timeout: seconds :meth:`connect` waits for the broker.
        options: more ``join`` (or ``Client``) arguments: ``workers``, ``transport``, ...

    :meth:`connect` and :meth:`disconnect` must run in the same task (as they do in a
    lifespan's ``async with broadcast:``): the bus's tasks live in a task group.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        bus: Client | None = None,
        embedded: bool = True,
        source: str = DEFAULT_SOURCE,
        max_buffer: int = 1024,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **options: Any,
    ) -> None:
        # No super().__init__(): broadcaster's base class only raises NotImplementedError.
        if (address is None) == (bus is None):
            raise ValueError("give either an address or a running bus, not both")
        if bus is not None and options:
            raise ValueError(f"options {sorted(options)} need an address, not a bus")
        if not isinstance(source, str) or not source or source == "*":
            raise ValueError("source must be a non-empty name other than '*'")
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.address = address
        self.embedded = embedded
        self.source = source
        self.max_buffer = max_buffer
        self.connect_timeout = connect_timeout
        self._options: Mapping[str, Any] = options
        self._given_bus = bus
        self._bus: Client | None = None
        self._stack: AsyncExitStack | None = None
        self._subscriptions: dict[str, str] = {}
        self._send: MemoryObjectSendStream[Event] | None = None
        self._receive: MemoryObjectReceiveStream[Event] | None = None

    @property
    def bus(self) -> Client:
        """The workerbus client, once connected."""
        if self._bus is None:
            raise RuntimeError("the backend is not connected")
        return self._bus

    async def connect(self) -> None:
        if self._bus is not None:
            raise RuntimeError("the backend is already connected")
        self._send, self._receive = anyio.create_memory_object_stream[Event](self.max_buffer)
        if self._given_bus is not None:
            bus = self._given_bus
        else:
            assert self.address is not None
            stack = AsyncExitStack()
            if self.embedded:
                bus = await stack.enter_async_context(join(self.address, **self._options))
            else:
                bus = await stack.enter_async_context(Client(self.address, **with_transport(self._options)))
            self._stack = stack
        self._bus = bus
        try:
            with anyio.fail_after(self.connect_timeout):
                await bus.wait_ready()
        except TimeoutError:
            await self.disconnect()
            raise TimeoutError(
                f"no workerbus broker answered at {bus.address} within {self.connect_timeout}s"
            ) from None

    async def disconnect(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            for sub_id in self._subscriptions.values():
                bus.unsubscribe(sub_id)
        self._subscriptions.clear()
        # Close the streams first: a handler waiting for room wakes up and gives up.
        for stream in (self._send, self._receive):
            if stream is not None:
                stream.close()
        self._send = self._receive = None
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    async def subscribe(self, channel: str) -> None:
        if not isinstance(channel, str) or not channel:
            raise ValueError(f"a channel must be a non-empty string, got {channel!r}")
        if channel not in self._subscriptions:
            # "*" is workerbus's wildcard: that subscription sees every channel of the
            # source, and _deliver keeps only events published to the channel "*" itself.
            handler = functools.partial(self._deliver, channel)
            self._subscriptions[channel] = self.bus.subscribe(self.source, channel, handler)

    async def unsubscribe(self, channel: str) -> None:
        sub_id = self._subscriptions.pop(channel, None)
        if sub_id is not None and self._bus is not None:
            self._bus.unsubscribe(sub_id)

    async def publish(self, channel: str, message: Any) -> None:
        """Send ``message`` to every worker subscribed to ``channel`` (this one included).

        Raises what :meth:`Client.publish` raises: ``PayloadTooLarge``,
        ``LocalProtocolError`` (cannot encode), ``PublishBufferFull``.
        """
        await self.bus.publish(self.source, channel, message, "all")

    async def next_published(self) -> Event:
        if self._receive is None:
            raise RuntimeError("the backend is not connected")
        return await self._receive.receive()

    async def _deliver(
        self, channel: str, data: Any, event: str, source: str, wid: int | None
    ) -> None:
        send = self._send
        if send is None or event != channel or channel not in self._subscriptions:
            return  # another channel (under "*"), or unsubscribed meanwhile
        try:
            await send.send(Event(channel=channel, message=data))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass  # disconnect() ran while we waited for room: the receiver is gone
