"""Drives a bridge's engine: in the broker's loop on asyncio, on a thread under trio.

nats-py and redis-py are asyncio libraries; the broker may run on trio. Under trio the
engine gets a loop of its own on a thread (:meth:`EngineHost.run`: ``anyio.run`` with the
asyncio backend); on asyncio it runs in the broker's loop (:meth:`EngineHost.run_here`),
since two threads taking turns on the GIL cost more than the engine itself (measured in
docs/cluster.md). The driver is the same anyio code either way.

Hand-over both ways is non-blocking. Broker to engine: the broker's tap appends to the
bridge's outbox and calls :meth:`EngineHost._wake`, once per burst: in the same loop that
sets an :class:`anyio.Event`; across threads it rings a bell: a byte on a socket pair the
send loop waits on with ``anyio.wait_readable``; :meth:`EngineHost.stop` rings a second
one. (``anyio.from_thread.run_sync`` would block the broker until the engine loop had run
the call, once per burst, and could wait forever on a loop that has just finished.) Engine to
broker: what arrives goes to the bridge's inbox and wakes the broker through the bridge's
own socket pair.

The driver: connect (bounded, jittered backoff), subscribe, send the outbox in order,
a sync marker after every connect and every second while publishing; on an outage put the
unsent items back, log one line, reconnect. The engine's own reconnection is off: this
loop owns outages, so they are logged once and counted once.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import Any

import anyio

from shared.bridge import (
    SYNC_INTERVAL,
    Bridge,
    EngineRefused,
    Envelope,
    describe,
    encode_envelope,
    tag_node,
)

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "CLOSE_TIMEOUT", "SHORT_SESSION", "EngineHost"]

logger = logging.getLogger("shared.bridge")

#: Reconnect delays: the first retry is quick (a restarted server), then doubling to 2 s.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
#: A session shorter than this (seconds) counts as a failed connect for the backoff.
SHORT_SESSION = 1.0
#: Seconds an engine gets to close a connection when the bridge stops or reconnects.
CLOSE_TIMEOUT = 2.0
#: Items taken from the outbox at a time (one engine call for a run of events).
_BATCH = 512
#: Event bytes per engine message at most (NATS refuses messages above its max_payload,
#: 1 MiB by default); a run of events longer than that goes out in several messages.
_MAX_MESSAGE = 256 * 1024


class _Bell:
    """A wake-up from another thread into the engine's loop that never blocks the ringer:
    a byte on a socket pair, waited for with ``anyio.wait_readable``."""

    def __init__(self) -> None:
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)

    def ring(self) -> None:
        """From any thread."""
        try:
            self._wsock.send(b"\0")
        except OSError:
            pass  # the socket is full: a byte is already waiting

    async def wait(self) -> None:
        """In the engine's loop: until rung (at once if rung since the last wait)."""
        await anyio.wait_readable(self._rsock)
        try:
            self._rsock.recv(4096)  # all that waits: a byte or two (one ring per re-arm)
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._rsock.close()
        self._wsock.close()


class EngineHost:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        #: in the broker's loop: set when the outbox may have work, a fresh one for every
        #: wait (an anyio Event belongs to the loop it was made in)
        self._wakeup: anyio.Event | None = None
        #: on a thread: what wakes the engine loop (the outbox may have work) and what
        #: stops it; made by :meth:`run`
        self._bell: _Bell | None = None
        self._stop_bell: _Bell | None = None
        self._wake_pending = False
        self._stopping = False

    # --- thread entry and stop -----------------------------------------------------------

    def run(self) -> None:
        """Thread entry (trio brokers): the engine in an asyncio loop of its own, until
        :meth:`stop` (or the driver fails). The broker's thread calls :meth:`close` after
        joining this one."""
        self._bell = _Bell()
        self._stop_bell = _Bell()
        if not self._stopping:  # stop() may have come before the bell existed
            anyio.run(self._run_threaded, self._stop_bell, backend="asyncio")

    async def _run_threaded(self, stop_bell: _Bell) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_when_rung, stop_bell, tg.cancel_scope)
            await self._drive()
            tg.cancel_scope.cancel()  # the driver failed (logged): the thread ends

    @staticmethod
    async def _stop_when_rung(stop_bell: _Bell, scope: anyio.CancelScope) -> None:
        await stop_bell.wait()
        scope.cancel()

    def close(self) -> None:
        """Once the thread has ended: release its sockets. Called by the broker's thread,
        the one whose tap rings the bell (so never under a ring in progress)."""
        for bell in (self._bell, self._stop_bell):
            if bell is not None:
                bell.close()
        self._bell = self._stop_bell = None

    async def run_here(self) -> None:
        """Drive the engine in the running asyncio loop (the broker's own, on asyncio)."""
        self._wakeup = anyio.Event()
        await self._drive()

    def stop(self) -> None:
        """From any thread: end the driver on its thread (the thread then exits). On
        asyncio the broker cancels :meth:`run_here` instead."""
        self._stopping = True
        stop_bell = self._stop_bell
        if stop_bell is not None:
            stop_bell.ring()

    def _wake(self) -> None:
        # Called by the broker's tap for every cluster publish: one wake-up per burst, not
        # per event (across threads, the socket write is the expensive part).
        if self._wake_pending:
            return
        self._wake_pending = True
        bell = self._bell
        if bell is not None:
            bell.ring()
        elif self._wakeup is not None:
            self._wakeup.set()  # the broker's own loop: nothing crosses threads

    async def _idle(self, seconds: float | None) -> None:
        # Until woken, or for at most ``seconds``. The caller has re-armed: see _send_loop.
        if self._bell is not None:
            wait = self._bell.wait
        else:
            assert self._wakeup is not None
            wait = self._wakeup.wait
        if seconds is None:
            await wait()  # (no cancel scope: this runs once per burst)
        else:
            with anyio.move_on_after(seconds):
                await wait()

    # --- the driver ----------------------------------------------------------------------

    async def _drive(self) -> None:
        # A bug here must not take the broker (or, on trio, silently the thread) with it:
        # the local bus carries on, and the failure is logged loudly once.
        try:
            await self._drive_engine()
        except Exception:
            self.bridge.connected = False
            logger.exception(
                "bridge of node %s failed; no more cluster events in or out until the broker restarts",
                self.bridge.node,
            )

    async def _drive_engine(self) -> None:
        bridge = self.bridge
        bridge.wake_engine = self._wake
        failures = 0
        outage_since: float | None = None
        outage_reason = ""
        while True:
            engine = bridge.engine_factory()
            try:
                await engine.connect()
                await engine.subscribe(lambda payload: bridge.from_engine("m", payload))
            except Exception as exc:  # noqa: BLE001 - every engine failure is an outage
                await _close(engine)
                failures += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                    outage_reason = describe(exc)
                    logger.warning(
                        "bridge of node %s cannot reach %s: %s; cluster publishes are buffered "
                        "(up to %d), the local bus carries on",
                        bridge.node,
                        bridge.description,
                        outage_reason,
                        bridge.max_buffer,
                    )
                await _back_off(failures)
                continue
            except BaseException:  # cancelled: the bridge stops
                await _close(engine)
                raise
            bridge.connects += 1
            bridge.connected = True
            if outage_since is not None:
                logger.warning(
                    "bridge of node %s reached %s again after %.1f s (%s); %d cluster "
                    "publishes buffered, %d dropped so far",
                    bridge.node,
                    bridge.description,
                    time.monotonic() - outage_since,
                    outage_reason,
                    len(bridge.outbox),
                    bridge.dropped,
                )
            else:
                logger.info("bridge of node %s connected to %s", bridge.node, bridge.description)
            outage_since = None
            connected_at = time.monotonic()
            try:
                reason = await self._session(engine)
            finally:
                bridge.connected = False
                await _close(engine)
            outage_since = time.monotonic()
            outage_reason = describe(reason)
            logger.warning(
                "bridge of node %s lost %s: %s; cluster publishes are buffered (up to %d), "
                "the local bus carries on",
                bridge.node,
                bridge.description,
                outage_reason,
                bridge.max_buffer,
            )
            if time.monotonic() - connected_at < SHORT_SESSION:
                # Connected, then lost at once: if that repeats (a send the engine always
                # fails), the backoff grows as for failed connects instead of spinning.
                failures += 1
                await _back_off(failures)
            else:
                failures = 0

    async def _session(self, engine: Any) -> BaseException | None:
        """Send until the connection is lost (the engine says so, or a send fails): the
        reason."""
        reason: BaseException | None = None

        async def watch() -> None:
            nonlocal reason
            reason = await engine.wait_closed()
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                await self._send_loop(engine)
            except Exception as exc:  # noqa: BLE001 - a failed send is an outage
                reason = exc
                tg.cancel_scope.cancel()
        return reason

    async def _send_loop(self, engine: Any) -> None:
        bridge = self.bridge
        last_sync: int | None = None
        next_sync = 0.0  # a marker right after connecting
        while True:
            items = bridge.take_outbox(_BATCH)
            if items:
                await self._send(engine, items)
                continue
            now = time.monotonic()
            seq = bridge.sync_number()
            if seq is not None and now >= next_sync and (seq != last_sync or last_sync is None):
                marker = Envelope("s", bridge.node, bridge.generation, seq)
                await engine.publish(encode_envelope(marker))
                last_sync = seq
                next_sync = now + SYNC_INTERVAL
            # Re-arm, then look at the outbox: a wake-up from now on is not lost (it sets
            # the fresh event, or rings the bell; a ring already waiting ends the next
            # wait at once).
            if self._bell is None:
                self._wakeup = anyio.Event()
            self._wake_pending = False
            if not bridge.outbox:
                await self._idle(max(0.0, next_sync - time.monotonic()) if seq != last_sync else None)

    async def _send(self, engine: Any, items: list[tuple[Any, ...]]) -> None:
        bridge = self.bridge
        index = 0
        while index < len(items):
            item = items[index]
            try:
                if item[0] == "e":
                    # A run of events goes out as few engine messages as it can: each one
                    # carries consecutive numbers, the events already tagged with this
                    # node (the receivers inject them as they are). One engine call for
                    # the run (one round trip for Redis); if it fails, the whole run is
                    # retried: receivers drop the numbers they already have.
                    end = index
                    while end < len(items) and items[end][0] == "e":
                        end += 1
                    limit = min(_MAX_MESSAGE, getattr(engine, "max_message", _MAX_MESSAGE))
                    batches, too_big = self._batches(items[index:end], limit)
                    await engine.publish_many(batches)
                    bridge.sent += end - index - too_big
                    index = end
                    continue
                else:
                    _, key, event = item
                    try:
                        won = await engine.claim(key, bridge.unique_timeout)
                    except EngineRefused as exc:
                        bridge.refused("a cluster-unique claim", str(exc))
                    else:
                        if won:
                            bridge.unique_won += 1
                            bridge.from_engine("u", (key, event))
                        else:
                            bridge.unique_duplicates += 1
                index += 1
            except BaseException:
                bridge.put_back(items[index:])
                raise

    def _batches(self, run: list[tuple[Any, ...]], limit: int) -> tuple[list[bytes], int]:
        """The engine messages for a run of numbered events, each at most ``limit`` bytes,
        and how many events were dropped because even alone they would not fit."""
        bridge = self.bridge
        node, generation = bridge.node, bridge.generation
        # Bytes around the events (a bound, not the exact count): the envelope's keys and
        # values once per message; per event its bin header and the node tag.
        per_message = 64 + len(node) + len(generation)
        per_event = 24 + len(node)
        out: list[bytes] = []
        events: list[bytes] = []
        first = expect = size = too_big = 0
        for _, seq, _target, event in run:
            cost = len(event) + per_event
            if per_message + cost > limit:
                # Numbered already: the receivers see the gap and report it as lost.
                too_big += 1
                bridge.refused(f"an event of {len(event)} bytes (its messages take at most {limit})", "message too large")
                continue
            # A number dropped (a full outbox, or just above) is a gap the receivers must
            # see: a new message starts there (and where the size bound is reached).
            if events and (seq != expect or per_message + size + cost > limit):
                out.append(encode_envelope(Envelope("b", node, generation, first, events=tuple(events))))
                events = []
            if not events:
                first, size = seq, 0
            events.append(tag_node(event, node))
            size += cost
            expect = seq + 1
        if events:
            out.append(encode_envelope(Envelope("b", node, generation, first, events=tuple(events))))
        return out, too_big


async def _back_off(failures: int) -> None:
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 16))
    await anyio.sleep(random.uniform(BACKOFF_MIN, max(BACKOFF_MIN, ceiling)))


async def _close(engine: Any) -> None:
    # Shielded and bounded: runs while the bridge is being cancelled, too.
    with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
        await engine.close()
