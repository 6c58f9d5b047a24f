"""A subscription as an async iterator: what :meth:`Dispatcher.events` returns.

A module of its own, never compiled: it is an async generator context manager, which
mypyc does not compile, and it runs once per iterator, not per event (docs/compiled.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .messages import Event

if TYPE_CHECKING:
    from .dispatch import Dispatcher

__all__ = ["events"]


@asynccontextmanager
async def events(
    dispatcher: Dispatcher, source: str, event: str, max_buffer: int
) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
    """Subscribe ``dispatcher`` with an async iterator instead of a callback.

    An event that finds the iterator's buffer full makes the handler loop wait until the
    consumer takes one (nothing is dropped; the client then stops reading from the broker,
    whose queue holds the backlog). So consume it, or leave the ``async with``.
    """
    send, receive = anyio.create_memory_object_stream[Event](max_buffer)

    async def wait_for_consumer(item: Event) -> None:
        dispatcher.waits_for_iterator += 1
        try:
            await send.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the consumer left the ``async with``: nobody wants this event

    def sink(data: Any, ev: str, src: str, wid: int | None) -> Awaitable[None] | None:
        item = Event(src, ev, data, wid, getattr(wid, "node", None))
        try:
            send.send_nowait(item)
        except anyio.WouldBlock:
            return wait_for_consumer(item)  # awaited by run(): backpressure
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the consumer left; the subscription goes with the ``async with``
        return None

    sub_id = dispatcher.subscribe(source, event, sink)
    try:
        async with receive:
            yield receive
    finally:
        dispatcher.unsubscribe(sub_id)
        send.close()
