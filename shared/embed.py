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
   reconnects on its own (5–20 ms backoff), and the new broker does their handshakes
   before it routes what they re-send. Publishes made meanwhile wait in each
   publisher's buffer and go out to the new broker.
5. **Never silent.** Embedded brokers send lifecycle events (``welcome``, ``joined``,
   ``left``); each worker turns a change of broker into a local ``broker-moved`` event,
   and finds events that died with the old broker through per-publisher sequence numbers
   (:mod:`shared.sequence`), reported as local ``lost`` events. docs/embedding.md says what
   can and cannot be detected.

The pieces, one job each: :mod:`shared.election` (ids and the lock), :mod:`shared.hosting`
(the election loop, serving, handing over), :mod:`shared.sequence` (numbers and gaps),
:mod:`shared.numbered` (numbered publishes, the short way), and
here :class:`BrokerWatch` (which broker we are connected to) and the composition: an
:class:`EmbeddedClient` is a plain :class:`Client` given :class:`ClientHooks` that route
each hook to the piece whose job it is.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

import anyio

from .bridge import DEFAULT_CLUSTER
from .broker import LIFECYCLE_SOURCE, BrokerStatistics
from .client import Client, ClientHooks
from .dispatch import Fields
from .election import (
    DEFAULT_MAX_WORKER_ID,
    FileLock,
    WorkerIdUnavailable,
    claim_worker_id,
    workers_from_env,
)
from .errors import PayloadTooLarge, PublishBufferFull
from .hosting import Hosting
from .messages import OTHERS
from .numbered import NumberedEncoder
from .sequence import Sequencer, as_int
from .transport import parse_address
from .transportnames import with_transport

__all__ = [
    "DEFAULT_ID_TIMEOUT",
    "BrokerWatch",
    "EmbeddedClient",
    "WorkerIdUnavailable",
    "join",
]

logger = logging.getLogger(__name__)

#: Seconds ``join(workers=N)`` waits for a free id when all N are held (e.g. during a
#: gunicorn reload the old workers hold them until they have shut down).
DEFAULT_ID_TIMEOUT = 30.0
#: Embedded reconnect backoff: a new broker is up within milliseconds of a takeover, and a
#: failed connect to a Unix socket costs a few microseconds.
EMBED_RECONNECT_MIN = 0.005
#: Seconds without a broker that are logged at INFO only: an election and a new host's
#: start take milliseconds (p99 under 0.4 s with 16 busy workers, docs/embedding.md).
QUIET_FAILOVER = 1.0
EMBED_RECONNECT_MAX = 0.02


class BrokerWatch:
    """Which broker this worker is connected to, from the broker's lifecycle events.

    A ``welcome`` from a broker other than the last one (pid and generation) is a move:
    counted and told to the handlers as a local ``broker-moved`` event. A ``stopping``
    (its host leaves on purpose) makes losing that broker quiet in the log.
    """

    def __init__(self) -> None:
        #: The generation of the broker connected to (or last connected to), or None.
        self.generation: int | None = None
        self.broker_moves = 0
        #: ``time.monotonic()`` when the latest ``welcome`` was read (before any handler
        #: ran): when this worker was last connected to a broker, for measurements.
        self.welcomed_at: float | None = None
        #: ``time.monotonic()`` when the latest connection to a broker ended, or None.
        self.lost_at: float | None = None
        #: The broker said it is stopping (its host shuts down): losing it is orderly.
        self.stopping = False
        self._identity: dict[Any, Any] | None = None

    def unreachable_level(self, seconds: float) -> int:
        # A host that said it is stopping, or a broker away for less than a failover takes
        # (workers starting together: the election's winner is still opening its socket),
        # is normal operation; a broker that stays away longer is worth a warning.
        quiet = QUIET_FAILOVER * (10 if self.stopping else 1)
        return logging.INFO if seconds < quiet else logging.WARNING

    def lifecycle(self, event: str, data: dict[Any, Any], out: list[Fields]) -> None:
        """A :data:`shared.sequence.LifecycleObserver`."""
        if event == "stopping":
            self.stopping = True
        elif event == "welcome":
            broker = data.get("broker")
            if isinstance(broker, dict):
                self._welcomed(broker, out)

    def _welcomed(self, broker: dict[Any, Any], out: list[Fields]) -> None:
        self.welcomed_at = time.monotonic()
        self.stopping = False
        previous = self._identity
        self._identity = broker
        self.generation = as_int(broker.get("generation"))
        if previous is None:
            return
        same = (previous.get("pid"), previous.get("generation")) == (
            broker.get("pid"),
            broker.get("generation"),
        )
        if same:
            return
        self.broker_moves += 1
        moved = {
            "generation": broker.get("generation"),
            "pid": broker.get("pid"),
            "worker_id": broker.get("worker_id"),
            "previous": previous,
        }
        out.append((LIFECYCLE_SOURCE, "broker-moved", moved, None))


class _Embedding(ClientHooks):
    """The composition: each client hook goes to the piece whose job it is."""

    def __init__(self, sequencer: Sequencer, watch: BrokerWatch) -> None:
        self.sequencer = sequencer
        self.watch = watch
        #: Set once the client exists (the hosting shares its transport and profile).
        self.hosting: Hosting | None = None
        # Per event: bound straight to the sequencer, no extra call in between; publishes
        # through its short path (shared/numbered.py: the same bytes).
        self.encode_publish = NumberedEncoder(sequencer)  # type: ignore[method-assign]
        self.decode_batch = sequencer.decode_batch  # type: ignore[method-assign]
        self.decode_objects = sequencer.decode_objects  # type: ignore[method-assign]

    def session_started(self, client: Client) -> None:
        # Tell every other worker our latest numbers, so a gap at the end of our stream
        # (events that died with the previous broker) shows up now.
        try:
            client.publish_nowait(LIFECYCLE_SOURCE, "sync", self.sequencer.marks(), OTHERS)
        except (anyio.WouldBlock, PublishBufferFull, PayloadTooLarge) as exc:
            logger.warning("worker %d could not send its sync marker: %r", client.worker_id, exc)

    def wrote(self, client: Client) -> None:
        # The host's own publishes are routed now, in the publisher's turn, rather than
        # after it when the broker's read task gets the loop (docs/benchmarks.md
        # "Embedded seed, session 5").
        hosting = self.hosting
        if hosting is not None and hosting.broker is not None:
            hosting.broker.route_waiting(client.worker_id)

    def session_ended(self, client: Client) -> None:
        self.watch.lost_at = time.monotonic()
        if self.hosting is not None:
            self.hosting.contend()

    def unreachable_level(self, client: Client, seconds: float) -> int:
        return self.watch.unreachable_level(seconds)


class EmbeddedClient(Client):
    """A :class:`Client` that may also host the broker. Build it with :func:`join`.

    Extra attributes: ``workers`` (the expected worker count, or None), ``is_broker``,
    ``generation`` (of the broker it is connected to), ``broker_moves``, ``lost``,
    ``welcomed_at``, ``lost_at``.
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
        if "hooks" in client_options:
            raise TypeError("an embedded client brings its own hooks")
        self.watch = BrokerWatch()
        self.sequencer = Sequencer(worker_id, self.watch.lifecycle)
        hooks = _Embedding(self.sequencer, self.watch)
        # An edge: a transport name ("http" by default, as join's) becomes an object here.
        super().__init__(address, worker_id=worker_id, hooks=hooks, **with_transport(client_options))
        #: The election and the broker while this worker hosts it. The cluster bridge
        #: (docs/cluster.md) runs with the broker, so it moves with it on failover.
        self.hosting = Hosting(
            address,
            worker_id=worker_id,
            workers=workers,
            max_worker_id=max_worker_id,
            transport=self.transport,
            profile=self.profile,
            mode=mode,
            broker_options=broker_options,
            bridge_url=bridge,
            node=node,
            cluster=cluster,
        )
        hooks.hosting = self.hosting
        self.workers = workers
        self.max_worker_id = max_worker_id
        self.mode = mode
        self.bridge_url = bridge
        self.node = node
        self.cluster = cluster
        self._election: AsyncExitStack | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> EmbeddedClient:
        stack = AsyncExitStack()
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        try:
            # The first election round before the client starts: a worker that wins it
            # connects to its own broker at the first attempt.
            await tg.start(self.hosting.run)
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
            await self.hosting.drain()
        finally:
            if stack is not None:
                await stack.aclose()
        return None

    # --- introspection -------------------------------------------------------------------

    @property
    def is_broker(self) -> bool:
        """True while this process hosts the broker."""
        return self.hosting.broker is not None

    @property
    def lost(self) -> int:
        """Events found missing through sequence gaps (not counting reported drops)."""
        return self.sequencer.lost

    @property
    def generation(self) -> int | None:
        """The generation of the broker this worker is (or was last) connected to."""
        return self.watch.generation

    @property
    def broker_moves(self) -> int:
        """How many times the broker this worker is connected to changed."""
        return self.watch.broker_moves

    @property
    def welcomed_at(self) -> float | None:
        """``time.monotonic()`` when the latest ``welcome`` was read, or None."""
        return self.watch.welcomed_at

    @property
    def lost_at(self) -> float | None:
        """``time.monotonic()`` when the latest connection to a broker ended, or None."""
        return self.watch.lost_at

    def broker_statistics(self) -> BrokerStatistics | None:
        """The hosted broker's statistics, or None when another worker hosts it."""
        broker = self.hosting.broker
        return None if broker is None else broker.statistics()


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
