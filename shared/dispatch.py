"""Subscriptions and the handler loop of one client (lua-resty-events' callback.lua).

Events are handled strictly one at a time, in arrival order. For each event the handlers
subscribed to ``("*", "*")`` run first, then ``(source, "*")``, then ``(source, event)``;
within a level, in subscription order. A handler may be a plain function or a coroutine
function, called as ``handler(data, event, source, wid)``. An exception in one handler is
logged with its traceback and counted; the next handler still runs.

The loop belongs to the client, not to its broker connection, so a lost connection never
cancels a running handler.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from .messages import Event

__all__ = ["Dispatcher", "Handler"]

logger = logging.getLogger(__name__)

#: ``handler(data, event, source, wid)``; may return an awaitable.
Handler: TypeAlias = Callable[[Any, str, str, "int | None"], "Awaitable[None] | None"]
#: An event in the inbox: ``(source, event, data, wid)``.
Fields: TypeAlias = "tuple[str, str, Any, int | None]"
#: The handler lists of one (source, event) per level: ((key, handlers), ...).
_Levels: TypeAlias = "tuple[tuple[tuple[str, str], tuple[Handler, ...]], ...]"
#: Every handler of one (source, event) in calling order, and the levels they come from.
_Route: TypeAlias = "tuple[tuple[Handler, ...], _Levels]"
#: (source, event) pairs whose handler lists are remembered at once. Names come from
#: peers, so the memo is bounded: when full it is simply emptied.
_MAX_ROUTES = 1024
#: Events handled before other tasks of the process get a turn (even when every handler is
#: synchronous): a burst of thousands of events must not stall, say, a web server's
#: requests in the same event loop for milliseconds.
_MAX_BURST = 256


class Dispatcher:
    """Handler registry plus a bounded inbox drained by :meth:`run`.

    Args:
        max_queue_len: events waiting for handlers; one more is dropped and counted.
    """

    def __init__(self, max_queue_len: int) -> None:
        if max_queue_len < 1:
            raise ValueError("max_queue_len must be at least 1")
        self.max_queue_len = max_queue_len
        self._subscriptions: dict[tuple[str, str], dict[str, Handler]] = {}
        self._index: dict[str, tuple[str, str]] = {}
        self._next_id = 0
        # Plain tuples, not Event objects: the inbox sees every delivery.
        self._inbox: deque[Fields] = deque()
        self._wakeup: anyio.Event | None = None
        # Handler lists per (source, event), resolved once instead of per event; emptied
        # on every (un)subscribe, which also bumps the version (see run()).
        self._routes: dict[tuple[str, str], _Route] = {}
        self._version = 0
        self.delivered = 0
        self.dropped = 0
        self.handler_errors = 0
        #: True while an event's handlers are running.
        self.busy = False

    @property
    def depth(self) -> int:
        return len(self._inbox)

    # --- subscriptions -------------------------------------------------------------------

    def subscribe(self, source: str, event: str, handler: Handler) -> str:
        """Register ``handler``; returns an id for :meth:`unsubscribe`.

        ``source`` may be ``"*"`` (then ``event`` must be ``"*"`` too: lua-resty-events never
        matches ``("*", "name")``, so we refuse it rather than register a dead handler).
        """
        if not isinstance(source, str) or not source or not isinstance(event, str) or not event:
            raise ValueError("source and event must be non-empty strings ('*' for any)")
        if source == "*" and event != "*":
            raise ValueError("subscribe('*', event) never matches: use ('*', '*')")
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        self._next_id += 1
        sub_id = str(self._next_id)
        self._subscriptions.setdefault((source, event), {})[sub_id] = handler
        self._index[sub_id] = (source, event)
        self._changed()
        return sub_id

    def _changed(self) -> None:
        self._routes.clear()
        self._version += 1

    def unsubscribe(self, sub_id: str) -> bool:
        """Remove a subscription; False if the id is unknown."""
        key = self._index.pop(sub_id, None)
        if key is None:
            return False
        handlers = self._subscriptions[key]
        del handlers[sub_id]
        if not handlers:
            del self._subscriptions[key]
        self._changed()
        return True

    @asynccontextmanager
    async def events(
        self, source: str = "*", event: str = "*", *, max_buffer: int = 1024
    ) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """Subscribe with an async iterator instead of a callback.

        Events that find the iterator's buffer full are dropped and counted.
        """
        send, receive = anyio.create_memory_object_stream[Event](max_buffer)

        def sink(data: Any, ev: str, src: str, wid: int | None) -> None:
            try:
                send.send_nowait(Event(src, ev, data, wid, getattr(wid, "node", None)))
            except anyio.WouldBlock:
                self.dropped += 1
                logger.warning("subscriber buffer full (%d): dropped %s/%s", max_buffer, src, ev)

        sub_id = self.subscribe(source, event, sink)
        try:
            async with receive:
                yield receive
        finally:
            self.unsubscribe(sub_id)
            send.close()

    # --- the handler loop ----------------------------------------------------------------

    def push(self, event: Event) -> bool:
        """Queue an event for the handlers; False (and counted) when the inbox is full."""
        if len(self._inbox) >= self.max_queue_len:
            self.dropped += 1
            logger.error("event inbox full (%d): dropped %s/%s", self.max_queue_len, event.source, event.event)
            return False
        self._inbox.append((event.source, event.event, event.data, event.wid))
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return True

    def push_many(self, events: Sequence[Fields]) -> int:
        """Queue ``(source, event, data, wid)`` tuples in order; returns how many fitted.

        What does not fit in the inbox is dropped and counted, as with :meth:`push`.
        """
        inbox = self._inbox
        room = self.max_queue_len - len(inbox)
        if len(events) <= room:
            inbox.extend(events)
            taken = len(events)
        else:
            taken = max(room, 0)
            inbox.extend(events[:taken])
            lost = len(events) - taken
            self.dropped += lost
            first = events[taken]
            logger.error(
                "event inbox full (%d): dropped %d events, the first %s/%s",
                self.max_queue_len, lost, first[0], first[1],
            )  # fmt: skip
        if taken and self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return taken

    async def run(self) -> None:
        """Handle queued events forever, one at a time.

        This is :meth:`dispatch` inlined, because it runs once per delivery: no coroutine
        per event, handler lists resolved once per (source, event), and ``isawaitable``
        asked only of handlers that returned something.
        """
        inbox = self._inbox
        popleft = inbox.popleft
        routes = self._routes
        isawaitable = inspect.isawaitable
        while True:
            if not inbox:
                self._wakeup = wakeup = anyio.Event()
                await wakeup.wait()
                continue
            self.busy = True
            try:
                for _ in range(min(len(inbox), _MAX_BURST)):
                    source, event, data, wid = popleft()
                    route = routes.get((source, event))
                    if route is None:
                        route = self._route(source, event)
                    self.delivered += 1
                    version = self._version
                    handlers, levels = route
                    for done, handler in enumerate(handlers, 1):
                        try:
                            result = handler(data, event, source, wid)
                            if result is not None and isawaitable(result):
                                await result
                        except Exception:
                            self.handler_errors += 1
                            logger.exception(
                                "event handler failed; source=%s, event=%s, wid=%s", source, event, wid
                            )
                        if self._version != version:
                            await self._finish_changed(levels, done, (data, event, source, wid))
                            break
            finally:
                self.busy = False
            # Let other tasks run between bursts even when every handler is synchronous.
            await anyio.lowlevel.checkpoint()

    def _route(self, source: str, event: str) -> _Route:
        """The handlers for one (source, event), level by level, remembered."""
        keys = (("*", "*"), (source, "*"), (source, event))
        levels = []
        for level, key in enumerate(keys):
            if key in keys[:level]:
                continue  # a literal "*" source or event must not run one list twice
            handlers = self._subscriptions.get(key)
            levels.append((key, tuple(handlers.values()) if handlers else ()))
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        route = (tuple(h for _, hs in levels for h in hs), tuple(levels))
        self._routes[(source, event)] = route
        return route

    async def _finish_changed(self, levels: _Levels, done: int, args: tuple[Any, str, str, int | None]) -> None:
        """The rest of one event after its ``done``-th handler changed the subscriptions.

        As in :meth:`dispatch`: the level being run finishes with the handlers it started
        with; every later level is read from the subscriptions as they are when reached.
        """
        start = 0
        current = 0
        for current, (_, handlers) in enumerate(levels):  # noqa: B007 - used after the loop
            if done <= start + len(handlers):
                break
            start += len(handlers)
        await self._call_all(levels[current][1][done - start :], args)
        for key, _ in levels[current + 1 :]:
            live = self._subscriptions.get(key)
            await self._call_all(tuple(live.values()) if live else (), args)

    async def _call_all(self, handlers: tuple[Handler, ...], args: tuple[Any, str, str, int | None]) -> None:
        data, event, source, wid = args
        for handler in handlers:
            try:
                result = handler(data, event, source, wid)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:
                self.handler_errors += 1
                logger.exception("event handler failed; source=%s, event=%s, wid=%s", source, event, wid)

    async def dispatch(self, ev: Event) -> None:
        """Run every matching handler for one event."""
        subs = self._subscriptions
        self.delivered += 1
        keys = (("*", "*"), (ev.source, "*"), (ev.source, ev.event))
        for level, key in enumerate(keys):
            if key in keys[:level]:
                continue  # a literal "*" source or event must not run one list twice
            handlers = subs.get(key)
            if not handlers:
                continue
            for handler in list(handlers.values()):
                try:
                    result = handler(ev.data, ev.event, ev.source, ev.wid)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    self.handler_errors += 1
                    logger.exception(
                        "event handler failed; source=%s, event=%s, wid=%s", ev.source, ev.event, ev.wid
                    )
