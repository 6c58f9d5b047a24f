"""The broker: accepts worker connections and fans publishes out (docs/protocol.md §5).

Per connection it runs one reader (frames → router) and one writer (worker queue → socket,
every frame queued since the last write coalesced into one ``send``). It knows nothing of
HTTP: the transport's ``accept`` does the connection start and returns the bytes read past
it. Bad input from a peer closes that one connection with a logged reason; the broker and
every other connection carry on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream, TaskStatus

from .errors import HandshakeError, RemoteProtocolError
from .frame import frame_header
from .messages import Target, decode_hello, decode_publish, encode_event
from .profile import Profile, get_profile
from .router import (
    DEFAULT_MAX_QUEUE_LEN,
    DEFAULT_MAX_UNIQUE_KEYS,
    DEFAULT_QUEUE_GRACE,
    DEFAULT_UNIQUE_TIMEOUT,
    OverflowPolicy,
    Router,
    RouterStatistics,
    WorkerQueue,
)
from .stream import FrameStream
from .transport import Transport, get_transport, open_unix_listener, parse_address

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "LIFECYCLE_SOURCE",
    "Broker",
    "BrokerStatistics",
]

logger = logging.getLogger(__name__)

#: Seconds a new peer has to finish its connection start and send its hello. Same as the
#: 5 s socket timeout of lua-resty-events.
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
#: Connections served at once; one more is closed on accept. Generous for one server's
#: workers, small enough that a connection storm cannot exhaust file descriptors.
DEFAULT_MAX_CONNECTIONS = 1024
#: The reserved event source of messages the bus itself generates (e.g. "dropped").
LIFECYCLE_SOURCE = "workerbus"


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    connections: int
    accepted: int
    refused: int
    protocol_errors: int
    router: RouterStatistics


class _Connection:
    __slots__ = ("frames", "pid", "queue", "scope", "worker_id")

    def __init__(self, worker_id: int, pid: int, frames: FrameStream, queue: WorkerQueue):
        self.worker_id = worker_id
        self.pid = pid
        self.frames = frames
        self.queue = queue
        self.scope: anyio.CancelScope | None = None

    def __str__(self) -> str:
        return f"worker {self.worker_id} (pid {self.pid})"


class Broker:
    """One broker's state and its connection handlers.

    Args:
        transport: ``"http"``, ``"stream"`` or a :class:`Transport`.
        profile: ``"native"`` or ``"kong"``.
        expected_workers: pre-create (and keep forever) queues for ids ``0..N-1``.
        max_queue_len: frames held per worker id.
        max_payload_len: largest frame payload accepted from a peer; defaults to what the
            profile's frame header can express.
        unique_timeout: seconds a unique key suppresses repeats.
        queue_grace: seconds the queue of a departed, unexpected id is kept.
        handshake_timeout: seconds for connection start plus hello.
        max_connections: connections served at once.
        overflow: what a full worker queue does.
    """

    def __init__(
        self,
        *,
        transport: str | Transport = "http",
        profile: str | Profile = "native",
        expected_workers: int = 0,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        max_payload_len: int | None = None,
        unique_timeout: float = DEFAULT_UNIQUE_TIMEOUT,
        queue_grace: float = DEFAULT_QUEUE_GRACE,
        max_unique_keys: int = DEFAULT_MAX_UNIQUE_KEYS,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        overflow: OverflowPolicy = OverflowPolicy.DROP_NEWEST,
    ) -> None:
        self.transport = get_transport(transport)
        self.profile = get_profile(profile)
        limit = self.profile.max_frame_len
        if max_payload_len is None:
            max_payload_len = limit
        if not 1 <= max_payload_len <= limit:
            raise ValueError(f"max_payload_len must be within 1..{limit}")
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be greater than 0")
        self.max_payload_len = max_payload_len
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.router = Router(
            max_queue_len=max_queue_len,
            unique_timeout=unique_timeout,
            expected_workers=expected_workers,
            queue_grace=queue_grace,
            max_unique_keys=max_unique_keys,
            overflow=overflow,
        )
        self._connections: dict[int, _Connection] = {}
        self._open = 0
        self._accepted = 0
        self._refused = 0
        self._protocol_errors = 0
        self.on_ready: Callable[[str], None] | None = None

    # --- serving -------------------------------------------------------------------------

    async def serve(
        self,
        address: str,
        *,
        mode: int = 0o600,
        task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``address`` (``unix:/path``) and serve until cancelled.

        Reports readiness through ``task_status`` (for ``TaskGroup.start``). The socket file
        is removed on the way out, unless another broker has replaced it.

        Raises:
            AddressInUse: a live broker already listens on the path.
        """
        path = parse_address(address)
        listener = await open_unix_listener(path, mode=mode)
        inode = os.stat(path).st_ino
        try:
            async with listener, anyio.create_task_group() as tg:
                tg.start_soon(self._expire_loop)
                logger.info(
                    "workerbus broker ready on %s (transport=%s, profile=%s, pid=%d)",
                    address,
                    self.transport.name,
                    self.profile.name,
                    os.getpid(),
                )
                task_status.started(address)
                await listener.serve(self.handle, task_group=tg)
        finally:
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass

    async def _expire_loop(self) -> None:
        while True:
            await anyio.sleep(1.0)
            for wid in self.router.expire():
                logger.info("queue of worker %d expired after its grace period", wid)

    async def handle(self, stream: ByteStream) -> None:
        """Serve one accepted connection until it ends. Never raises for peer faults."""
        async with stream:
            if self._open >= self.max_connections:
                self._refused += 1
                logger.warning("refusing a connection: max_connections=%d reached", self._open)
                return
            self._open += 1
            try:
                await self._serve_peer(stream)
            except Exception:  # noqa: BLE001 - last line of defence: a bug stays per-peer
                logger.exception("internal error while serving a connection; dropping it")
            finally:
                self._open -= 1

    async def _serve_peer(self, stream: ByteStream) -> None:
        profile = self.profile
        try:
            with anyio.fail_after(self.handshake_timeout):
                initial = await self.transport.accept(stream)
                frames = FrameStream(
                    stream,
                    header_len=profile.header_len,
                    max_frame_len=self.max_payload_len,
                    initial=initial,
                )
                first = await frames.receive()
            hello = decode_hello(profile, first[0])
        except TimeoutError:
            self._refused += 1
            logger.warning("dropping a peer: no handshake and hello within %ss", self.handshake_timeout)
            return
        except (HandshakeError, RemoteProtocolError) as exc:
            self._refused += 1
            logger.warning("dropping a peer before its hello: %s", exc)
            return
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            self._refused += 1
            logger.info("peer left before its hello: %r", exc)
            return
        self._accepted += 1
        conn = self._register(hello.worker_id, hello.pid, frames)
        try:
            async with anyio.create_task_group() as tg:
                conn.scope = tg.cancel_scope
                tg.start_soon(self._write_loop, conn)
                await self._read_loop(conn, first[1:])
                tg.cancel_scope.cancel()
        finally:
            self._unregister(conn)

    def _register(self, worker_id: int, pid: int, frames: FrameStream) -> _Connection:
        old = self._connections.get(worker_id)
        if old is not None:
            logger.warning("%s replaces the connection of %s", f"pid {pid}", old)
            if old.scope is not None:
                old.scope.cancel()
        conn = _Connection(worker_id, pid, frames, self.router.attach(worker_id))
        self._connections[worker_id] = conn
        logger.info("%s connected", conn)
        return conn

    def _unregister(self, conn: _Connection) -> None:
        if self._connections.get(conn.worker_id) is conn:
            del self._connections[conn.worker_id]
            self.router.detach(conn.queue)
        logger.info("%s disconnected", conn)

    async def _read_loop(self, conn: _Connection, frames: list[bytes]) -> None:
        profile = self.profile
        header_len = profile.header_len
        route = self.router.route
        wid = conn.worker_id
        try:
            while True:
                for payload in frames:
                    target, data = decode_publish(profile, payload)
                    route(wid, target, frame_header(len(data), header_len) + data)
                frames = await conn.frames.receive()
        except anyio.EndOfStream:
            pass
        except RemoteProtocolError as exc:
            self._protocol_errors += 1
            logger.warning("closing %s: protocol error: %s", conn, exc)
        except (anyio.BrokenResourceError, OSError) as exc:
            logger.info("connection of %s broke: %r", conn, exc)

    async def _write_loop(self, conn: _Connection) -> None:
        queue = conn.queue
        send = conn.frames.send
        while True:
            if not queue.frames:
                wakeup = anyio.Event()
                queue.wakeup = wakeup.set
                await wakeup.wait()
                continue
            batch = queue.take_all()
            events = len(batch)
            if queue.dropped_unreported:
                batch.insert(0, self._dropped_notice(queue))
            try:
                await send(b"".join(batch))
            except BaseException as exc:
                # Retain the batch for the next connection of this worker id; a failed
                # write must not lose events (lua-resty-events' push_front, 0.3.0).
                queue.put_back(batch[len(batch) - events :])
                if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
                    logger.info("write to %s failed: %r", conn, exc)
                    if conn.scope is not None:
                        conn.scope.cancel()
                    return
                raise
            queue.sent += events

    def _dropped_notice(self, queue: WorkerQueue) -> bytes:
        # Tell the worker how many events it missed; counted once, reported once.
        count, queue.dropped_unreported = queue.dropped_unreported, 0
        inner = encode_event(
            self.profile,
            LIFECYCLE_SOURCE,
            "dropped",
            {"count": count, "total": queue.dropped},
            None,
        )
        logger.warning("worker %d missed %d events (queue full)", queue.worker_id, count)
        return frame_header(len(inner), self.profile.header_len) + inner

    # --- bridge seam & introspection -----------------------------------------------------

    def inject(self, target: Target, event_bytes: bytes) -> int:
        """Route an already encoded event that came from outside this broker."""
        frame = frame_header(len(event_bytes), self.profile.header_len) + event_bytes
        return self.router.route(None, target, frame)

    def statistics(self) -> BrokerStatistics:
        return BrokerStatistics(
            connections=len(self._connections),
            accepted=self._accepted,
            refused=self._refused,
            protocol_errors=self._protocol_errors,
            router=self.router.statistics(),
        )
