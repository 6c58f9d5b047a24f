"""The broker: accepts worker connections and fans publishes out (docs/protocol.md §5).

Per connection it runs one reader (frames → router) and one writer (worker queue → socket,
every frame queued since the last write coalesced into one ``send``); a connection whose
writer is idle is written to by the task that routed its frames (see "direct writes"). It knows nothing of
HTTP: the transport's ``accept`` does the connection start and returns the bytes read past
it. Bad input from a peer closes that one connection with a logged reason; the broker and
every other connection carry on.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, SocketListener, TaskStatus

from .bridge import Bridge, BridgeStatistics
from .errors import HandshakeError, RemoteProtocolError
from .frame import encode_frame
from .listener import ACCEPT_RETRY, SocketFile, accept_forever, open_unix_listener
from .logutil import LogLimiter
from .memtrim import reclaim_memory
from .messages import (
    ALL,
    CAP_BARRIER,
    CAP_CLUSTER,
    CAP_FILTER,
    CAP_UNFRAMED,
    CAP_WELCOME,
    PROTOCOL_VERSION,
    RunKeys,
    Target,
    Welcome,
    decode_hello,
    decode_ping,
    decode_publish_batch,
    decode_sub,
    encode_event,
    encode_pong,
    encode_welcome,
    usual_ping,
)
from .peercred import PEERCRED_SUPPORTED, PeerCredentials, default_trusted_uids, peer_credentials
from .profile import Profile, get_profile
from .router import (
    DEFAULT_BROADCAST_GRACE,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_DEPARTED_QUEUES,
    DEFAULT_MAX_QUEUE_LEN,
    DEFAULT_MAX_UNIQUE_KEYS,
    DEFAULT_QUEUE_GRACE,
    DEFAULT_UNIQUE_TIMEOUT,
    OverflowPolicy,
    Router,
    RouterStatistics,
    WorkerQueue,
)
from .sockets import guard
from .stream import FrameStream
from .transport import Transport, get_transport, parse_address

__all__ = [
    "DEFAULT_FRAME_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "LIFECYCLE_SOURCE",
    "Broker",
    "BrokerStatistics",
    "WorkerStatistics",
]

logger = logging.getLogger(__name__)

#: Seconds a new peer has to finish its connection start and send its hello. Same as the
#: 5 s socket timeout of lua-resty-events.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: Seconds a peer has to finish a frame once its first byte arrived. A worker writes whole
#: frames, so a frame that stalls means a stopped or dead process, or an attack holding
#: broker memory (up to max_payload_len per connection). Checked once a second.
DEFAULT_FRAME_TIMEOUT = 10.0
#: Connections served at once; one more is refused on accept (503 on http, a close on
#: stream: docs/protocol.md §2). Generous for one server's workers, small enough that a
#: connection storm cannot exhaust file descriptors.
DEFAULT_MAX_CONNECTIONS = 1024
#: The reserved event source of messages the bus itself generates (e.g. "dropped").
LIFECYCLE_SOURCE = "workerbus"
#: Connections ended since the last heap trim that make the next housekeeping tick trim
#: (any retired queue does too): a storm's buffers and queues are then handed back to the
#: kernel instead of staying resident (shared/memtrim.py says why that is needed).
_TRIM_AFTER_CLOSES = 64
#: A routing task writes to an idle writer's connection itself only if nothing was written
#: to it for this long (seconds); otherwise the writer task batches (Broker._claim). Short
#: enough for a worker's bursts at up to ~4 000 a second, long enough to tell the reads of
#: one busy turn of the event loop apart from separate bursts.
DIRECT_WRITE_QUIET = 0.00025
#: Broker.route_waiting routes the host's writes at once only while no worker's queue
#: holds this many frames not yet written (nor a direct write's rest): beyond it, that
#: worker reads slower than the host publishes, and the host must feel it.
_WAITING_BACKLOG = 1024
_monotonic = time.monotonic
#: The capabilities this broker grants when a native hello asks for them (protocol.md §8).
SUPPORTED_CAPS = frozenset({CAP_WELCOME, CAP_BARRIER, CAP_CLUSTER, CAP_FILTER, CAP_UNFRAMED})


def _is_default_id(worker_id: int, pid: int) -> bool:
    """Whether ``worker_id`` is the default id a client of process ``pid`` takes,
    ``-(pid * 100 + k)`` with ``0 <= k < 100`` (shared.client.default_worker_id)."""
    return pid > 0 and worker_id < 0 and -worker_id // 100 == pid


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("workerbus")
    except (ImportError, PackageNotFoundError):  # run from a checkout, not installed
        return "unknown"


#: How this broker names itself in the welcome.
BROKER_NAME = f"workerbus {_version()}"


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    """One connected worker, as its hello introduced it (for ``workerbus top``)."""

    worker_id: int
    #: the pid the worker sent in its hello
    pid: int
    #: the peer's uid from ``SO_PEERCRED`` (None where the platform cannot tell)
    uid: int | None


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    #: worker connections past their hello, now
    connections: int
    #: connections that completed the hello
    accepted: int
    #: connections closed before or at the hello, for any reason (the next four and more)
    refused: int
    protocol_errors: int
    router: RouterStatistics
    #: of ``refused``: peers whose uid is not trusted (SO_PEERCRED)
    refused_untrusted: int = 0
    #: of ``refused``: connections over ``max_connections``
    refused_over_limit: int = 0
    #: of ``refused``: peers that missed the handshake deadline (e.g. slowloris)
    handshake_timeouts: int = 0
    #: connections open now, including those still in their handshake
    open_connections: int = 0
    #: ids ``0..N-1`` whose queues the broker keeps whether or not they are connected
    expected_workers: int = 0
    #: the broker's own process id
    pid: int = 0
    #: the workers connected now, by id
    workers: tuple[WorkerStatistics, ...] = ()
    #: the cluster bridge's, when the broker has one (docs/cluster.md)
    bridge: BridgeStatistics | None = None

    #: connections closed because a frame was not completed within ``frame_timeout``
    frame_timeouts: int = 0
    #: accepts that failed for want of a file descriptor (``EMFILE``) or kernel memory; the
    #: peer waits in the listen backlog and the accept is retried
    accept_failures: int = 0


class _Connection:
    __slots__ = (
        "caps",
        "claim",
        "control",
        "cut",
        "frames",
        "idle",
        "last_write",
        "parked",
        "pending",
        "pid",
        "pid_confirmed",
        "queue",
        "scope",
        "timed_out",
        "uid",
        "worker_id",
    )

    def __init__(
        self, worker_id: int, pid: int, frames: FrameStream, queue: WorkerQueue, uid: int | None
    ):
        self.worker_id = worker_id
        self.pid = pid
        self.pid_confirmed = False
        self.frames = frames
        self.queue = queue
        self.uid = uid
        self.scope: anyio.CancelScope | None = None
        #: Closed by the disconnect overflow policy: the batch in flight is dropped.
        self.cut = False
        #: Closed for not finishing a frame in time (already counted and logged).
        self.timed_out = False
        #: The capabilities granted to this connection (empty for a plain hello).
        self.caps: frozenset[str] = frozenset()
        #: Framed control frames (welcome, pongs) the writer sends before its next batch.
        #: Per connection, outside the worker's queue: never dropped by overflow, never
        #: counted as deliveries, never kept for a later connection.
        self.control: list[bytes] = []
        #: Set while the writer task waits for work (see Broker._write): setting it wakes
        #: the writer.
        self.idle: anyio.Event | None = None
        #: The idle writer's ``queue.wakeup`` (Broker._claim for this connection), made once
        #: so that the writer can tell whether it is still armed.
        self.claim: Callable[[], None] | None = None
        #: A batch that Broker._write_now could not write whole: (the bytes left, its
        #: events, the drops its notice reported), for the writer task to finish.
        self.pending: tuple[bytes, list[bytes], int] | None = None
        #: When (time.monotonic) bytes were last handed to this connection's socket.
        self.last_write = 0.0
        #: The read task waits for bytes, everything before them routed (route_waiting).
        self.parked = False

    def send_control(self, frame: bytes) -> None:
        self.control.append(frame)
        if self.queue.wakeup is not None:  # the writer is idle: wake it
            self.queue.wakeup()
            self.queue.wakeup = None

    def __str__(self) -> str:
        return f"worker {self.worker_id} (pid {self.pid})"


def _peer(creds: PeerCredentials | None) -> str:
    # Before the hello only the kernel knows who the peer is.
    return "a peer" if creds is None else f"a peer ({creds})"


class Broker:
    """One broker's state and its connection handlers.

    Args:
        transport: a :class:`Transport` (``httpbus.TRANSPORT``, ``streambus.TRANSPORT``),
            or the name of one whose package is imported (``"http"``, ``"stream"``).
            Required: the core has no default transport (docs/architecture.md).
        profile: ``"native"`` or ``"kong"``.
        expected_workers: pre-create (and keep forever) queues for ids ``0..N-1``.
        max_queue_len: frames held per worker id.
        max_payload_len: largest frame payload accepted from a peer; defaults to what the
            profile's frame header can express.
        unique_timeout: seconds a unique key suppresses repeats.
        queue_grace: seconds the queue of a departed, unexpected id is kept.
        broadcast_grace: seconds such a queue keeps taking broadcasts; after that what it
            misses is only counted (and reported if the worker comes back).
        max_departed_queues: queues of departed, unexpected ids kept at once (the oldest
            departure is retired first).
        handshake_timeout: seconds for connection start plus hello.
        frame_timeout: seconds a connection has to complete a frame it has begun to send.
        max_connections: connections served at once.
        overflow: what a full worker queue does.
        allowed_uids: uids whose connections are served (checked with ``SO_PEERCRED``);
            None means the broker's own uid and root.
        max_batch_bytes: bytes a writer takes from a queue per ``send``.
        lifecycle_events: also deliver the bus's own events under :data:`LIFECYCLE_SOURCE`:
            ``welcome`` (first frame of every connection, to that worker only), ``joined``
            and ``left`` (to every worker). Off by default: a plain broker delivers only
            what was published (plus ``dropped`` notices). The embedded broker turns it on.
            (Not to be confused with the *welcome control frame* of the negotiated native
            extensions, docs/protocol.md §8: a native hello that asks for ``"welcome"`` gets
            that one first, whatever this setting; plain hellos never do.)
        bridge: a cluster :class:`Bridge` (``shared.bridges.make_bridge``): publishes with
            cluster scope also reach the other nodes, and theirs reach this one's workers.
        clock: monotonic seconds, for every timer of the broker (unique timeout, queue
            and broadcast grace, frame deadline), so tests can move time instead of
            waiting for it. None keeps the defaults: :func:`time.monotonic` for the router,
            :func:`anyio.current_time` for the frame deadline.
    """

    def __init__(
        self,
        *,
        transport: str | Transport | None = None,
        profile: str | Profile = "native",
        expected_workers: int = 0,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        max_payload_len: int | None = None,
        unique_timeout: float = DEFAULT_UNIQUE_TIMEOUT,
        queue_grace: float = DEFAULT_QUEUE_GRACE,
        broadcast_grace: float = DEFAULT_BROADCAST_GRACE,
        max_departed_queues: int = DEFAULT_MAX_DEPARTED_QUEUES,
        max_unique_keys: int = DEFAULT_MAX_UNIQUE_KEYS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        overflow: OverflowPolicy = OverflowPolicy.DROP_NEWEST,
        allowed_uids: Iterable[int] | None = None,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        lifecycle_events: bool = False,
        bridge: Bridge | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.transport = get_transport(transport)
        self.profile = get_profile(profile)
        # (cuts the frame header off a queued delivery for a connection granted "unframed")
        self._unframe = operator.itemgetter(slice(self.profile.header_len, None))
        limit = self.profile.max_frame_len
        if max_payload_len is None:
            max_payload_len = limit
        if not 1 <= max_payload_len <= limit:
            raise ValueError(f"max_payload_len must be within 1..{limit}")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be greater than 0")
        if frame_timeout <= 0:
            raise ValueError("frame_timeout must be greater than 0")
        self.frame_timeout = frame_timeout
        self.max_payload_len = max_payload_len
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.allowed_uids = (
            default_trusted_uids() if allowed_uids is None else frozenset(allowed_uids)
        )
        if max_batch_bytes < 1:
            raise ValueError("max_batch_bytes must be at least 1")
        self.max_batch_bytes = max_batch_bytes
        self.router = Router(
            max_queue_len=max_queue_len,
            unique_timeout=unique_timeout,
            expected_workers=expected_workers,
            queue_grace=queue_grace,
            broadcast_grace=broadcast_grace,
            max_departed_queues=max_departed_queues,
            max_unique_keys=max_unique_keys,
            overflow=overflow,
            clock=time.monotonic if clock is None else clock,
        )
        self._clock: Callable[[], float] = anyio.current_time if clock is None else clock
        self.expected_workers = expected_workers
        self._connections: dict[int, _Connection] = {}
        #: Departed default ids (docs/protocol.md §7) and the pid they embed, until the
        #: process has ended (then the queue is released) or the id is back.
        self._default_departed: dict[int, int] = {}
        #: True while a task routes synchronously and flushes afterwards (Broker._routing):
        #: an idle writer's connection that gets frames meanwhile is written to at the end
        #: of that routing, by the routing task itself, instead of waking its writer task.
        self._direct = False
        #: Connections claimed that way, to write to when the routing ends.
        self._ready: list[_Connection] = []
        #: While _routed writes: the last unframed batch joined, (its frames, its bytes).
        #: A burst routed to every worker is the same frames for each connection: joined
        #: once, not once per connection.
        self._joined: tuple[list[bytes], bytes] | None = None
        self._in_routed = False
        #: Seconds a connection must have been quiet for a routing task to write to it
        #: directly (see _claim); 0 writes directly whenever the writer is idle.
        self.direct_write_quiet = DIRECT_WRITE_QUIET
        self._open = 0
        self._accepted = 0
        self._refused = 0
        self._protocol_errors = 0
        self._untrusted = 0
        self._over_limit = 0
        self._handshake_timeouts = 0
        self._frame_timeouts = 0
        self._accept_failures = 0
        #: Connections ended and queues retired since the last heap trim.
        self._released = 0
        #: Peer-triggered warnings go through this, so a storm cannot flood the log.
        self.log_limiter = LogLimiter(logger)
        self.on_ready: Callable[[str], None] | None = None
        #: A takeover (:meth:`await_reconnects`): the ids whose hellos routing waits for,
        #: for at most ``_hold_timeout`` seconds after listening; the lifecycle events
        #: held meanwhile go out together when it ends.
        self._awaited: set[int] = set()
        self._hold_timeout = 0.0
        self._hold: anyio.Event | None = None
        self._held_lifecycle: list[bytes] = []
        self.lifecycle_events = lifecycle_events
        #: Who this broker is, sent in every ``welcome``; an embedding adds its own keys
        #: (e.g. ``generation`` and the hosting ``worker_id``).
        self.identity: dict[str, object] = {"pid": os.getpid()}
        #: Re-create the socket file when it is deleted under the running broker. An
        #: embedding that removes it on purpose (an orderly stop) turns this off first.
        self.keep_socket_file = True
        self.bridge = bridge
        if bridge is not None:
            bridge.attach(self)

    # --- serving -------------------------------------------------------------------------

    async def serve(
        self,
        address: str,
        *,
        mode: int = 0o600,
        group: str | int | None = None,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``address`` (``unix:/path``) and serve until cancelled.

        The socket file gets ``mode`` and, if given, ``group`` (a name or a gid). Reports
        readiness through ``task_status`` (for ``TaskGroup.start``). If the socket file is
        deleted while serving, it is re-created (checked once a second). On the way out
        it is removed only if it is still this broker's own.

        Raises:
            AddressInUse: a live broker already listens on the path.
            OSError: the path exists and is not a socket (e.g. a planted symlink).
        """
        path = parse_address(address)
        listener = await open_unix_listener(path, mode=mode, group=group)
        place = SocketFile(path, mode, group)
        async with listener:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._housekeeping, place, tg)
                    if self.bridge is not None:
                        # The engine connects in the background: the local bus never waits.
                        await tg.start(self.bridge.run)
                    logger.info(
                        "workerbus broker ready on %s (transport=%s, profile=%s, pid=%d)",
                        address,
                        self.transport.name,
                        self.profile.name,
                        os.getpid(),
                    )
                    if not PEERCRED_SUPPORTED:
                        logger.warning("no SO_PEERCRED here: peers are checked by file mode only")
                    if self._awaited:
                        self._hold = anyio.Event()
                        tg.start_soon(self._end_hold_after, self._hold_timeout)
                    task_status.started(address)
                    await self._accept(listener, tg)
            finally:
                place.remove_own()

    def await_reconnects(self, worker_ids: Iterable[int], timeout: float) -> None:
        """Before :meth:`serve`: these workers are about to reconnect at once (they were
        connected to a broker that died); hold routing until each has said hello, for at
        most ``timeout`` seconds after listening.

        Meanwhile the broker does the handshakes and welcomes only, and the ``joined`` /
        ``left`` events wait to go out together. In a takeover every survivor reconnects
        within milliseconds and re-sends what it buffered; routing that while the others
        still wait for their welcome spent the new host's CPU on sends that each woke a
        survivor, which then took the CPU from the host (docs/benchmarks.md, failover).
        Nothing is dropped or reordered: publishes wait in the sockets, lifecycle events
        in order, and ``joined`` still precedes the joiner's first event everywhere.
        """
        self._awaited = set(worker_ids)
        self._hold_timeout = timeout

    async def _end_hold_after(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        if self._hold is not None:
            logger.info(
                "routing resumes after %ss without the hellos of workers %s",
                seconds,
                ",".join(map(str, sorted(self._awaited))),
            )
            self._end_hold()

    def _end_hold(self) -> None:
        hold, self._hold = self._hold, None
        self._awaited.clear()
        if self._held_lifecycle:
            self.inject_many(ALL, self._held_lifecycle)  # one run: one send per worker
            self._held_lifecycle.clear()
        if hold is not None:
            hold.set()

    async def _housekeeping(self, place: SocketFile, tg: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.sleep(1.0)
            self.tick()
            await self._check_socket_file(place, tg)

    def tick(self) -> None:
        """The broker's timed upkeep, run once a second while serving: queues past their
        grace expire, peers stuck inside a frame past ``frame_timeout`` are closed, memory
        is trimmed, suppressed log lines are summed up. A test that moves an injected
        ``clock`` calls it to see the effect at once."""
        for wid in self.router.expire():
            logger.info("queue of worker %d expired after its grace period", wid)
            self._released += _TRIM_AFTER_CLOSES
        self._release_ended_processes()
        self._drop_stalled_frames()
        if self._released >= _TRIM_AFTER_CLOSES:
            self._released = 0
            reclaim_memory()
        self.log_limiter.flush()

    def _release_ended_processes(self) -> None:
        # A default id (docs/protocol.md §7) embeds its process's pid: once that process
        # has ended, nobody can come back for its queue (a `workerbus publish`, a tail, a
        # script's client). Retire it now, or every broadcast of the queue grace would be
        # counted as dropped for a worker that no longer exists.
        for wid, pid in list(self._default_departed.items()):
            if not self.router.is_departed(wid):
                del self._default_departed[wid]  # back, or retired meanwhile
            elif not _process_exists(pid):
                del self._default_departed[wid]
                self.router.release(wid)
                logger.info("queue of worker %d released: its process %d has ended", wid, pid)

    def _drop_stalled_frames(self) -> None:
        # A peer inside a frame holds up to max_payload_len bytes of broker memory until it
        # finishes; one that stops there is closed. (The hello is covered by the handshake
        # deadline.) Once a second is precise enough for a deadline of seconds, and costs
        # nothing on the read path.
        limit = self._clock() - self.frame_timeout
        for conn in list(self._connections.values()):
            started = conn.frames.frame_started
            if started is None or started > limit or conn.timed_out:
                continue
            conn.timed_out = True
            self._frame_timeouts += 1
            self.log_limiter.log(
                logging.WARNING,
                "closing %s: a frame was not completed within frame_timeout=%ss "
                "(%d of %d bytes arrived)",
                conn,
                self.frame_timeout,
                conn.frames.buffered,
                conn.frames.frame_size,
            )
            self._hang_up(conn)

    async def _check_socket_file(self, place: SocketFile, tg: anyio.abc.TaskGroup) -> None:
        if not self.keep_socket_file:
            return
        listener = await place.check(len(self._connections), self.log_limiter)
        if listener is not None:
            tg.start_soon(self._serve_listener, listener, tg)

    async def _serve_listener(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        async with listener:
            await self._accept(listener, tg)

    async def _accept(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        await accept_forever(listener, self.handle, tg, self._cannot_accept)

    def _cannot_accept(self, exc: OSError) -> None:
        # Out of file descriptors: the peer waits in the listen backlog (its connect has
        # succeeded) and is accepted once a connection closes; nothing is lost meanwhile.
        self._accept_failures += 1
        self.log_limiter.log(
            logging.WARNING,
            "cannot accept a connection: %s (with %d open; raise the open-file limit, "
            "ulimit -n, or lower max_connections); retrying every %ss",
            exc.strerror or exc,
            self._open,
            ACCEPT_RETRY,
        )

    async def handle(self, stream: ByteStream) -> None:
        """Serve one accepted connection until it ends. Never raises for peer faults."""
        stream = await guard(stream)
        async with stream:
            creds = peer_credentials(stream)
            if self._open >= self.max_connections:
                self._refused += 1
                self._over_limit += 1
                self.log_limiter.log(
                    logging.WARNING,
                    "refusing %s: broker full (max_connections=%d reached)",
                    _peer(creds),
                    self.max_connections,
                )
                await self._refuse(
                    stream, 503, f"broker full: max_connections={self.max_connections} reached, try again later"
                )
                return
            if creds is not None and creds.uid not in self.allowed_uids:
                self._refused += 1
                self._untrusted += 1
                self.log_limiter.log(
                    logging.WARNING,
                    "refusing %s: uid %d is not trusted (trusted uids: %s; see --allow-uid)",
                    _peer(creds),
                    creds.uid,
                    ",".join(map(str, sorted(self.allowed_uids))),
                )
                await self._refuse(stream, 403, f"uid {creds.uid} is not trusted by this broker")
                return
            self._open += 1
            try:
                await self._serve_peer(stream, creds)
            except Exception:
                logger.exception("internal error while serving %s; dropping it", _peer(creds))
            finally:
                self._open -= 1
                self._released += 1

    async def _refuse(self, stream: ByteStream, status: int, text: str) -> None:
        # Say why, where the transport can (http: a status and a line of text), without
        # reading anything from the peer; the caller then closes.
        refuse = getattr(self.transport, "refuse", None)  # optional (shared/transport.py)
        if refuse is None:
            return
        with anyio.move_on_after(self.handshake_timeout):
            try:
                await refuse(stream, status, text)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async def _serve_peer(self, stream: ByteStream, creds: PeerCredentials | None) -> None:
        profile = self.profile
        try:
            with anyio.fail_after(self.handshake_timeout):
                initial = await self.transport.accept(stream)
                frames = FrameStream(
                    stream,
                    header_len=profile.header_len,
                    max_frame_len=self.max_payload_len,
                    initial=initial,
                    clock=self._clock,
                )
                first = await frames.receive()
            hello = decode_hello(profile, first[0])
        except TimeoutError:
            self._refused += 1
            self._handshake_timeouts += 1
            self.log_limiter.log(
                logging.WARNING,
                "dropping %s: no handshake and hello within %ss",
                _peer(creds),
                self.handshake_timeout,
            )
            return
        except (HandshakeError, RemoteProtocolError) as exc:
            self._refused += 1
            self.log_limiter.log(
                logging.WARNING, "dropping %s before its hello: %s", _peer(creds), exc
            )
            return
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            self._refused += 1
            logger.info("%s left before its hello: %r", _peer(creds), exc)
            return
        self._accepted += 1
        conn = self._register(hello.worker_id, hello.pid, frames, creds)
        if hello.caps:
            conn.caps = hello.caps & SUPPORTED_CAPS
            if CAP_WELCOME not in conn.caps:
                # A client learns what was granted from the welcome: without one it
                # could not know its deliveries come unframed.
                conn.caps -= {CAP_UNFRAMED}
            if CAP_WELCOME in conn.caps:
                conn.control.append(self._welcome_frame(conn))
        if self._hold is not None:
            self._awaited.discard(hello.worker_id)
            if not self._awaited:
                self._end_hold()
        try:
            async with anyio.create_task_group() as tg:
                conn.scope = tg.cancel_scope
                tg.start_soon(self._write_loop, conn)
                await self._read_loop(conn, first[1:])
                tg.cancel_scope.cancel()
        finally:
            self._unregister(conn)

    def _register(
        self, worker_id: int, pid: int, frames: FrameStream, creds: PeerCredentials | None
    ) -> _Connection:
        old = self._connections.get(worker_id)
        if old is not None:
            self.log_limiter.log(
                logging.WARNING, "worker %d (pid %d) replaces the connection of %s", worker_id, pid, old
            )
            self._hang_up(old)
        uid = None if creds is None else creds.uid
        conn = _Connection(worker_id, pid, frames, self.router.attach(worker_id), uid)
        # (the kernel confirms the hello's pid: a pid from another pid namespace must not
        # be looked up in ours, see _release_ended_processes)
        conn.pid_confirmed = creds is not None and creds.pid == pid
        if self.router.overflow is OverflowPolicy.DISCONNECT:
            conn.queue.on_overflow = lambda: self._cut(conn)
        self._connections[worker_id] = conn
        if self.lifecycle_events and (old is None or old.pid != pid):
            # A quick reconnect of the same process is not news; a new process is.
            if old is not None:
                self._announce("left", old)
            self._announce("joined", conn)
        if creds is not None and creds.pid != pid:
            # e.g. a pid namespace, or a process that connects on behalf of another
            logger.info("%s connected (kernel reports pid %d)", conn, creds.pid)
        else:
            logger.info("%s connected", conn)
        return conn

    def _cut(self, conn: _Connection) -> None:
        self.log_limiter.log(
            logging.WARNING,
            "closing %s: its queue overflowed (max_queue_len=%d, overflow=disconnect); "
            "%d undelivered events dropped so far",
            conn,
            self.router.max_queue_len,
            conn.queue.dropped_unreported,
        )
        conn.cut = True
        self._hang_up(conn)  # the blocked write then fails, and its batch is dropped

    @staticmethod
    def _hang_up(conn: _Connection) -> None:
        # Shut the socket down rather than cancel the connection's tasks: its reader ends
        # on EOF by itself, its writer's send fails, and the peer sees the close at once.
        # (Cancelling would be safe too since shared/sockets.py, but less direct.)
        try:
            sock = conn.frames.stream.extra(anyio.abc.SocketAttribute.raw_socket)
            sock.shutdown(socket.SHUT_RDWR)
        except (anyio.TypedAttributeLookupError, OSError):
            if conn.scope is not None:
                conn.scope.cancel()

    def _unregister(self, conn: _Connection) -> None:
        if self._connections.get(conn.worker_id) is conn:
            del self._connections[conn.worker_id]
            if conn.pid_confirmed and _is_default_id(conn.worker_id, conn.pid):
                self._default_departed[conn.worker_id] = conn.pid
            for wid in self.router.detach(conn.queue):
                self._released += _TRIM_AFTER_CLOSES
                logger.info(
                    "queue of worker %d retired early: more than max_departed_queues=%d "
                    "departed ids",
                    wid,
                    self.router.max_departed_queues,
                )
            if self.lifecycle_events:
                self._announce("left", conn)
        logger.info("%s disconnected", conn)

    async def _read_loop(self, conn: _Connection, frames: list[bytes]) -> None:
        route_read = functools.partial(self._route_read, conn)
        # On asyncio's selector loop, a read that arrives while this task waits for it is
        # routed right in the transport's callback (FrameStream.read_inline), by the same
        # _route_read: no task wake-up per read. Not during a takeover's hold, nor once
        # the connection is being cancelled: then this task reads as always.
        conn.frames.read_inline(route_read, functools.partial(self._inline_ok, conn))
        try:
            while True:
                if self._hold is not None:
                    await self._hold.wait()  # a takeover: hellos first (await_reconnects)
                route_read(frames)
                conn.parked = True  # (route_waiting may route for it meanwhile)
                try:
                    frames = await conn.frames.receive()
                finally:
                    conn.parked = False
        except anyio.EndOfStream:
            pass
        except RemoteProtocolError as exc:
            if conn.timed_out:
                return  # the frame deadline hung up: counted and logged already
            self._protocol_error(conn, exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            logger.info("connection of %s broke: %r", conn, exc)
        finally:
            conn.frames.read_inline(None, _never)

    def _inline_ok(self, conn: _Connection) -> bool:
        scope = conn.scope
        return self._hold is None and scope is not None and not scope.cancel_called

    def _route_read(self, conn: _Connection, frames: list[bytes]) -> None:
        """Route the frames of one read of ``conn``: the read loop's one step, run by its
        task or by the transport's callback (see _read_loop). A bad frame raises
        RemoteProtocolError after everything before it was routed."""
        profile = self.profile
        caps = conn.caps
        barrier = CAP_BARRIER in caps
        filtering = CAP_FILTER in caps
        keys: list[RunKeys | None] | None = [] if filtering else None
        ping = -1  # the n of a read's last frame, a ping answered once the rest is routed
        # Consecutive publishes with the same target (and, with "filter" granted, the same
        # (src, ev): §8) make a run; the router hands each queue all the runs of one read
        # it takes at once. Idle writers that get frames from this read are written to
        # when it is routed (Broker._routing).
        direct = self._routing()
        try:
            while True:
                if barrier and ping < 0 and frames:
                    # A flushing publisher ends its read with a ping: known by its bytes,
                    # it stays out of the publish decoder (whose error path would find
                    # it); the pong goes after everything before it.
                    ping = usual_ping(profile, frames[-1])
                    if ping >= 0:
                        frames = frames[:-1]
                if frames:
                    if keys is not None:
                        keys.clear()
                    runs, error = decode_publish_batch(profile, frames, keys)
                    if CAP_CLUSTER not in caps:
                        for index, (target, _) in enumerate(runs):
                            if target.cluster:
                                # (what came before it is routed: like any bad frame)
                                self.router.route_runs(conn.worker_id, runs[:index], keys)
                                raise RemoteProtocolError(
                                    "a publish with scope 'cluster' without the 'cluster' capability in the hello"
                                )
                    self.router.route_runs(conn.worker_id, runs, keys)
                    if error is not None:
                        if not barrier and not filtering:
                            raise error
                        # Not a publish: a ping or a sub is the only other thing a granted
                        # client may send. Recognised only here, off the publish fast path.
                        # Everything before it is routed (above), so the pong is the
                        # barrier and a sub applies to what this client publishes after it.
                        done = sum(len(run) for _, run in runs)
                        self._control_from(conn, frames[done], error, barrier, filtering)
                        frames = frames[done + 1 :]
                        if frames:
                            continue
                if ping >= 0:
                    conn.send_control(self._delivery(conn, encode_pong(profile, ping)))
                return
        finally:
            self._routed(direct)

    def _protocol_error(self, conn: _Connection, exc: RemoteProtocolError) -> None:
        self._protocol_errors += 1
        self.log_limiter.log(logging.WARNING, "closing %s: protocol error: %s", conn, exc)

    def route_waiting(self, worker_id: int) -> None:
        """Route now the publishes that worker ``worker_id`` has written, if its read task
        waits for them: for the process hosting this broker, after its own client wrote.

        The host's publisher runs a burst in one turn of the host's loop (its early writes
        put pieces on the socket meanwhile); the read task would route them only after
        that turn and the host's other ready callbacks (docs/benchmarks.md "Embedded seed,
        session 5"). Routed exactly as the read task would (Broker._route_read): whole
        frames only, when nothing is held before them, no takeover holds routing and no
        worker's writes are behind; a partial frame stays in the socket for the read task.
        """
        conn = self._connections.get(worker_id)
        if conn is None or not conn.parked or self._hold is not None or self._direct:
            return
        if conn.scope is None or conn.scope.cancel_called:
            return
        for each in self._connections.values():
            if each.pending is not None or len(each.queue.frames) >= _WAITING_BACKLOG:
                # A worker's writes are behind: leave this to the read task, so that a
                # host publishing faster than the workers read still fills its socket
                # and its buffer, and waits (backpressure, as without this path).
                return
        frames, size = conn.frames.peek()
        if not frames:
            return
        try:
            conn.frames.take(size)
            self._route_read(conn, frames)
        except RemoteProtocolError as exc:
            # what the read task would have done with it: counted, logged, connection ended
            self._protocol_error(conn, exc)
            self._hang_up(conn)
        except (anyio.BrokenResourceError, OSError) as exc:
            logger.info("connection of %s broke: %r", conn, exc)
            self._hang_up(conn)

    def _control_from(
        self, conn: _Connection, payload: bytes, error: RemoteProtocolError, barrier: bool, filtering: bool
    ) -> None:
        # A ping (barrier granted) or a sub (filter granted); anything else raises the
        # publish's own error, as without the extensions.
        profile = self.profile
        if filtering and payload[:5] == b"\x81\xa3sub":
            # (told by its bytes: one key "sub"; then checked in full, limits first)
            try:
                patterns = decode_sub(profile, payload)
            except RemoteProtocolError as exc:
                raise RemoteProtocolError(f"bad sub: {exc}") from None
            self.router.set_filter(conn.queue, patterns)
            return
        if barrier:
            try:
                n = decode_ping(profile, payload)
            except RemoteProtocolError:
                raise error from None
            conn.send_control(self._delivery(conn, encode_pong(profile, n)))
            return
        raise error

    async def _write_loop(self, conn: _Connection) -> None:
        # A failed write means the peer is gone: said once here, and the reader is ended
        # with it. Anything else (a cancel, a bug) propagates.
        try:
            await self._write(conn)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            logger.info("write to %s failed: %r", conn, exc)
            if conn.scope is not None:
                conn.scope.cancel()
        finally:
            if conn.pending is not None:
                # Handed over by _write_now, and the writer ended before it finished it.
                _, events, reported = conn.pending
                conn.pending = None
                self._unsent(conn, events, reported)

    async def _write(self, conn: _Connection) -> None:
        queue = conn.queue
        send = conn.frames.send
        control = conn.control
        claim = conn.claim = functools.partial(self._claim, conn)
        # The welcome lifecycle event (after the welcome control frame, if one was asked
        # for: it goes first) leaves with the first batch, in one send: what was queued for
        # this worker id meanwhile and the lifecycle events of its (re)connect are usually
        # there already. In a takeover every survivor reconnects at once, and each send
        # can wake a survivor that then takes the host's CPU (docs/benchmarks.md).
        head = b"".join(control) + self._welcome(conn) if self.lifecycle_events else b""
        if head:
            control.clear()
        while True:
            if conn.pending is not None:
                # The rest of a batch that _write_now began: it goes before anything else.
                data, events, reported = conn.pending
                conn.pending = None
                await self._send(conn, send, data, events, reported)
                continue
            if not queue.frames:
                if control or head:
                    # Control frames alone (a pong while the queue is empty, the welcome)
                    frames, control[:] = head + b"".join(control), []
                    head = b""
                    await send(frames)
                    conn.last_write = _monotonic()
                    continue
                # Idle: whoever gives this queue frames next calls ``claim``, which either
                # wakes this task or (a routing task) writes them itself (_write_now).
                conn.idle = idle = anyio.Event()
                queue.wakeup = claim
                try:
                    await idle.wait()
                finally:
                    conn.idle = None
                    if queue.wakeup is claim:
                        queue.wakeup = None
                continue
            if head:
                control.insert(0, head)
                head = b""
            data, events, reported = self._take(conn)
            await self._send(conn, send, data, events, reported)

    async def _send(
        self,
        conn: _Connection,
        send: Callable[[bytes], Awaitable[None]],
        data: bytes,
        events: list[bytes],
        reported: int,
    ) -> None:
        try:
            await send(data)
        except BaseException:
            # Whatever ended the write (a broken peer, a cancel), the events are not
            # lost silently; the caller deals with the cause.
            self._unsent(conn, events, reported)
            raise
        conn.last_write = _monotonic()
        conn.queue.mark_sent(len(events))

    def _take(self, conn: _Connection) -> tuple[bytes, list[bytes], int]:
        """The next write of a connection whose queue has frames: its control frames, a
        dropped notice if drops are unreported, and a batch of events; returns the bytes,
        the events (in flight until marked sent or put back) and the drops reported."""
        queue = conn.queue
        control = conn.control
        batch = queue.take_batch(self.max_batch_bytes)
        events = len(batch)
        reported = queue.dropped_unreported
        if reported:
            batch.insert(0, self._dropped_notice(conn))
        if control:
            # Before the batch: a pong answers a ping whose earlier publishes are
            # already routed, and it must not wait behind (or be dropped with) events.
            batch[0:0] = control
            control.clear()
        if CAP_UNFRAMED not in conn.caps:
            data = b"".join(batch)
        else:
            # Granted "unframed" (§8): the queue holds frames, shared by every worker's
            # queue; their headers are cut here, in the join (one slice per delivery, in
            # C). The control frames and notices before the events are bare already.
            cut = len(batch) - events
            frames = batch[cut:] if cut else batch
            joined = self._joined
            if joined is not None and joined[0] == frames:
                # (equal frames join to equal bytes; the same objects compare at once)
                unframed = joined[1]
            else:
                unframed = b"".join(map(self._unframe, frames))
                if self._in_routed:
                    self._joined = (frames, unframed)
            data = b"".join(batch[:cut]) + unframed if cut else unframed
        return data, batch[len(batch) - events :], reported

    # --- direct writes -------------------------------------------------------------------
    #
    # A writer task that waits for work costs a hand-over per batch: the routing task wakes
    # it, and the frames leave only on a later turn of the event loop, after everything
    # else that is ready (in an embedded broker: the host's HTTP callbacks). So a task that
    # routes synchronously brackets that with _routing()/_routed(): a connection whose
    # writer was idle (its queue was empty and nothing is being written) and that got
    # frames meanwhile is written to right after the routing, by that task, as far as the
    # socket takes them without waiting. Whatever does not fit, or fails, goes to the
    # writer task, which finishes it first and handles failures as always; under load the
    # writers are busy and batch as before. Order, backpressure and accounting are the
    # writer's own: the same _take, the same mark_sent / _unsent.

    def _routing(self) -> bool:
        was, self._direct = self._direct, True
        return was

    def _routed(self, was: bool) -> None:
        if was:
            return  # (nested: the outer routing writes)
        self._direct = False
        ready = self._ready
        if not ready:
            return
        self._in_routed = True
        try:
            while ready:  # (nothing a write does claims another connection; just in case)
                claimed = ready.copy()
                ready.clear()
                for conn in claimed:
                    self._write_now(conn)
        finally:
            self._in_routed = False
            self._joined = None

    def _claim(self, conn: _Connection) -> None:
        # The idle writer's queue.wakeup: called once (the caller disarms it) when its queue
        # or its control frames get something. A connection written to a moment ago (several
        # publishers' reads in one busy turn of the loop, small events from many workers)
        # is left to its writer task, which then sends everything routed meanwhile at once.
        scope = conn.scope
        if (
            self._direct
            and conn.idle is not None
            and scope is not None
            and not scope.cancel_called
            and _monotonic() - conn.last_write >= self.direct_write_quiet
        ):
            self._ready.append(conn)
        elif conn.idle is not None:
            conn.idle.set()

    def _write_now(self, conn: _Connection) -> None:
        idle = conn.idle
        if idle is None:
            return  # the writer ended meanwhile: the frames wait in the queue
        queue = conn.queue
        if queue.frames:
            data, events, reported = self._take(conn)
        elif conn.control:
            # control frames alone (a pong while the queue is empty)
            data, events, reported = b"".join(conn.control), [], 0
            conn.control.clear()
        else:
            queue.wakeup = conn.claim  # nothing after all: still idle
            return
        try:
            written = conn.frames.send_nowait(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            written = 0  # the writer tries again and deals with the failure as always
        if written == len(data):
            conn.last_write = _monotonic()
            queue.mark_sent(len(events))
            if queue.frames or conn.control:
                idle.set()  # more than one batch's worth: the writer goes on
            else:
                queue.wakeup = conn.claim
            return
        conn.pending = (data[written:], events, reported)
        idle.set()

    @staticmethod
    def _unsent(conn: _Connection, events: list[bytes], reported: int) -> None:
        queue = conn.queue
        if conn.cut:
            # The disconnect policy cut this connection off: its batch is dropped, counted.
            queue.discard(events)
        else:
            # Kept for the next connection of this worker id: a failed write must not lose
            # events (lua-resty-events' push_front, 0.3.0).
            queue.put_back(events)
        # The dropped notice in the batch did not get through: report the count again.
        queue.dropped_unreported += reported

    def _dropped_notice(self, conn: _Connection) -> bytes:
        # Tell the worker how many events it missed; counted once, reported once.
        queue = conn.queue
        count, queue.dropped_unreported = queue.dropped_unreported, 0
        inner = encode_event(
            self.profile,
            LIFECYCLE_SOURCE,
            "dropped",
            {"count": count, "total": queue.dropped},
            None,
        )
        self.log_limiter.log(
            logging.WARNING, "%s missed %d events (total %d)", conn, count, queue.dropped
        )
        return self._delivery(conn, inner)

    def _frame(self, payload: bytes) -> bytes:
        return encode_frame(payload, self.profile.header_len)

    def _delivery(self, conn: _Connection, payload: bytes) -> bytes:
        # What the broker itself writes after the welcome (pongs, notices, lifecycle
        # events): bare for a connection granted "unframed", framed otherwise.
        return payload if CAP_UNFRAMED in conn.caps else self._frame(payload)

    def _welcome_frame(self, conn: _Connection) -> bytes:
        # The native handshake's answer (protocol.md §8), not the lifecycle event below.
        welcome = Welcome(
            version=PROTOCOL_VERSION,
            broker=BROKER_NAME,
            profile=self.profile.name,
            worker_id=conn.worker_id,
            caps=conn.caps,
            max_payload_len=self.max_payload_len,
            max_queue_len=self.router.max_queue_len,
            unique_timeout=self.router.unique_timeout,
        )
        return self._frame(encode_welcome(self.profile, welcome))

    def _lifecycle_event(self, event: str, data: dict[str, object]) -> bytes:
        return encode_event(self.profile, LIFECYCLE_SOURCE, event, data, None)

    def _welcome(self, conn: _Connection) -> bytes:
        # Sent before any queued frame, so the worker knows which broker (and which
        # generation of an embedded broker) the events that follow come from.
        inner = self._lifecycle_event(
            "welcome",
            {"worker_id": conn.worker_id, "broker": dict(self.identity), "workers": sorted(self._connections)},
        )
        return self._delivery(conn, inner)

    def _announce(self, event: str, conn: _Connection) -> None:
        inner = self._lifecycle_event(event, {"worker_id": conn.worker_id, "pid": conn.pid})
        if self._hold is not None:
            self._held_lifecycle.append(inner)  # in order, out with the hold's end
            return
        self.inject(ALL, inner)

    # --- bridge seam & introspection -----------------------------------------------------

    def hang_up_all(self) -> int:
        """Shut every worker connection down (each reader then ends on EOF); returns how
        many. For a graceful stop: hang up, wait for ``connections`` to reach 0, cancel."""
        conns = list(self._connections.values())
        for conn in conns:
            self._hang_up(conn)
        return len(conns)

    def inject(self, target: Target, event_bytes: bytes) -> int:
        """Route an already encoded event that came from outside this broker."""
        direct = self._routing()
        try:
            return self.router.route(None, target, self._frame(event_bytes))
        finally:
            self._routed(direct)

    def inject_many(self, target: Target, events: Sequence[bytes]) -> int:
        """:meth:`inject` for a run of events with one target, in order (each queue takes
        the whole run at once, as for a read's worth of publishes)."""
        frame = self._frame
        direct = self._routing()
        try:
            return self.router.route_many(None, target, [frame(e) for e in events])
        finally:
            self._routed(direct)

    def statistics(self) -> BrokerStatistics:
        return BrokerStatistics(
            connections=len(self._connections),
            accepted=self._accepted,
            refused=self._refused,
            protocol_errors=self._protocol_errors,
            router=self.router.statistics(),
            refused_untrusted=self._untrusted,
            refused_over_limit=self._over_limit,
            handshake_timeouts=self._handshake_timeouts,
            open_connections=self._open,
            expected_workers=self.expected_workers,
            pid=os.getpid(),
            workers=tuple(
                WorkerStatistics(c.worker_id, c.pid, c.uid)
                for c in sorted(self._connections.values(), key=_by_worker_id)
            ),
            bridge=None if self.bridge is None else self.bridge.statistics(),
            frame_timeouts=self._frame_timeouts,
            accept_failures=self._accept_failures,
        )


def _never() -> bool:
    return False


def _by_worker_id(conn: _Connection) -> int:
    return conn.worker_id
