"""Embed the bus in a server's own workers: no broker process to run or supervise.

``async with join("unix:/run/app/bus.sock", workers=4) as bus:`` in every worker (e.g. in
an ASGI lifespan). What happens underneath:

1. **Worker id.** The worker locks the lowest free ``bus.sock.id.<n>`` file
   (:mod:`shared.election`): ids are ``0..N-1``, unique while their holders live, and a
   respawned worker gets the id of the one that died (its queue, ``worker:N`` target and
   ``others`` exclusion come with it).
2. **Election.** Every worker tries to lock ``bus.sock.lock`` without waiting. The one that
   gets it runs :meth:`Broker.serve` in a background task of its own event loop; the
   kernel releases the lock when that process dies, however it dies.
3. **Client.** Every worker, the host included, is an ordinary client of that broker over
   the Unix socket: this object *is* a :class:`Client`.
4. **Failover.** When a worker's connection drops it tries the lock at once and then every
   few milliseconds for a short while (and once a second always, as a safety net). The
   winner replaces the dead broker's stale socket file and serves; everybody's client
   reconnects on its own (5–20 ms backoff). Publishes made meanwhile wait in each
   publisher's buffer and go out to the new broker.
5. **Never silent.** Embedded brokers send lifecycle events (``welcome``, ``joined``,
   ``left``); each worker turns a change of broker into a local ``broker-moved`` event,
   and finds events that died with the old broker through per-publisher sequence numbers
   (:mod:`shared.sequence`), reported as local ``lost`` events. docs/embedding.md says what
   can and cannot be detected.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .bridge import DEFAULT_CLUSTER, Bridge
from .broker import LIFECYCLE_SOURCE, Broker, BrokerStatistics
from .client import Client
from .dispatch import Fields
from .election import (
    DEFAULT_MAX_WORKER_ID,
    FileLock,
    WorkerIdUnavailable,
    claim_worker_id,
    held_worker_ids,
    lock_path,
    workers_from_env,
)
from .errors import AddressInUse, PayloadTooLarge, PublishBufferFull, RemoteProtocolError
from .logutil import LogLimiter
from .messages import (
    OTHERS,
    Event,
    NodeWid,
    Target,
    as_control_frame,
    decode_event_fields,
    encode_event,
    encode_publish,
    parse_target,
)
from .sequence import BROADCAST_KEY, WORKER_KEY, SequenceIn, SequenceOut
from .transport import parse_address
from .transportnames import with_transport

__all__ = [
    "DEFAULT_ID_TIMEOUT",
    "EmbeddedClient",
    "WorkerIdUnavailable",
    "join",
]

logger = logging.getLogger(__name__)

#: Seconds ``join(workers=N)`` waits for a free id when all N are held (e.g. during a
#: gunicorn reload the old workers hold them until they have shut down).
DEFAULT_ID_TIMEOUT = 30.0
#: After a lost connection: try the election lock every RAPID_INTERVAL for RAPID_WINDOW.
RAPID_INTERVAL = 0.005
RAPID_WINDOW = 0.5
#: Otherwise try it this often, in case nobody noticed the host leave.
POLL_INTERVAL = 1.0
#: Seconds before a host whose broker failed to start tries again (keeping the lock).
HOST_RETRY = 1.0
#: Seconds a leaving host waits for its queues to reach the connected workers.
DRAIN_TIMEOUT = 1.0
#: Embedded reconnect backoff: a new broker is up within milliseconds of a takeover, and a
#: failed connect to a Unix socket costs a few microseconds.
EMBED_RECONNECT_MIN = 0.005
#: Seconds without a broker that are logged at INFO only: an election and a new host's
#: start take milliseconds (p99 under 0.4 s with 16 busy workers, docs/embedding.md).
QUIET_FAILOVER = 1.0
EMBED_RECONNECT_MAX = 0.02


class _Started(TaskStatus[Any]):
    """A ``task_status`` that runs a callback when the broker is listening."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: object = None) -> None:
        self._callback()


def _wid(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class EmbeddedClient(Client):
    """A :class:`Client` that may also host the broker. Build it with :func:`join`.

    Extra attributes: ``workers`` (the expected worker count, or None), ``is_broker``,
    ``generation`` (of the broker it is connected to), ``broker_moves``, ``lost``.
    """

    def __init__(
        self,
        address: str,
        *,
        worker_id: int,
        workers: int | None,
        max_worker_id: int = DEFAULT_MAX_WORKER_ID,
        mode: int = 0o600,
        broker_options: Mapping[str, Any] | None = None,
        bridge: str | None = None,
        node: str | None = None,
        cluster: str | None = None,
        **client_options: Any,
    ) -> None:
        client_options.setdefault("reconnect_min", EMBED_RECONNECT_MIN)
        client_options.setdefault("reconnect_max", EMBED_RECONNECT_MAX)
        # An edge: a transport name ("http" by default, as join's) becomes an object here.
        super().__init__(address, worker_id=worker_id, **with_transport(client_options))
        self.workers = workers
        self.max_worker_id = max_worker_id
        self.mode = mode
        self._broker_options = dict(broker_options or {})
        #: The cluster bridge (docs/cluster.md): whichever worker hosts the broker runs it,
        #: so it moves with the broker on failover.
        self.bridge_url = bridge
        self.node = node
        self.cluster = cluster
        self._socket_path = parse_address(address)
        self._out = SequenceOut()
        self._in = SequenceIn(worker_id)
        #: While a read's deliveries are decoded: where "lost" notices go, in order.
        self._batch: list[Fields] | None = None
        self._broker: Broker | None = None
        self._socket_inode = -1
        self._broker_identity: dict[str, Any] | None = None
        self._rapid_until = 0.0
        self._poke: anyio.Event | None = None
        self._election: AsyncExitStack | None = None
        self.generation: int | None = None
        self.broker_moves = 0
        #: ``time.monotonic()`` when the latest ``welcome`` was read (before any handler
        #: ran): when this worker was last connected to a broker, for measurements.
        self.welcomed_at: float | None = None
        #: The broker said it is stopping (its host shuts down): losing it is orderly.
        self._broker_stopping = False
        self._embed_log = LogLimiter(logger)

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> EmbeddedClient:
        stack = AsyncExitStack()
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        try:
            # The first election round before the client starts: a worker that wins it
            # connects to its own broker at the first attempt.
            await tg.start(self._elect)
            await super().__aenter__()
        except BaseException:
            await stack.aclose()
            raise
        self._election = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._election = self._election, None
        try:
            # Our own client first (it flushes, and the broker tells the others we left),
            # then what the broker still holds for connected workers, then the broker.
            await super().__aexit__(exc_type, exc, tb)
            await self._drain()
        finally:
            if stack is not None:
                await stack.aclose()
        return None

    async def _drain(self) -> None:
        """Stop hosting gracefully: deliver what is queued for connected workers, make the
        socket unreachable, hang up, and let every connection end on EOF."""
        broker = self._broker
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
        live = set(held_worker_ids(self._socket_path, self.max_worker_id))
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
            if os.lstat(self._socket_path).st_ino == self._socket_inode:
                os.unlink(self._socket_path)
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

    # --- introspection -------------------------------------------------------------------

    @property
    def is_broker(self) -> bool:
        """True while this process hosts the broker."""
        return self._broker is not None

    @property
    def lost(self) -> int:
        """Events found missing through sequence gaps (not counting reported drops)."""
        return self._in.lost

    def broker_statistics(self) -> BrokerStatistics | None:
        """The hosted broker's statistics, or None when another worker hosts it."""
        return None if self._broker is None else self._broker.statistics()

    # --- the election --------------------------------------------------------------------

    def _unreachable_level(self, seconds: float) -> int:
        # A host that said it is stopping, or a broker away for less than a failover takes
        # (workers starting together: the election's winner is still opening its socket),
        # is normal operation; a broker that stays away longer is worth a warning.
        quiet = QUIET_FAILOVER * (10 if self._broker_stopping else 1)
        return logging.INFO if seconds < quiet else logging.WARNING

    def _session_ended(self) -> None:
        # The broker may be gone: contend for the lock now, then often for a short while.
        self._rapid_until = time.monotonic() + RAPID_WINDOW
        if self._poke is not None:
            self._poke.set()

    async def _elect(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        path = lock_path(self._socket_path)
        announce: Callable[[], None] | None = task_status.started
        while True:
            try:
                lock = FileLock.acquire(path)
            except OSError as exc:
                self._embed_log.log(
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
        previous = lock.read_record()
        generation = (_wid(previous.get("generation")) or 0) + 1
        identity = {"pid": os.getpid(), "worker_id": self.worker_id, "generation": generation}
        lock.write_record(identity)
        while True:
            broker = Broker(
                transport=self.transport,
                profile=self.profile,
                expected_workers=self.workers or 0,
                lifecycle_events=True,
                bridge=self._make_bridge(),
                **self._broker_options,
            )
            broker.identity.update(identity)
            if not self.workers:
                # Unknown N: keep a queue for every id a live worker holds right now, so
                # what is published before it reconnects waits for it.
                for wid in held_worker_ids(self._socket_path, self.max_worker_id):
                    broker.router.detach(broker.router.attach(wid))

            def ready(broker: Broker = broker) -> None:
                nonlocal announce
                self._broker = broker
                self._socket_inode = os.lstat(self._socket_path).st_ino
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
                self._embed_log.log(
                    logging.ERROR,
                    "worker %d holds the election lock but cannot serve %s: %s; retrying in %ss",
                    self.worker_id,
                    self.address,
                    exc,
                    HOST_RETRY,
                )
            finally:
                self._broker = None
            await anyio.sleep(HOST_RETRY)

    def _make_bridge(self) -> Bridge | None:
        if not self.bridge_url:
            return None
        from .bridges import make_bridge  # engines are optional extras

        return make_bridge(self.bridge_url, node=self.node, cluster=self.cluster or DEFAULT_CLUSTER)

    # --- numbered publishes --------------------------------------------------------------

    def _encode(self, source: str, event: str, data: object, target: Target) -> bytes:
        numbered = None if source == LIFECYCLE_SOURCE else self._out.assign(target)
        if numbered is None:
            return super()._encode(source, event, data, target)
        try:
            if not isinstance(source, str) or not source or not isinstance(event, str) or not event:
                raise ValueError("source and event must be non-empty strings")
            msg: dict[str, object] = {"source": source, "event": event}
            if data is not None:
                msg["data"] = data
            msg["wid"] = self.worker_id
            msg[numbered[0]] = numbered[1]
            outer = encode_publish(self.profile, target, self.profile.codec.dumps(msg))
            if len(outer) > self.max_payload_len:
                raise PayloadTooLarge(len(outer), self.max_payload_len)
        except BaseException:
            self._out.rollback()
            raise
        return self._frame(outer)

    def publish_nowait(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        self._out.commit()
        try:
            super().publish_nowait(source, event, data, target, scope=scope)
        except (anyio.WouldBlock, PublishBufferFull):
            self._out.rollback()  # refused after numbering: take the number back
            raise
        self._out.commit()

    async def publish(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        # Wait for room *before* numbering, so numbers enter the buffer in order.
        parse_target(target)
        while len(self._buffer) >= self.max_buffer_len and self._connected:
            await self._progress.wait()
        self._out.commit()
        try:
            await super().publish(source, event, data, target, scope=scope)
        except PublishBufferFull:
            self._out.rollback()
            raise
        self._out.commit()

    def _session_started(self) -> None:
        # Tell every other worker our latest numbers, so a gap at the end of our stream
        # (events that died with the previous broker) shows up now.
        try:
            super().publish_nowait(LIFECYCLE_SOURCE, "sync", self._out.marks(), OTHERS)
        except (anyio.WouldBlock, PublishBufferFull, PayloadTooLarge) as exc:
            logger.warning("worker %d could not send its sync marker: %r", self.worker_id, exc)

    # --- checked deliveries --------------------------------------------------------------

    def _decode_batch(self, payloads: list[bytes]) -> tuple[list[Fields], list[RemoteProtocolError]]:
        # One delivery at a time, so that a "lost" notice lands right before the event
        # that revealed the gap.
        out: list[Fields] = []
        errors: list[RemoteProtocolError] = []
        self._batch = out
        try:
            for payload in payloads:
                try:
                    ev = self._decode_event(payload)
                except RemoteProtocolError as exc:
                    errors.append(exc)
                    continue
                out.append((ev.source, ev.event, ev.data, ev.wid))
        finally:
            self._batch = None
        return out, errors

    def _decode_event(self, payload: bytes) -> Event:
        msg = self.profile.codec.loads(payload)
        if not isinstance(msg, dict):
            raise RemoteProtocolError(f"event must be a map, got {type(msg).__name__}")
        source = msg.get("source")
        event = msg.get("event")
        if not isinstance(source, str) or not isinstance(event, str):
            control = as_control_frame(msg)  # (a pong: the client's read loop takes it)
            if control is not None:
                raise control
            raise RemoteProtocolError("event needs string 'source' and 'event'")
        raw_wid = msg.get("wid")
        wid = _wid(raw_wid)
        if raw_wid is not None and wid is None:
            raise RemoteProtocolError("wid must be an integer")
        data = msg.get("data")
        node = msg.get("node")
        if isinstance(node, str) and wid is not None:
            # From another node (docs/cluster.md): its numbers are not ours to check.
            return Event(source, event, data, NodeWid(wid, node), node)
        ev = Event(source, event, data, wid)
        lost = 0
        if wid is not None:
            for key in (BROADCAST_KEY, WORKER_KEY):
                number = msg.get(key)
                if isinstance(number, int) and not isinstance(number, bool):
                    lost += self._in.event(wid, key, number)
            if source == LIFECYCLE_SOURCE and event == "sync":
                lost += self._in.sync(wid, data)
            if lost:
                self._report_lost(lost, wid)
        elif source == LIFECYCLE_SOURCE and isinstance(data, dict):
            self._lifecycle(event, data)
        return ev

    def _report_lost(self, count: int, wid: int) -> None:
        self._embed_log.log(
            logging.WARNING,
            "worker %d: %d events from worker %d never arrived (lost with a broker)",
            self.worker_id,
            count,
            wid,
        )
        notice = (LIFECYCLE_SOURCE, "lost", {"count": count, "wid": wid, "total": self._in.lost}, None)
        if self._batch is not None:
            self._batch.append(notice)
        else:
            self._dispatcher.push(Event(*notice))

    def _lifecycle(self, event: str, data: dict[Any, Any]) -> None:
        if event == "dropped":
            count = _wid(data.get("count"))
            if count:
                self._in.dropped(count)
        elif event == "stopping":
            self._broker_stopping = True
        elif event == "joined":
            wid, pid = _wid(data.get("worker_id")), _wid(data.get("pid"))
            if wid is not None and pid is not None:
                self._in.joined(wid, pid)
        elif event == "welcome":
            broker = data.get("broker")
            if isinstance(broker, dict):
                self._welcomed(broker)

    def _welcomed(self, broker: dict[Any, Any]) -> None:
        self.welcomed_at = time.monotonic()
        self._broker_stopping = False
        previous = self._broker_identity
        self._broker_identity = broker
        self.generation = _wid(broker.get("generation"))
        if previous is None:
            return
        same = (previous.get("pid"), previous.get("generation")) == (
            broker.get("pid"),
            broker.get("generation"),
        )
        if same:
            return
        self.broker_moves += 1
        self._dispatcher.push(
            Event(
                LIFECYCLE_SOURCE,
                "broker-moved",
                {
                    "generation": broker.get("generation"),
                    "pid": broker.get("pid"),
                    "worker_id": broker.get("worker_id"),
                    "previous": previous,
                },
                None,
            )
        )


async def _claim_id(path: str, limit: int, *, wait: bool, patience: float) -> tuple[int, FileLock]:
    deadline = time.monotonic() + patience
    warned = False
    while True:
        claimed = claim_worker_id(path, limit)
        if claimed is not None:
            return claimed
        if not wait or time.monotonic() >= deadline:
            raise WorkerIdUnavailable(
                f"all {limit} worker ids of unix:{path} are held by live processes "
                f"(more workers running than workers={limit}?)"
            )
        if not warned:
            warned = True
            logger.warning("all %d worker ids are held; waiting up to %ss for one", limit, patience)
        await anyio.sleep(0.05)


@asynccontextmanager
async def join(
    address: str,
    *,
    workers: int | None = None,
    transport: str = "http",
    profile: str = "native",
    max_worker_id: int = DEFAULT_MAX_WORKER_ID,
    id_timeout: float = DEFAULT_ID_TIMEOUT,
    mode: int = 0o600,
    broker_options: Mapping[str, Any] | None = None,
    bridge: str | None = None,
    node: str | None = None,
    cluster: str | None = None,
    **client_options: Any,
) -> AsyncIterator[EmbeddedClient]:
    """Join the bus at ``address`` as one of the server's workers.

    Args:
        address: ``unix:/path/bus.sock``. The directory is created (mode 0700) if needed;
            the lock files live next to the socket.
        workers: how many workers the server runs. Ids are then ``0..workers-1`` (a
            worker waits up to ``id_timeout`` when all are held) and the broker keeps a
            queue for each of them from the start. None: read ``WEB_CONCURRENCY`` for the
            expected count (a hint only) and claim the lowest free id below
            ``max_worker_id``.
        transport: ``"http"`` or ``"stream"``; every worker must use the same.
        profile: ``"native"`` (the only one with ``worker``/``others`` targets).
        mode: the socket file's mode.
        broker_options: extra :class:`Broker` arguments for whichever worker hosts it.
        bridge: join a cluster of hosts through this engine URL (``nats://HOST:PORT``,
            ``redis://...``, ``redis+unix:///path``; docs/cluster.md); default: the
            ``WORKERBUS_BRIDGE`` environment variable, else host-local only.
        node: this host's name in the cluster; default ``WORKERBUS_NODE``, else the host
            name. cluster: the namespace; default ``WORKERBUS_CLUSTER``, else ``workerbus``.
        client_options: extra :class:`Client` arguments.

    Raises:
        WorkerIdUnavailable: no free worker id.
        ValueError: a bad address or option.
        OSError: the lock files cannot be created.
    """
    path = parse_address(address)
    bridge = bridge or os.environ.get("WORKERBUS_BRIDGE") or None
    node = node or os.environ.get("WORKERBUS_NODE") or None
    cluster = cluster or os.environ.get("WORKERBUS_CLUSTER") or None
    if bridge:
        from .bridges import make_bridge

        make_bridge(bridge, node=node, cluster=cluster or DEFAULT_CLUSTER)  # fail fast on a bad URL
    if workers is not None and not 1 <= workers <= max_worker_id:
        raise ValueError(f"workers must be within 1..{max_worker_id}, got {workers}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    expected = workers if workers is not None else workers_from_env()
    limit = workers if workers is not None else max_worker_id
    worker_id, id_lock = await _claim_id(path, limit, wait=workers is not None, patience=id_timeout)
    try:
        bus = EmbeddedClient(
            address,
            worker_id=worker_id,
            workers=expected,
            max_worker_id=max_worker_id,
            mode=mode,
            broker_options=broker_options,
            bridge=bridge,
            node=node,
            cluster=cluster,
            transport=transport,
            profile=profile,
            **client_options,
        )
        async with bus:
            yield bus
    finally:
        id_lock.release()
