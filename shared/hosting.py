"""Hosting the embedded broker: the election among the workers, serving, handing over.

Every embedded worker runs one :class:`Hosting`. It tries the election lock (next to the
socket) without waiting: at once, then every few milliseconds for a short while after its
client lost the broker, and once a second always as a safety net. The winner runs a
:class:`Broker` in a background task of its own event loop until it is cancelled or dies
(the kernel releases the lock however it dies); on an orderly stop, :meth:`drain` hands
over: the connected workers get what is queued for them and are told the host is going.
A new broker first does the handshakes of every live worker, then routes
(:meth:`Broker.await_reconnects`, at most :data:`TAKEOVER_HOLD`): in a takeover they all
reconnect at once, and the host's CPU is what the last of them waits for.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .bridge import DEFAULT_CLUSTER, Bridge
from .broker import LIFECYCLE_SOURCE, Broker
from .election import FileLock, held_worker_ids, lock_path
from .errors import AddressInUse, RemoteProtocolError
from .logutil import LogLimiter
from .messages import decode_event_fields, encode_event, parse_target
from .profile import Profile
from .sequence import as_int
from .transport import Transport, parse_address

__all__ = [
    "DRAIN_TIMEOUT",
    "HOST_RETRY",
    "POLL_INTERVAL",
    "RAPID_INTERVAL",
    "RAPID_WINDOW",
    "TAKEOVER_HOLD",
    "Hosting",
]

logger = logging.getLogger(__name__)

#: After a lost connection: try the election lock every RAPID_INTERVAL for RAPID_WINDOW.
RAPID_INTERVAL = 0.005
RAPID_WINDOW = 0.5
#: Otherwise try it this often, in case nobody noticed the host leave.
POLL_INTERVAL = 1.0
#: Seconds before a host whose broker failed to start tries again (keeping the lock).
HOST_RETRY = 1.0
#: Seconds a new broker holds routing at most while the live workers reconnect: a bound
#: for a worker that does not come back at once (stopped, blocked, or still starting).
#: 0.1 s let the last survivors of a loaded takeover meet routing already under way
#: (100-kill A/B, 16 workers: p99 438 ms at 0.1 s, 292 ms at 0.3 s; docs/benchmarks.md).
TAKEOVER_HOLD = 0.3
#: Seconds a leaving host waits for its queues to reach the connected workers.
DRAIN_TIMEOUT = 1.0


class _Started(TaskStatus[Any]):
    """A ``task_status`` that runs a callback when the broker is listening."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


class Hosting:
    """One worker's part in the election, and the broker while it hosts one.

    Args:
        address: the bus's ``unix:`` address (the lock files live next to the socket).
        worker_id: this worker's id (in the lock record and the broker's identity).
        workers: the expected worker count (queues kept from the start), or None.
        max_worker_id: ids below this may be held by live workers (used when ``workers``
            is None, to keep a queue for each).
        transport, profile: the broker's, the same as every worker's client.
        mode: the socket file's mode.
        broker_options: extra :class:`Broker` arguments.
        bridge_url, node, cluster: the cluster bridge the host runs (docs/cluster.md), so
            it moves with the broker on failover.
    """

    def __init__(
        self,
        address: str,
        *,
        worker_id: int,
        workers: int | None,
        max_worker_id: int,
        transport: Transport,
        profile: Profile,
        mode: int = 0o600,
        broker_options: Mapping[str, Any] | None = None,
        bridge_url: str | None = None,
        node: str | None = None,
        cluster: str | None = None,
    ) -> None:
        self.address = address
        self.socket_path = parse_address(address)
        self.worker_id = worker_id
        self.workers = workers
        self.max_worker_id = max_worker_id
        self.transport = transport
        self.profile = profile
        self.mode = mode
        self.broker_options = dict(broker_options or {})
        self.bridge_url = bridge_url
        self.node = node
        self.cluster = cluster
        #: The broker this process hosts now, or None.
        self.broker: Broker | None = None
        #: The generation this process hosts (or hosted last), or None.
        self.generation: int | None = None
        #: ``time.monotonic()`` when this process last won the election lock, and when its
        #: broker last started listening (None before): the phases of a takeover, for
        #: measurements (benchmarks/failover.py).
        self.locked_at: float | None = None
        self.listening_at: float | None = None
        self._socket_inode = -1
        self._rapid_until = 0.0
        self._poke: anyio.Event | None = None
        self._log = LogLimiter(logger)

    def contend(self) -> None:
        """The broker may be gone (our client lost it): try the lock now, then often for
        a short while. Never blocks."""
        self._rapid_until = time.monotonic() + RAPID_WINDOW
        if self._poke is not None:
            self._poke.set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take part in the election until cancelled. Reports started after the first
        round: hosting and listening, or another worker holds the lock."""
        path = lock_path(self.socket_path)
        announce: Callable[[], None] | None = task_status.started
        while True:
            try:
                lock = FileLock.acquire(path)
            except OSError as exc:
                self._log.log(
                    logging.ERROR,
                    "worker %d cannot open the election lock %s: %s",
                    self.worker_id,
                    path,
                    exc,
                )
                lock = None
            if lock is not None:
                try:
                    await self._host(lock, announce)
                finally:
                    lock.release()
            if announce is not None:
                announce()
                announce = None
            if time.monotonic() < self._rapid_until:
                await anyio.sleep(RAPID_INTERVAL)
                continue
            self._poke = anyio.Event()
            with anyio.move_on_after(POLL_INTERVAL):
                await self._poke.wait()

    async def _host(self, lock: FileLock, announce: Callable[[], None] | None) -> None:
        """Serve as the broker for as long as this process holds the lock (until cancelled)."""
        self.locked_at = time.monotonic()
        previous = lock.read_record()
        generation = (as_int(previous.get("generation")) or 0) + 1
        identity = {"pid": os.getpid(), "worker_id": self.worker_id, "generation": generation}
        lock.write_record(identity)
        self.generation = generation
        while True:
            broker = Broker(
                transport=self.transport,
                profile=self.profile,
                expected_workers=self.workers or 0,
                lifecycle_events=True,
                bridge=self._make_bridge(),
                **self.broker_options,
            )
            broker.identity.update(identity)
            live = held_worker_ids(self.socket_path, self.max_worker_id)
            if not self.workers:
                # Unknown N: keep a queue for every id a live worker holds right now, so
                # what is published before it reconnects waits for it.
                for wid in live:
                    broker.router.detach(broker.router.attach(wid))
            # Every live worker (its client included) connects within milliseconds: the
            # handshakes go first, then routing (Broker.await_reconnects).
            broker.await_reconnects(live, TAKEOVER_HOLD)

            def ready(broker: Broker = broker) -> None:
                nonlocal announce
                self.listening_at = time.monotonic()
                self.broker = broker
                self._socket_inode = os.lstat(self.socket_path).st_ino
                if announce is not None:
                    announce()
                    announce = None
                logger.info(
                    "worker %d (pid %d) hosts the broker at %s, generation %d (previous host: %s)",
                    self.worker_id,
                    os.getpid(),
                    self.address,
                    generation,
                    previous or "none",
                )

            try:
                await broker.serve(self.address, mode=self.mode, task_status=_Started(ready))
            except (AddressInUse, OSError) as exc:
                if announce is not None:
                    announce()  # joining must not hang on a broker that cannot start
                    announce = None
                self._log.log(
                    logging.ERROR,
                    "worker %d holds the election lock but cannot serve %s: %s; retrying in %ss",
                    self.worker_id,
                    self.address,
                    exc,
                    HOST_RETRY,
                )
            finally:
                self.broker = None
            await anyio.sleep(HOST_RETRY)

    def _make_bridge(self) -> Bridge | None:
        if not self.bridge_url:
            return None
        from .bridges import make_bridge  # engines are optional extras

        return make_bridge(self.bridge_url, node=self.node, cluster=self.cluster or DEFAULT_CLUSTER)

    async def drain(self) -> None:
        """Stop hosting gracefully: deliver what is queued for connected workers, make the
        socket unreachable, hang up, and let every connection end on EOF.

        Call it after this worker's own client has left (so the others are told it left),
        and cancel :meth:`run` after it.
        """
        broker = self.broker
        if broker is None:
            return
        # Tell the others this broker is going away on purpose, so that losing it is no
        # warning for them (they elect a new host as after a crash, but quietly). Only
        # the connected ones: the others will not be back to this broker.
        stopping = encode_event(
            self.profile,
            LIFECYCLE_SOURCE,
            "stopping",
            {"worker_id": self.worker_id, "pid": os.getpid(), "generation": self.generation},
            None,
        )
        for q in broker.statistics().router.queues:
            if q.connected:
                broker.inject(parse_target(q.worker_id), stopping)
        # Polled: the queues have no "empty" event to wait on, and this runs once at exit.
        # Our own connection must be gone first, so the others are told we left.
        for _ in range(int(DRAIN_TIMEOUT / 0.005)):
            queues = broker.statistics().router.queues
            if not any(
                q.connected and (q.depth or q.worker_id == self.worker_id) for q in queues
            ):
                break
            await anyio.sleep(0.005)
        live = set(held_worker_ids(self.socket_path, self.max_worker_id))
        stranded = sum(
            self._published_events(q.frames)
            for q in broker.router.queues.values()
            if q.worker_id in live and q.worker_id != self.worker_id
        )
        if stranded:
            logger.warning(
                "worker %d stops hosting the broker with %d events still queued for live "
                "workers that are not connected; they are lost (their sequence checks will "
                "report them)",
                self.worker_id,
                stranded,
            )
        # Unlink first so nobody reconnects to this broker (and make sure the broker does
        # not put the file back), then hang up rather than cancel the readers (see
        # Broker.hang_up_all).
        broker.keep_socket_file = False
        try:
            if os.lstat(self.socket_path).st_ino == self._socket_inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        broker.hang_up_all()
        for _ in range(int(DRAIN_TIMEOUT / 0.005)):
            if not broker.statistics().connections:
                break
            await anyio.sleep(0.005)

    def _published_events(self, frames: Iterable[bytes]) -> int:
        """How many queued frames are published events (what the sequence checks would
        report lost), not the bus's own notices: a worker that is itself shutting down
        has "left" and "stopping" in its queue, and missing them is no loss."""
        skip = self.profile.header_len
        count = 0
        for frame in frames:
            try:
                source = decode_event_fields(self.profile, frame[skip:])[0]
            except RemoteProtocolError:
                source = None
            count += source != LIFECYCLE_SOURCE
        return count
