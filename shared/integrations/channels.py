"""A Django Channels channel layer over workerbus: the workers of one host, without Redis.

    CHANNEL_LAYERS = {"default": {
        "BACKEND": "shared.integrations.channels.WorkerbusChannelLayer",
        "CONFIG": {"address": "unix:/run/app/bus.sock"},
    }}

How messages find their consumer (docs/integrations.md has the long version):

- Each process runs one bus *session*, started lazily in the event loop of the first
  consumer: by default an embedded one (:func:`shared.embed.join`: the workers elect the
  broker among themselves); with ``"embedded": False`` a plain client of a broker you run,
  announcing its pid as worker id.
- ``new_channel()`` names encode their owner: ``specific.wb<worker id>.<nonce>!<random>``.
  The nonce is new for every session, so a restarted worker under the same id does not
  mistake its predecessor's channels for its own.
- ``send`` to a channel of this session is a local append (``ChannelFull`` at once); to a
  channel of another worker, one publish to ``worker:N``; the owner applies the capacity on
  arrival.
- A group's members are known only to the members' owners. ``group_add``/``group_discard``
  of a local channel are local; of another worker's channel, one publish to ``worker:N``.
  ``group_send`` delivers to the local members, then publishes once to ``others``; each
  other worker delivers to its own members. A channel has one owner, so each member gets
  the message once. A worker that dies takes its members' memberships with it.

Channels runs consumers on asyncio only; this module is anyio code and its own tests run
it on trio too.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.lowlevel import RunVar
from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from shared.broker import LIFECYCLE_SOURCE
from shared.client import Client
from shared.codec import MsgpackCodec
from shared.embed import join
from shared.logutil import LogLimiter
from shared.transportnames import load_transport

__all__ = ["SOURCE", "ChannelLayerUnavailable", "LayerStatistics", "WorkerbusChannelLayer"]

logger = logging.getLogger(__name__)

#: The bus source of every event this layer publishes.
SOURCE = "channels"
_SEND = "send"  # [channel, expires, message] to the owner's worker:N
_GROUP = "group"  # [group, expires, message] to others
_ADD = "add"  # [group, channel] to the owner's worker:N
_DISCARD = "discard"  # [group, channel] to the owner's worker:N (all, for a normal channel)
_NORMAL = "normal"  # [channel, expires, message] to others: a channel without "!"
_FLUSH = "flush"  # None to others

#: One opaque object per running event loop, to tell which loop a session belongs to.
_LOOP_MARK: RunVar[object] = RunVar("workerbus_channels_loop")
#: Strong references to the sessions' asyncio tasks (asyncio keeps only weak ones).
_TASKS: set[Any] = set()


class ChannelLayerUnavailable(ConnectionError):
    """No broker could be reached to carry a message."""


@dataclass
class LayerStatistics:
    """What this process's layer did. ``dropped_full``, ``stale``, ``unread``,
    ``bus_lost`` and ``bus_dropped`` are messages that reached nobody."""

    worker_id: int | None = None
    sent: int = 0  #: send() calls that went out
    group_sent: int = 0  #: group_send() calls
    delivered: int = 0  #: messages put into a local channel
    received: int = 0  #: messages handed to receive()
    expired: int = 0  #: messages that waited longer than ``expiry``
    full: int = 0  #: ChannelFull raised to a local send()
    dropped_full: int = 0  #: arrivals (remote sends, group members) that found the channel full
    stale: int = 0  #: addressed to channels of an earlier process under this worker id
    unread: int = 0  #: normal-channel messages for a channel nobody here reads
    bus_lost: int = 0  #: events the bus reports lost with a broker (any kind)
    bus_dropped: int = 0  #: events the broker dropped for this worker (any kind)
    one_shot: int = 0  #: operations sent over a one-shot connection (no session here)


def _loop_mark() -> object:
    try:
        return _LOOP_MARK.get()
    except LookupError:
        mark = object()
        _LOOP_MARK.set(mark)
        return mark


def _spawn(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], bool]:
    """Run ``fn`` as a background task of the current event loop; returns "is it gone?".

    anyio has no task that outlives its caller, and channels gives a layer no place to open
    a task group (a consumer's task ends with its connection, and channels' router has no
    lifespan), so the session becomes a task of the event loop itself.
    """
    try:
        import asyncio  # noqa: TID251 - the one primitive anyio lacks

        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        done = False

        async def tracked() -> None:
            nonlocal done
            try:
                await fn()
            finally:
                done = True

        trio.lowlevel.spawn_system_task(tracked)
        return lambda: done
    task = loop.create_task(fn())
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return lambda: task.done() or loop.is_closed()


def _owner(channel: str) -> tuple[int, str] | None:
    """``(worker id, nonce)`` of a process-specific channel made by this layer, else None."""
    head, bang, _ = channel.partition("!")
    if not bang:
        return None
    parts = head.rsplit(".", 2)
    if len(parts) < 2:
        return None
    tag, nonce = parts[-2], parts[-1]
    if not tag.startswith("wb") or not tag[2:].isdigit() or not nonce:
        return None
    return int(tag[2:]), nonce


class _Channel:
    """Messages waiting in one local channel, and whoever waits for them."""

    __slots__ = ("messages", "waiter", "waiting")

    def __init__(self) -> None:
        self.messages: deque[tuple[float, dict[str, Any]]] = deque()
        self.waiter: anyio.Event | None = None
        #: receive() calls waiting now; a cancelled one (its consumer left) must not keep
        #: the channel alive for the sweep.
        self.waiting = 0

    def wake(self) -> None:
        if self.waiter is not None:
            self.waiter.set()
            self.waiter = None


@dataclass
class _Session:
    """One process's bus connection and the channels and memberships it owns."""

    mark: object
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))
    bus: Client | None = None
    worker_id: int | None = None
    tag: str = ""
    error: BaseException | None = None
    gone: Callable[[], bool] = lambda: False
    ended: bool = False
    started: anyio.Event = field(default_factory=anyio.Event)
    stopping: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)
    channels: dict[str, _Channel] = field(default_factory=dict)
    #: group -> {local channel: time.time() of group_add}
    groups: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return not self.ended and not self.gone()

    def owns(self, channel: str) -> bool:
        return self.tag != "" and channel.partition("!")[0].endswith("." + self.tag)


class WorkerbusChannelLayer(BaseChannelLayer):  # type: ignore[misc]  # channels is untyped
    """The channel layer. Arguments are the ``CONFIG`` of the ``CHANNEL_LAYERS`` entry.

    Args:
        address: ``unix:/path/bus.sock`` (required).
        embedded: True (default): the workers elect the broker (:func:`shared.embed.join`).
            False: connect to a broker you run (``workerbus broker --listen ...``).
        workers: the number of server workers, passed to ``join`` (embedded only).
        transport: ``"http"`` or ``"stream"``; every process must use the same.
        worker_id: the id announced to an external broker; default: this process's pid.
        expiry: seconds a message may wait in a channel (default 60).
        group_expiry: seconds a group membership lasts (default 86400).
        capacity, channel_capacity: as in every channels layer; ``channel_capacity`` maps
            glob patterns (or compiled regexes) to capacities.
        connect_timeout: seconds a one-shot send (from a loop without a session) waits for
            a broker before raising :class:`ChannelLayerUnavailable`.
        bus_options: extra keyword arguments for ``join`` / ``Client``.
    """

    extensions = ["groups", "flush"]

    def __init__(
        self,
        address: str | None = None,
        *,
        embedded: bool = True,
        workers: int | None = None,
        transport: str = "http",
        worker_id: int | None = None,
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: dict[Any, int] | None = None,
        connect_timeout: float = 5.0,
        bus_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(address, str) or not address.startswith("unix:"):
            raise ValueError(
                "WorkerbusChannelLayer needs CONFIG 'address': 'unix:/path/bus.sock', "
                f"got {address!r}"
            )
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity)
        # BaseChannelLayer stores the raw mapping; get_capacity() wants it compiled.
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.address = address
        self.embedded = embedded
        self.workers = workers
        self.transport = transport
        self.fixed_worker_id = worker_id
        self.group_expiry = group_expiry
        self.connect_timeout = connect_timeout
        self.bus_options = dict(bus_options or {})
        self._session: _Session | None = None
        self._codec = MsgpackCodec()
        self._stats = LayerStatistics()
        self._drop_log = LogLimiter(logger)

    # --- introspection -------------------------------------------------------------------

    @property
    def worker_id(self) -> int | None:
        """The bus worker id of this process's session (None before the first consumer)."""
        s = self._session
        return s.worker_id if s is not None and s.alive else None

    def statistics(self) -> LayerStatistics:
        stats = LayerStatistics(**self._stats.__dict__)
        stats.worker_id = self.worker_id
        return stats

    # --- the session ---------------------------------------------------------------------

    @asynccontextmanager
    async def _open_bus(self) -> AsyncIterator[Client]:
        if self.embedded:
            async with join(
                self.address, workers=self.workers, transport=self.transport, **self.bus_options
            ) as bus:
                yield bus
        else:
            wid = os.getpid() if self.fixed_worker_id is None else self.fixed_worker_id
            async with Client(
                self.address, worker_id=wid, transport=load_transport(self.transport), **self.bus_options
            ) as client:
                yield client

    async def _run(self, s: _Session) -> None:
        try:
            async with self._open_bus() as bus:
                s.bus, s.worker_id = bus, bus.worker_id
                s.tag = f"wb{bus.worker_id}.{s.nonce}"
                bus.subscribe(SOURCE, "*", lambda d, e, _s, _w: self._on_event(s, e, d))
                bus.subscribe(LIFECYCLE_SOURCE, "*", lambda d, e, _s, _w: self._on_bus(e, d))
                # The broker has a queue for our id once we are connected: only then can
                # what is sent to our channels land.
                try:
                    with anyio.fail_after(self.connect_timeout):
                        await bus.wait_ready()
                except TimeoutError:
                    raise ChannelLayerUnavailable(
                        f"no workerbus broker answered at {self.address} within "
                        f"{self.connect_timeout}s"
                    ) from None
                s.started.set()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._sweep_forever, s)
                    await s.stopping.wait()
                    tg.cancel_scope.cancel()
        except Exception as exc:  # noqa: BLE001 - nobody to raise to: kept for the callers
            s.error = exc
            logger.error("channel layer: the bus session at %s failed: %r", self.address, exc)
        finally:
            s.ended = True
            s.started.set()
            for ch in s.channels.values():
                ch.wake()  # receivers see the session gone instead of waiting forever
            s.finished.set()

    async def _here(self) -> _Session | None:
        """The live session of the current event loop, if any (waits while it starts)."""
        s = self._session
        if s is None or not s.alive or s.mark is not _loop_mark():
            return None
        if s.bus is None:
            await s.started.wait()
        return s if s.bus is not None and s.alive else None

    async def _session_here(self) -> _Session:
        """The session of this event loop, started now if the process has none."""
        s = self._session
        mark = _loop_mark()
        if s is not None and s.alive:
            if s.mark is not mark:
                raise RuntimeError(
                    "this WorkerbusChannelLayer's consumers run in another event loop; "
                    "receive() and new_channel() work only there (send-type calls work anywhere)"
                )
        else:
            s = _Session(mark)
            self._session = s
            s.gone = _spawn(lambda: self._run(s))
        await s.started.wait()
        if s.bus is None:
            raise ChannelLayerUnavailable(
                f"the channel layer could not join the bus at {self.address}: {s.error!r}"
            )
        return s

    async def close(self) -> None:
        """End this process's session (a server shutdown does it by cancelling the loop)."""
        s = self._session
        if s is not None and s.alive and s.mark is _loop_mark():
            s.stopping.set()
            with anyio.move_on_after(5):
                await s.finished.wait()

    async def _publish(self, s: _Session | None, event: str, data: object, target: str | int) -> None:
        if s is not None:
            assert s.bus is not None
            await s.bus.publish(SOURCE, event, data, target)
            return
        # No session in this event loop (a management command, a script, asgiref's
        # temporary loop): a short-lived auxiliary connection that takes no worker id and no
        # part in the election; it returns once the message is written to the broker.
        self._stats.one_shot += 1
        async with Client(self.address, worker_id=-1, transport=load_transport(self.transport)) as bus:
            try:
                with anyio.fail_after(self.connect_timeout):
                    await bus.wait_ready()
                    await bus.publish(SOURCE, event, data, target)
                    await bus.flush()
            except TimeoutError:
                raise ChannelLayerUnavailable(
                    f"no workerbus broker answered at {self.address} within "
                    f"{self.connect_timeout}s (is the server running?)"
                ) from None

    # --- the channel layer API -----------------------------------------------------------

    async def new_channel(self, prefix: str = "specific") -> str:
        s = await self._session_here()
        name = f"{prefix.rstrip('.')}.{s.tag}!{secrets.token_hex(6)}"
        self.require_valid_channel_name(name)
        return name

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        _check_message(message)
        self.require_valid_channel_name(channel)
        expires = time.time() + self.expiry
        s = await self._here()
        if s is not None and s.owns(channel):
            packed = self._codec.dumps(message)  # same refusals as a remote send
            if not self._put(s, channel, expires, packed):
                self._stats.full += 1
                raise ChannelFull(channel)
            self._stats.sent += 1
            return
        owner = _owner(channel)
        if "!" not in channel:
            if s is not None:
                self._put_normal(s, channel, expires, self._codec.dumps(message))
            await self._publish(s, _NORMAL, [channel, expires, message], "others" if s else "all")
        elif owner is None:
            raise ValueError(f"{channel!r} was not made by a WorkerbusChannelLayer")
        elif s is not None and owner[0] == s.worker_id:
            self._stats.stale += 1  # an earlier process under our id: its consumers are gone
            return
        else:
            await self._publish(s, _SEND, [channel, expires, message], owner[0])
        self._stats.sent += 1

    async def receive(self, channel: str) -> dict[str, Any]:
        self.require_valid_channel_name(channel)
        s = await self._session_here()
        if "!" in channel and not s.owns(channel):
            raise ValueError(f"{channel!r} is not a channel of this process (new_channel() here)")
        ch = s.channels.get(channel)
        if ch is None:
            ch = s.channels[channel] = _Channel()
        while True:
            self._expire(s, channel, ch, time.time())
            if ch.messages:
                self._stats.received += 1
                return ch.messages.popleft()[1]
            if not s.alive:
                raise ChannelLayerUnavailable(f"the bus session at {self.address} ended")
            if ch.waiter is None:
                ch.waiter = anyio.Event()
            ch.waiting += 1
            try:
                await ch.waiter.wait()
            finally:
                ch.waiting -= 1
                if not ch.waiting:
                    ch.waiter = None
            # flush() or a sweep may have dropped the entry while we waited: put it back.
            ch = s.channels.setdefault(channel, ch)

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        s = await self._here()
        if s is not None and (s.owns(channel) or "!" not in channel):
            s.groups.setdefault(group, {})[channel] = time.time()
            return
        owner = _owner(channel)
        if owner is None:
            if "!" in channel:
                raise ValueError(f"{channel!r} was not made by a WorkerbusChannelLayer")
            raise RuntimeError("group_add of a normal channel needs a session in this process")
        if s is not None and owner[0] == s.worker_id:
            self._stats.stale += 1
            return
        await self._publish(s, _ADD, [group, channel], owner[0])

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_channel_name(channel)
        self.require_valid_group_name(group)
        s = await self._here()
        if s is not None and s.owns(channel):
            _discard(s, group, channel)
            return
        owner = _owner(channel)
        if owner is None:
            if "!" in channel:
                raise ValueError(f"{channel!r} was not made by a WorkerbusChannelLayer")
            # Whoever added a normal channel keeps its membership: tell everyone.
            if s is not None:
                _discard(s, group, channel)
            await self._publish(s, _DISCARD, [group, channel], "others" if s else "all")
            return
        if s is not None and owner[0] == s.worker_id:
            return  # that process is gone, and its memberships with it
        await self._publish(s, _DISCARD, [group, channel], owner[0])

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        _check_message(message)
        self.require_valid_group_name(group)
        expires = time.time() + self.expiry
        s = await self._here()
        if s is not None:
            self._deliver_group(s, group, expires, self._codec.dumps(message))
        await self._publish(s, _GROUP, [group, expires, message], "others" if s else "all")
        self._stats.group_sent += 1

    async def flush(self) -> None:
        """Empty every channel and group of every process on the bus."""
        s = await self._here()
        if s is not None:
            _clear(s)
        await self._publish(s, _FLUSH, None, "others" if s else "all")
        if s is not None:
            assert s.bus is not None
            await s.bus.flush()

    # --- deliveries (in the session's event loop) ----------------------------------------

    def _on_event(self, s: _Session, event: str, data: Any) -> None:
        if event == _SEND:
            channel, expires, message = data
            if not s.owns(channel):
                self._stats.stale += 1
            elif not self._put(s, channel, expires, None, message):
                self._dropped_full(channel)
        elif event == _GROUP:
            group, expires, message = data
            self._deliver_group(s, group, expires, None, message)
        elif event == _ADD:
            group, channel = data
            if s.owns(channel):
                s.groups.setdefault(group, {})[channel] = time.time()
            else:
                self._stats.stale += 1
        elif event == _DISCARD:
            group, channel = data
            _discard(s, group, channel)
        elif event == _NORMAL:
            channel, expires, message = data
            self._put_normal(s, channel, expires, None, message)
        elif event == _FLUSH:
            _clear(s)

    def _on_bus(self, event: str, data: Any) -> None:
        # The bus already logs these at WARNING; count them where layer users look.
        if isinstance(data, dict) and isinstance(data.get("count"), int):
            if event == "lost":
                self._stats.bus_lost += data["count"]
            elif event == "dropped":
                self._stats.bus_dropped += data["count"]

    def _put(
        self,
        s: _Session,
        channel: str,
        expires: float,
        packed: bytes | None,
        decoded: Any = None,
    ) -> bool:
        """Append to a local channel; False if it is full. The message is ``decoded`` when
        given (a message that arrived over the bus belongs to nobody else), else a fresh
        copy decoded from ``packed``."""
        ch = s.channels.get(channel)
        if ch is None:
            ch = s.channels[channel] = _Channel()
        else:
            self._expire(s, channel, ch, time.time())
        if len(ch.messages) >= self.get_capacity(channel):
            return False
        message = decoded if decoded is not None else self._codec.loads(packed or b"")
        ch.messages.append((expires, message))  # type: ignore[arg-type]  # a dict by contract
        self._stats.delivered += 1
        ch.wake()
        return True

    def _put_normal(
        self, s: _Session, channel: str, expires: float, packed: bytes | None, decoded: Any = None
    ) -> None:
        if channel not in s.channels:
            self._stats.unread += 1
        elif not self._put(s, channel, expires, packed, decoded):
            self._dropped_full(channel)

    def _deliver_group(
        self, s: _Session, group: str, expires: float, packed: bytes | None, decoded: Any = None
    ) -> None:
        members = s.groups.get(group)
        if not members:
            return
        if packed is None and len(members) > 1:
            packed = self._codec.dumps(decoded)  # copies for the members after the first
        oldest = time.time() - self.group_expiry
        for channel, added in list(members.items()):
            if added < oldest:
                del members[channel]
                continue
            if "!" not in channel:
                self._put_normal(s, channel, expires, packed, decoded)
            elif not self._put(s, channel, expires, packed, decoded):
                self._dropped_full(channel)
            decoded = None  # each member gets its own copy
        if not members:
            s.groups.pop(group, None)

    def _dropped_full(self, channel: str) -> None:
        self._stats.dropped_full += 1
        self._drop_log.log(
            logging.WARNING,
            "channel layer: %s is full; a message for it was dropped (%d so far)",
            channel,
            self._stats.dropped_full,
        )

    def _expire(self, s: _Session, channel: str, ch: _Channel, now: float) -> None:
        expired = 0
        while ch.messages and ch.messages[0][0] < now:
            ch.messages.popleft()
            expired += 1
        if expired:
            # As every channels layer does: a channel whose messages expire unread is
            # presumed dead and leaves its groups.
            self._stats.expired += expired
            for group in [g for g, members in s.groups.items() if channel in members]:
                _discard(s, group, channel)

    async def _sweep_forever(self, s: _Session) -> None:
        """Expire messages and memberships nobody touches, and forget empty channels."""
        interval = max(0.5, min(self.expiry / 2, 30.0))
        while True:
            await anyio.sleep(interval)
            now = time.time()
            for name, ch in list(s.channels.items()):
                self._expire(s, name, ch, now)
                if not ch.messages and not ch.waiting:
                    del s.channels[name]
            oldest = now - self.group_expiry
            for group, members in list(s.groups.items()):
                for channel in [c for c, added in members.items() if added < oldest]:
                    del members[channel]
                if not members:
                    del s.groups[group]


def _check_message(message: object) -> None:
    if not isinstance(message, dict):
        raise TypeError(f"a channel layer message must be a dict, got {type(message).__name__}")
    if "__asgi_channel__" in message:
        raise ValueError("'__asgi_channel__' is reserved in channel layer messages")


def _discard(s: _Session, group: str, channel: str) -> None:
    members = s.groups.get(group)
    if members is not None:
        members.pop(channel, None)
        if not members:
            del s.groups[group]


def _clear(s: _Session) -> None:
    s.groups.clear()
    for ch in s.channels.values():
        ch.messages.clear()
