"""Subscriptions and the handler loop of one client (lua-resty-events' callback.lua).

Events are handled strictly one at a time, in arrival order. For each event the handlers
subscribed to ``("*", "*")`` run first, then ``(source, "*")``, then ``(source, event)``;
within a level, in subscription order. A handler may be a plain function or a coroutine
function, called as ``handler(data, event, source, wid)``. An exception in one handler is
logged with its traceback and counted; the next handler still runs.

The loop belongs to the client, not to its broker connection, so a lost connection never
cancels a running handler. (The client's reader may run synchronous handlers itself while
the loop is idle, :meth:`Dispatcher.take`; those have no await to be cancelled at, and
anything awaitable still goes to the loop.)

Backpressure, not drops: the inbox is bounded for events read from the broker
(:meth:`Dispatcher.push_many` takes what fits, :meth:`Dispatcher.wait_room` waits for the
handlers to make room, so the client stops reading its socket and the backlog waits in the
broker's bounded queue, where the overflow policy applies and the worker is told). An
iterator (:meth:`Dispatcher.events`) whose buffer is full makes the handler loop wait for
its consumer. Local events (``current`` publishes, the client's own notices) are never
refused and never wait: they come from this process, and a handler (or an iterator's
consumer) that had to wait for room in the inbox would wait for itself.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from . import subscription
from .logutil import LogLimiter
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
        max_queue_len: events from the broker waiting for handlers; the reader waits for
            room rather than go over it (local events may, see the module docstring).
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
        #: Set by a reader waiting for room (see wait_room); run() sets it after a burst.
        self._room: anyio.Event | None = None
        # Handler lists per (source, event), resolved once instead of per event; emptied
        # on every (un)subscribe, which also bumps the version (see run()).
        self._routes: dict[tuple[str, str], _Route] = {}
        self._version = 0
        self.delivered = 0
        #: Events lost on this side. Nothing drops events any more (backpressure); kept
        #: so that statistics keep their shape.
        self.dropped = 0
        self.handler_errors = 0
        #: A handler that fails on every event must not write a traceback per event.
        self._log = LogLimiter(logger)
        #: Times a reader waited for room, and an iterator's buffer made run() wait.
        self.waits_for_room = 0
        self.waits_for_iterator = 0
        #: True while an event's handlers are running.
        self.busy = False
        #: What :meth:`take` left to the handler loop of the event it stopped in: the
        #: awaitable a handler returned (or None: a handler changed the subscriptions), the
        #: event's levels, how many of its handlers ran, and the event's arguments.
        self._resume: tuple[Awaitable[None] | None, _Levels, int, tuple[Any, str, str, int | None]] | None = None
        #: Called after every (un)subscribe (the client tells the broker, §8 filter).
        self.on_change: Callable[[], None] | None = None
        #: Called for an event no handler takes (not the bus's own): the client may then
        #: ask the broker for less (§8 filter).
        self.on_unwanted: Callable[[], None] | None = None

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
        if self.on_change is not None:
            self.on_change()

    def patterns(self) -> frozenset[tuple[str, str]]:
        """The (source, event) patterns with at least one handler or iterator now."""
        return frozenset(self._subscriptions)

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

    def events(
        self, source: str = "*", event: str = "*", *, max_buffer: int = 1024
    ) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[Event]]:
        """Subscribe with an async iterator instead of a callback.

        An event that finds the iterator's buffer full makes the handler loop wait until
        the consumer takes one (nothing is dropped; the client then stops reading from the
        broker, whose queue holds the backlog). So consume it, or leave the ``async with``.
        """
        return subscription.events(self, source, event, max_buffer)

    # --- the handler loop ----------------------------------------------------------------

    def push(self, event: Event) -> None:
        """Queue a local event (``current``, or the client's own notice): never refused.

        Local events do not wait for room: they come from this process, often from a
        handler, which would wait for itself. They may take the inbox over
        ``max_queue_len``; the reader then waits until the handlers are back under it.
        """
        self._inbox.append((event.source, event.event, event.data, event.wid))
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def push_many(self, events: Sequence[Fields]) -> int:
        """Queue ``(source, event, data, wid)`` tuples in order, as many as fit; returns
        how many. The caller keeps the rest and waits for room (:meth:`wait_room`)."""
        inbox = self._inbox
        room = self.max_queue_len - len(inbox)
        if len(events) <= room:
            inbox.extend(events)
            taken = len(events)
        else:
            taken = max(room, 0)
            inbox.extend(events[:taken])
        if taken and self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return taken

    def take(self, events: Sequence[Fields]) -> int:
        """:meth:`push_many`, except when the handler loop is idle (waiting, nothing
        queued): then the events' handlers run right here, in the caller's task (the
        client's reader), and the handler loop is not woken at all. At a fixed rate every
        read wakes the process, and the hand-over to the handler loop costs a turn of the
        event loop and a task switch per read (docs/benchmarks.md, "Latency at a fixed
        rate, session 4").

        Only synchronous work runs here: at the first handler that returns an awaitable
        (a coroutine handler, an iterator waiting for its consumer) or changes the
        subscriptions, the rest of that event and the events after it go to the handler
        loop (the awaitable is awaited there, never by the reader), ahead of anything
        queued meanwhile; so do the events after one whose handler queued a local event,
        which then comes after them, as it would in the handler loop. Same order, same
        counts, same error handling as :meth:`run`. Returns how many events were taken.
        """
        inbox = self._inbox
        if self._wakeup is None or inbox or self._resume is not None or len(events) > self.max_queue_len:
            return self.push_many(events)
        routes = self._routes
        isawaitable = inspect.isawaitable
        self.busy = True
        try:
            for index, (source, event, data, wid) in enumerate(events):
                if inbox:
                    # A handler queued a local event: it comes after the rest of this batch.
                    inbox.extendleft(reversed(events[index:]))
                    break
                route = routes.get((source, event))
                if route is None:
                    route = self._route(source, event)
                self.delivered += 1
                version = self._version
                handlers, levels = route
                if not handlers and source != "workerbus" and self.on_unwanted is not None:
                    self.on_unwanted()
                for done, handler in enumerate(handlers, 1):
                    try:
                        result = handler(data, event, source, wid)
                    except Exception:  # noqa: BLE001 - logged with its traceback, rate-limited
                        self._handler_failed(source, event, wid)
                        result = None
                    pending = result is not None and isawaitable(result)
                    if pending or self._version != version:
                        self._resume = (result if pending else None, levels, done, (data, event, source, wid))
                        inbox.extendleft(reversed(events[index + 1 :]))
                        break
                if self._resume is not None:
                    break
        finally:
            # (still busy while an event is half done: the handler loop finishes it)
            self.busy = self._resume is not None
        if (inbox or self._resume is not None) and self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        return len(events)

    async def _finish(self) -> None:
        # The rest of the event take() stopped in (see there), as run() would have done it.
        assert self._resume is not None
        awaitable, levels, done, args = self._resume
        self._resume = None
        self.busy = True
        try:
            if awaitable is not None:
                try:
                    await awaitable
                except Exception:  # noqa: BLE001 - logged with its traceback, rate-limited
                    self._handler_failed(args[2], args[1], args[3])
            await self._call_from(levels, done, args)
        finally:
            self.busy = False

    def push_all(self, events: Sequence[Fields]) -> None:
        """Queue events already read even over the bound (a reader cut off while it
        waited for room hands over what it holds: at most one read's worth)."""
        self._inbox.extend(events)
        if events and self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    @property
    def full(self) -> bool:
        return len(self._inbox) >= self.max_queue_len

    async def wait_room(self) -> None:
        """Wait while the inbox is full, until a burst of handlers leaves it below
        ``max_queue_len`` or :meth:`wake_waiters` is called; the caller checks again."""
        if len(self._inbox) < self.max_queue_len:
            return
        self.waits_for_room += 1
        if self._room is None:
            self._room = anyio.Event()
        await self._room.wait()

    def wake_waiters(self) -> None:
        """Wake a reader waiting for room, e.g. to make it notice the client is closing."""
        if self._room is not None:
            self._room.set()
            self._room = None

    async def run(self) -> None:
        """Handle queued events forever, one at a time.

        The handler loop of :meth:`_call_all` inlined, because it runs once per delivery:
        no coroutine per event, handler lists resolved once per (source, event), and
        ``isawaitable`` asked only of handlers that returned something. A handler that
        changes the subscriptions hands the rest of its event to :meth:`_call_from`.
        tests/reference.py holds it to a plain reference dispatch.
        """
        inbox = self._inbox
        popleft = inbox.popleft
        routes = self._routes
        isawaitable = inspect.isawaitable
        while True:
            if self._resume is not None:
                await self._finish()
                continue
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
                    if not handlers and source != "workerbus" and self.on_unwanted is not None:
                        self.on_unwanted()
                    for done, handler in enumerate(handlers, 1):
                        try:
                            result = handler(data, event, source, wid)
                            if result is not None and isawaitable(result):
                                await result
                        except Exception:  # noqa: BLE001 - logged with its traceback, rate-limited
                            self._handler_failed(source, event, wid)
                        if self._version != version:
                            await self._call_from(levels, done, (data, event, source, wid))
                            break
            finally:
                self.busy = False
            if self._room is not None and len(inbox) < self.max_queue_len:
                self._room.set()  # the reader waits for room: it may read again
                self._room = None
            # Let other tasks run between bursts even when every handler is synchronous.
            # (An empty inbox makes the wait above the schedule point: a turn of the loop
            # less per wake-up of a subscriber.)
            if inbox:
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

    async def _call_from(self, levels: _Levels, done: int, args: tuple[Any, str, str, int | None]) -> None:
        """One event's handlers from the ``done``-th on (all of them when 0): what
        :meth:`run` does after a handler changed the subscriptions, and :meth:`dispatch`.

        The level being run finishes with the handlers it started with; every later level
        is read from the subscriptions as they are when reached.
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
        # (run() has this loop inlined: it is the hot path; the error goes the same way)
        data, event, source, wid = args
        for handler in handlers:
            try:
                result = handler(data, event, source, wid)
                if result is not None and inspect.isawaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - logged with its traceback, rate-limited
                self._handler_failed(source, event, wid)

    def _handler_failed(self, source: str, event: str, wid: int | None) -> None:
        """Count and log the exception a handler raised (call it in the ``except``)."""
        self.handler_errors += 1
        self._log.log(
            logging.ERROR,
            "event handler failed; source=%s, event=%s, wid=%s",
            source,
            event,
            wid,
            exc_info=True,
        )

    async def dispatch(self, ev: Event) -> None:
        """Run every matching handler for one event, as :meth:`run` does for a queued one."""
        self.delivered += 1
        route = self._routes.get((ev.source, ev.event))
        if route is None:
            route = self._route(ev.source, ev.event)
        await self._call_from(route[1], 0, (ev.data, ev.event, ev.source, ev.wid))
