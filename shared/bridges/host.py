"""Drives a bridge's engine: in the broker's loop on asyncio, on a thread under trio.

nats-py and redis-py are asyncio libraries; the broker may run on trio. Under trio the
engine gets an asyncio loop on a thread of its own (:meth:`EngineHost.run`); on asyncio it
runs in the broker's loop (:meth:`EngineHost.run_here`), since two threads taking turns
on the GIL cost more than the engine itself (measured in docs/cluster.md). The driver is
the same code either way. Hand-over both ways is non-blocking: the broker's tap appends to the bridge's outbox and wakes this loop with
``call_soon_threadsafe``; what arrives goes to the bridge's inbox and wakes the broker
through a socket pair.

The driver: connect (bounded, jittered backoff), subscribe, send the outbox in order,
a sync marker after every connect and every second while publishing; on an outage put the
unsent items back, log one line, reconnect. The engine's own reconnection is off: this
loop owns outages, so they are logged once and counted once.
"""

from __future__ import annotations

import asyncio  # the engines are asyncio libraries; this is their thread
import contextlib
import logging
import random
import time
from typing import Any

from shared.bridge import SYNC_INTERVAL, Bridge, Envelope, encode_envelope, tag_node

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "EngineHost"]

logger = logging.getLogger("shared.bridge")

#: Reconnect delays: the first retry is quick (a restarted server), then doubling to 2 s.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
#: Items taken from the outbox at a time (one engine call for a run of events).
_BATCH = 512
#: Event bytes per engine message at most (NATS refuses messages above its max_payload,
#: 1 MiB by default); a run of events longer than that goes out in several messages.
_MAX_MESSAGE = 256 * 1024


class EngineHost:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake_pending = False
        self._same_thread = False

    # --- thread entry and stop -----------------------------------------------------------

    def run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._main = loop.create_task(self._drive())
            if self._stopping:
                self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(self._main)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def run_here(self) -> None:
        """Drive the engine in the running asyncio loop (the broker's own, on asyncio)."""
        self._loop = asyncio.get_running_loop()
        self._same_thread = True
        await self._drive()

    def stop(self) -> None:
        """From any thread: end the driver (the thread then exits)."""
        self._stopping = True
        loop, main = self._loop, self._main
        if loop is not None and main is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(main.cancel)

    def _wake(self) -> None:
        # Called by the broker's tap for every cluster publish: one cross-thread call per
        # burst, not per event (the loop's self-pipe write is the expensive part).
        if self._same_thread:
            if self._wakeup is not None:
                self._wakeup.set()  # the broker's own loop: no self-pipe write needed
            return
        if self._wake_pending:
            return
        loop = self._loop
        if loop is not None and self._wakeup is not None:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._wake_pending = False  # before the driver looks at the outbox again
        if self._wakeup is not None:
            self._wakeup.set()

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
        self._wakeup = asyncio.Event()
        bridge.wake_engine = self._wake
        failures = 0
        outage_since: float | None = None
        outage_reason = ""
        while True:
            engine = bridge.engine_factory()
            try:
                await engine.connect()
                await engine.subscribe(lambda payload: bridge.from_engine("m", payload))
            except asyncio.CancelledError:
                await engine.close()
                raise
            except Exception as exc:  # noqa: BLE001 - every engine failure is an outage
                await engine.close()
                failures += 1
                if outage_since is None:
                    outage_since = time.monotonic()
                    outage_reason = repr(exc)
                    logger.warning(
                        "bridge of node %s cannot reach %s: %r; cluster publishes are buffered "
                        "(up to %d), the local bus carries on",
                        bridge.node,
                        bridge.description,
                        exc,
                        bridge.max_buffer,
                    )
                ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(failures, 16))
                await asyncio.sleep(random.uniform(BACKOFF_MIN, max(BACKOFF_MIN, ceiling)))
                continue
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
            failures = 0
            outage_since = None
            try:
                reason = await self._session(engine)
            except asyncio.CancelledError:
                bridge.connected = False
                await engine.close()
                raise
            bridge.connected = False
            await engine.close()
            outage_since = time.monotonic()
            outage_reason = repr(reason)
            logger.warning(
                "bridge of node %s lost %s: %r; cluster publishes are buffered (up to %d), "
                "the local bus carries on",
                bridge.node,
                bridge.description,
                reason,
                bridge.max_buffer,
            )

    async def _session(self, engine: Any) -> BaseException | None:
        closed: asyncio.Future[BaseException | None] = asyncio.ensure_future(engine.wait_closed())
        sender: asyncio.Future[Any] = asyncio.ensure_future(self._send_loop(engine))
        both: set[asyncio.Future[Any]] = {closed, sender}
        try:
            done, _ = await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                exc = sender.exception()
                return exc
            return closed.result()
        finally:
            for task in (closed, sender):
                task.cancel()
            await asyncio.gather(closed, sender, return_exceptions=True)

    async def _send_loop(self, engine: Any) -> None:
        bridge = self.bridge
        wakeup = self._wakeup
        assert wakeup is not None
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
            wakeup.clear()
            if not bridge.outbox:
                timeout = max(0.0, next_sync - time.monotonic()) if seq != last_sync else None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), timeout)

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
                    await engine.publish_many(self._batches(items[index:end]))
                    bridge.sent += end - index
                    index = end
                    continue
                else:
                    _, key, event = item
                    if await engine.claim(key, bridge.unique_timeout):
                        bridge.unique_won += 1
                        bridge.from_engine("u", (key, event))
                    else:
                        bridge.unique_duplicates += 1
                index += 1
            except BaseException:
                bridge.put_back(items[index:])
                raise

    def _batches(self, run: list[tuple[Any, ...]]) -> list[bytes]:
        bridge = self.bridge
        node, generation = bridge.node, bridge.generation
        out: list[bytes] = []
        events: list[bytes] = []
        first = expect = size = 0
        for _, seq, _target, event in run:
            # A number dropped from a full outbox is a gap the receivers must see: a new
            # message starts there (and where the size bound is reached).
            if events and (seq != expect or size + len(event) > _MAX_MESSAGE):
                out.append(encode_envelope(Envelope("b", node, generation, first, events=tuple(events))))
                events = []
            if not events:
                first, size = seq, 0
            events.append(tag_node(event, node))
            size += len(event)
            expect = seq + 1
        if events:
            out.append(encode_envelope(Envelope("b", node, generation, first, events=tuple(events))))
        return out
