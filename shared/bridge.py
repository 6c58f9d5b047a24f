"""The cluster bridge: a broker's link to the brokers of other hosts (docs/cluster.md).

This module is the engine-neutral half. It plugs into a broker through the router's seam
(``taps`` see every local publish; :meth:`Broker.inject` routes an event from elsewhere) and
does everything that must not depend on NATS or Redis:

- picks the publishes with cluster scope (the others never leave the host), numbers them
  per node and broker generation, and keeps them in a bounded outbox while the engine is
  away (the overflow is counted; receivers see it as a numbered gap);
- checks the numbers of what other nodes send and turns every gap into a ``lost`` event
  for the local workers (source ``workerbus``, with the count and the node);
- adds the sender's ``node`` to every event it injects, never injects what this node sent
  (an engine may echo it) and never forwards what it injected (injected events do not pass
  the taps): no loops.

An :class:`Engine` moves opaque byte messages; engines are asyncio libraries (nats-py,
redis-py), so :mod:`shared.bridges.host` runs one in the broker's loop on asyncio, and in
an asyncio loop on a thread of its own under trio; either way messages cross through two
thread-safe queues (on a thread, each way with a wake-up socket). This module never
imports an engine.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import msgpack
import sniffio
from anyio.abc import TaskStatus

from .messages import ALL, Target, TargetKind
from .sequence import BROADCAST_KEY, WORKER_KEY

if TYPE_CHECKING:
    from .broker import Broker

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_MAX_BUFFER",
    "Bridge",
    "BridgeStatistics",
    "Engine",
    "EngineRefused",
    "Envelope",
    "GapCheck",
    "decode_envelope",
    "describe",
    "encode_envelope",
    "tag_node",
]

logger = logging.getLogger(__name__)

#: The subject/channel namespace when none is given.
DEFAULT_CLUSTER = "workerbus"
#: Cluster publishes held while the engine is unreachable; the next ones are dropped,
#: counted, and show up as lost on the other nodes.
DEFAULT_MAX_BUFFER = 10000
#: Seconds between two sync markers (latest number sent) while this node publishes: how
#: soon the other nodes find out that the last events before an outage never came.
SYNC_INTERVAL = 1.0
_LIFECYCLE_SOURCE = "workerbus"
#: The GIL switch interval while the engine runs on a thread of its own (trio brokers).
THREAD_SWITCH_INTERVAL = 0.0005


@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    #: engine the bridge uses (its URL, without credentials)
    engine: str
    node: str
    #: True while the engine connection is up
    engine_connected: bool
    #: cluster events handed to the engine
    sent: int
    #: cluster events received from other nodes and injected here
    received: int
    #: events of other nodes found missing (numbered gaps), reported as ``lost``
    lost: int
    #: cluster publishes waiting for the engine
    buffered: int
    #: cluster publishes dropped because the outbox was full (or the engine refused them)
    dropped: int
    #: engine connections after the first
    reconnects: int
    #: cluster unique keys this node won (and handled) / found already claimed elsewhere
    unique_won: int = 0
    unique_duplicates: int = 0


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on the engine. ``kind``: ``"b"`` a run of events numbered ``seq``,
    ``seq + 1``, … (what bridges send), ``"e"`` one event, ``"s"`` a sync marker."""

    kind: str
    node: str
    generation: str
    seq: int
    target: str = "all"
    event: bytes = b""
    events: tuple[bytes, ...] = ()


def encode_envelope(env: Envelope) -> bytes:
    msg: dict[str, object] = {"k": env.kind, "n": env.node, "g": env.generation, "s": env.seq}
    if env.kind == "e":
        msg["t"] = env.target
        msg["e"] = env.event
    elif env.kind == "b":
        msg["e"] = list(env.events)
    return bytes(msgpack.packb(msg, use_bin_type=True))


def tag_node(event: bytes, node: str) -> bytes:
    """``event`` (a MessagePack map) with ``"node": node`` added, and the embedded mode's
    per-host sequence numbers removed (they do not cross).

    The common case costs no decoding: when the map has none of those keys, the map's
    length in its header goes up by one and the pair is appended. Anything else (one of
    the keys present, a map header this does not patch) is decoded and re-encoded.
    """
    first = event[:1]
    if first and b"\xa4node" not in event and b"\xa2sb" not in event and b"\xa2sw" not in event:
        b0 = first[0]
        if 0x80 <= b0 < 0x8F:  # fixmap with fewer than 15 pairs
            return bytes((b0 + 1,)) + event[1:] + b"\xa4node" + bytes(msgpack.packb(node))
        if b0 == 0xDE and len(event) >= 3:  # map 16
            n = int.from_bytes(event[1:3], "big")
            if n < 0xFFFF:
                return b"\xde" + (n + 1).to_bytes(2, "big") + event[3:] + b"\xa4node" + bytes(msgpack.packb(node))
    try:
        msg = msgpack.unpackb(event, raw=False)
    except Exception:  # noqa: BLE001 - forward what we cannot read unchanged
        return event
    if isinstance(msg, dict):
        msg.pop(BROADCAST_KEY, None)
        msg.pop(WORKER_KEY, None)
        msg["node"] = node
        return bytes(msgpack.packb(msg, use_bin_type=True))
    return event


def decode_envelope(payload: bytes) -> Envelope | None:
    """None for anything that is not a valid envelope (counted by the caller)."""
    try:
        msg = msgpack.unpackb(payload, raw=False)
    except Exception:  # noqa: BLE001 - any undecodable input is just not an envelope
        return None
    if not isinstance(msg, dict):
        return None
    kind, node, gen, seq = msg.get("k"), msg.get("n"), msg.get("g"), msg.get("s")
    if kind not in ("b", "e", "s") or not isinstance(node, str) or not isinstance(gen, str):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool):
        return None
    if kind == "s":
        return Envelope("s", node, gen, seq)
    if kind == "b":
        events = msg.get("e")
        if not isinstance(events, list) or not events or not all(isinstance(e, bytes) for e in events):
            return None
        return Envelope("b", node, gen, seq, events=tuple(events))
    target, event = msg.get("t"), msg.get("e")
    if target not in ("all", "others") or not isinstance(event, bytes):
        return None
    return Envelope("e", node, gen, seq, target, event)


class GapCheck:
    """What this node has seen of every other node's numbered stream.

    A node's stream is identified by its name and its broker generation (a random id per
    broker start): a new generation starts a new baseline.
    """

    __slots__ = ("_last", "lost")

    def __init__(self) -> None:
        self._last: dict[str, tuple[str, int]] = {}
        self.lost = 0

    def step(self, node: str, generation: str, seq: int, *, marker: bool) -> int:
        """Event number ``seq`` (or a marker "my latest is ``seq``"); returns newly lost,
        or -1 for an event already seen (a duplicate: not to be delivered again)."""
        previous = self._last.get(node)
        if previous is None or previous[0] != generation:
            self._last[node] = (generation, seq)
            return 0  # first sight of this stream: the baseline
        last = previous[1]
        if seq <= last:
            return 0 if marker else -1  # a marker we are past, or a duplicate
        self._last[node] = (generation, seq)
        gap = seq - last - (0 if marker else 1)
        if gap > 0:
            self.lost += gap
            return gap
        return 0


    def step_run(self, node: str, generation: str, first: int, count: int) -> tuple[int, int]:
        """Events numbered ``first`` … ``first + count - 1`` arrived together: returns
        (newly lost before them, how many of them at the start were already seen)."""
        last_new = first + count - 1
        previous = self._last.get(node)
        if previous is None or previous[0] != generation:
            self._last[node] = (generation, last_new)
            return 0, 0  # first sight of this stream: the baseline
        last = previous[1]
        if last_new <= last:
            return 0, count  # all seen already
        self._last[node] = (generation, last_new)
        seen = max(0, last - first + 1)
        gap = max(0, first - last - 1)
        self.lost += gap
        return gap, seen


class EngineRefused(Exception):
    """The engine answered, and said no: retrying on a new connection would get the same
    answer (NATS without JetStream for a claim, a Redis ACL or a renamed command). Not an
    outage: the item is dropped, counted and logged, and the connection is kept."""


def describe(exc: BaseException | None) -> str:
    """An engine failure for a log line: its type and its message. (Some reprs say
    little: redis-py's ConnectionError is ``network:ConnectionError``, without the why.)"""
    if exc is None:
        return "connection closed"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Engine(Protocol):
    """What an engine module provides. Every method runs in the host's asyncio loop."""

    #: for logs and statistics (no credentials)
    description: str

    async def connect(self) -> None:
        """Connect; raise on failure. Called again after every outage."""

    async def subscribe(self, on_message: Callable[[bytes], None]) -> None:
        """Deliver every cluster message (including this node's own) to ``on_message``."""

    async def publish(self, payload: bytes) -> None:
        """Send one message to every node; raise if the connection is gone."""

    async def publish_many(self, payloads: list[bytes]) -> None:
        """:meth:`publish` for several messages, in order (one round trip where it can).
        An engine with a size limit per message says so in an attribute ``max_message``
        (bytes): the bridge's messages stay within it and within 256 KiB."""

    async def claim(self, key: str, ttl: float) -> bool:
        """Atomically claim ``key`` for ``ttl`` seconds; False if already claimed. Raise
        :class:`EngineRefused` if the engine answers with an error."""

    async def wait_closed(self) -> BaseException | None:
        """Return (the reason) when the connection is lost. Runs for the whole session:
        an engine may read its subscription here (cancelled when a send fails or the
        bridge stops)."""

    async def close(self) -> None:
        """Close whatever is open; never raises."""


class Bridge:
    """A broker's bridge to the cluster. Give it to ``Broker(bridge=...)``.

    Args:
        engine_factory: builds the :class:`Engine` (called in the engine's thread).
        node: this node's name, unique in the cluster.
        max_buffer: cluster publishes held while the engine is unreachable.
    """

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        *,
        node: str,
        description: str,
        max_buffer: int = DEFAULT_MAX_BUFFER,
    ) -> None:
        if not node:
            raise ValueError("the node name must not be empty")
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.engine_factory = engine_factory
        self.node = node
        self.description = description
        self.max_buffer = max_buffer
        #: new for every broker start, so receivers tell a restart from a gap
        self.generation = os.urandom(8).hex()
        self._broker: Broker | None = None
        self._header_len = 2
        self._unique_timeout = 5.0
        # broker -> engine thread: ("e", seq, target, event) or ("u", key, event)
        self._lock = threading.Lock()
        self.outbox: deque[tuple[Any, ...]] = deque()
        self._seq = 0
        #: set by the host: wakes the engine thread (thread-safe, non-blocking)
        self.wake_engine: Callable[[], None] = _nothing
        # engine thread -> broker: raw engine messages and won unique events
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake_pending = False
        #: True while the engine runs in the broker's own loop (asyncio): what it receives
        #: is handed over by a plain call, no wake-up socket
        self._same_thread = False
        # (made by run: a bridge that never runs holds no sockets)
        self._wsock: socket.socket | None = None
        self._gaps = GapCheck()
        self.connected = False
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.connects = 0
        self.unique_won = 0
        self.unique_duplicates = 0
        self.invalid = 0
        self.duplicates = 0

    # --- the broker side (its event loop) ------------------------------------------------

    def attach(self, broker: Broker) -> None:
        """Called by the broker it belongs to (once)."""
        if broker.profile.name != "native":
            raise ValueError("the cluster bridge needs the native profile")
        self._broker = broker
        self._header_len = broker.profile.header_len
        self._unique_timeout = broker.router.unique_timeout
        broker.router.taps.append(self._tap)
        broker.router.defer_cluster_unique = True

    def _tap(self, publisher: int, target: Target, frame: bytes) -> None:
        # Runs for every local publish: host-local ones return at once.
        if not target.cluster:
            return
        event = frame[self._header_len :]
        with self._lock:
            if target.kind is TargetKind.UNIQUE:
                item: tuple[Any, ...] = ("u", target.key, event)
            else:
                # Numbered even when dropped: the other nodes then see the gap.
                self._seq += 1
                item = ("e", self._seq, target.kind.value, event)
            if len(self.outbox) >= self.max_buffer:
                self.dropped += 1
                full = True
            else:
                self.outbox.append(item)
                full = False
        if full:
            assert self._broker is not None
            self._broker.log_limiter.log(
                logging.WARNING,
                "bridge outbox full (%d cluster publishes waiting for %s): dropping; "
                "%d dropped so far",
                self.max_buffer,
                self.description,
                self.dropped,
            )
        self.wake_engine()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the engine and hand what it receives to the broker, until cancelled.

        On asyncio (and uvloop) the engine client runs in the broker's own loop; on trio
        it gets an asyncio loop on a thread of its own. Measured (docs/cluster.md): a
        thread under asyncio halved the throughput and added tens of milliseconds to the
        p99, from the two threads taking turns on the GIL.
        """
        from .bridges.host import EngineHost  # the asyncio side lives apart

        rsock, self._wsock = socket.socketpair()
        rsock.setblocking(False)
        self._wsock.setblocking(False)
        host = EngineHost(self)
        try:
            if sniffio.current_async_library() == "asyncio":
                self._same_thread = True
                async with anyio.create_task_group() as tg:
                    tg.start_soon(host.run_here)
                    task_status.started()
                    await self._pump(rsock)
            else:
                thread = threading.Thread(target=host.run, name=f"workerbus-bridge-{self.node}", daemon=True)
                # Two busy threads hand the GIL over every switch interval (5 ms by default):
                # a message the engine thread has read waits that long while the broker's
                # thread routes a burst. A shorter interval bounds that wait (measured in
                # docs/cluster.md); restored when the bridge stops.
                interval = sys.getswitchinterval()
                sys.setswitchinterval(min(interval, THREAD_SWITCH_INTERVAL))
                ours = sys.getswitchinterval()  # (as stored: whole microseconds)
                thread.start()
                try:
                    task_status.started()
                    await self._pump(rsock)
                finally:
                    host.stop()
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(thread.join, 5.0)
                    if not thread.is_alive():
                        host.close()
                    if sys.getswitchinterval() == ours:  # (not if the application set its own since)
                        sys.setswitchinterval(interval)
        finally:
            rsock.close()
            self._wsock.close()
            self._wsock = None

    async def _pump(self, rsock: socket.socket) -> None:
        while True:
            await anyio.wait_readable(rsock)
            try:
                rsock.recv(4096)
            except BlockingIOError:
                pass
            self._wake_pending = False  # before draining: see from_engine
            self._drain()

    def _drain(self) -> None:
        inbox = self._inbox
        broker = self._broker
        assert broker is not None
        while inbox:
            kind, value = inbox.popleft()
            if kind == "m":
                self._receive(broker, value)
            else:  # "u": a unique key this node won: handle it here, once
                key, event = value
                broker.inject(Target(TargetKind.UNIQUE, key=key), tag_node(event, self.node))

    def _receive(self, broker: Broker, payload: bytes) -> None:
        env = decode_envelope(payload)
        if env is None:
            self.invalid += 1
            broker.log_limiter.log(logging.WARNING, "bridge: skipped an undecodable cluster message")
            return
        if env.node == self.node:
            # Our own message echoed back (or a node misconfigured with our name).
            if env.generation != self.generation:
                broker.log_limiter.log(
                    logging.WARNING,
                    "bridge: a message from another node also named %r; node names must be unique",
                    self.node,
                )
            return
        if env.kind == "b":
            # A run of events, already tagged with their node by the sender (tag_node):
            # nothing is decoded per event on this side.
            lost, seen = self._gaps.step_run(env.node, env.generation, env.seq, len(env.events))
            self.duplicates += seen
            if lost:
                self._report_lost(broker, lost, env.node)
            fresh = env.events[seen:] if seen else env.events
            self.received += len(fresh)
            if fresh:
                # "others" excludes the publisher, who is not on this node: all of ours.
                broker.inject_many(ALL, fresh)
            return
        lost = self._gaps.step(env.node, env.generation, env.seq, marker=env.kind == "s")
        if lost < 0:
            self.duplicates += 1
            return
        if lost:
            self._report_lost(broker, lost, env.node)
        if env.kind == "e":
            self.received += 1
            broker.inject(ALL, tag_node(env.event, env.node))

    def _report_lost(self, broker: Broker, lost: int, node: str) -> None:
        broker.log_limiter.log(
            logging.WARNING, "bridge: %d cluster events from node %s never arrived", lost, node
        )
        notice = msgpack.packb(
            {
                "source": _LIFECYCLE_SOURCE,
                "event": "lost",
                "data": {"count": lost, "node": node, "total": self._gaps.lost},
            },
            use_bin_type=True,
        )
        broker.inject(ALL, notice)

    # --- called from the engine thread ---------------------------------------------------

    def from_engine(self, kind: str, value: Any) -> None:
        """Hand a message (``"m"``) or a won unique event (``"u"``) to the broker side."""
        self._inbox.append((kind, value))
        if self._same_thread:
            if self._broker is not None:
                self._drain()
            return
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wsock.send(b"\0")  # type: ignore[union-attr]
            except (AttributeError, BlockingIOError, OSError):
                pass  # a wake-up byte is already waiting (or we are shutting down)

    def take_outbox(self, limit: int) -> list[tuple[Any, ...]]:
        with self._lock:
            count = min(limit, len(self.outbox))
            return [self.outbox.popleft() for _ in range(count)]

    def refused(self, what: str, reason: str) -> None:
        """The engine refused an item (see :class:`EngineRefused`): it is dropped. From
        the engine's thread or loop."""
        with self._lock:
            self.dropped += 1
            dropped = self.dropped
        assert self._broker is not None
        self._broker.log_limiter.log(
            logging.WARNING,
            "bridge of node %s: %s refused %s (%s): dropped; %d dropped so far",
            self.node,
            self.description,
            what,
            reason,
            dropped,
        )

    def put_back(self, items: list[tuple[Any, ...]]) -> None:
        with self._lock:
            self.outbox.extendleft(reversed(items))

    def sync_number(self) -> int | None:
        """The latest number when everything numbered has left the outbox, else None."""
        with self._lock:
            if any(item[0] == "e" for item in self.outbox):
                return None
            return self._seq

    # --- introspection -------------------------------------------------------------------

    def statistics(self) -> BridgeStatistics:
        return BridgeStatistics(
            engine=self.description,
            node=self.node,
            engine_connected=self.connected,
            sent=self.sent,
            received=self.received,
            lost=self._gaps.lost,
            buffered=len(self.outbox),
            dropped=self.dropped,
            reconnects=max(0, self.connects - 1),
            unique_won=self.unique_won,
            unique_duplicates=self.unique_duplicates,
        )

    @property
    def unique_timeout(self) -> float:
        return self._unique_timeout


def _nothing() -> None:
    pass

