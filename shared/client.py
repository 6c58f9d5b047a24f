"""The worker side of the bus: connect, publish, subscribe (lua-resty-events' worker.lua).

One :class:`Client` per process. It keeps three independent tasks:

- the connection task: connects (with jittered, bounded backoff), sends the hello, then
  runs a reader (frames → decoded events → dispatcher) and a writer (publish buffer →
  socket, everything buffered since the last write coalesced into one ``send``);
- the dispatcher task (:mod:`shared.dispatch`): runs handlers one event at a time, and
  keeps running while the broker is unreachable;
- nothing else: publishing is a synchronous append plus a wake-up.

Publishes made while disconnected wait in a bounded buffer and go out in order after the
next hello. A batch whose write failed is put back at the front of the buffer, so it is
sent again on the next connection (it may then arrive twice if the failed write had
partly gone through; it is never silently lost).
"""

from __future__ import annotations

import logging
import operator
import os
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream

from .dispatch import Dispatcher, Fields, Handler
from .errors import HandshakeError, PublishBufferFull, RemoteProtocolError, UpgradeRejected
from .frame import frame_header
from .logutil import LogLimiter
from .messages import (
    Event,
    Target,
    TargetKind,
    build_publish_frame,
    decode_event_batch,
    encode_hello,
    parse_target,
)
from .profile import Profile, get_profile
from .router import DEFAULT_MAX_QUEUE_LEN
from .stream import FrameStream
from .transport import Transport, get_transport, parse_address

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RECONNECT_MAX",
    "DEFAULT_RECONNECT_MIN",
    "Client",
    "ClientStatistics",
]

logger = logging.getLogger(__name__)

#: Seconds for one connect plus handshake; lua-resty-events' socket timeout.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: First reconnect delay; lua-resty-events waits a random 10–50 ms between attempts.
DEFAULT_RECONNECT_MIN = 0.01
#: Ceiling of the exponential backoff, so a worker finds a new broker within half a second.
DEFAULT_RECONNECT_MAX = 0.5
#: Seconds ``aclose`` waits for buffered publishes to go out.
_CLOSE_FLUSH_TIMEOUT = 2.0
_LIFECYCLE_SOURCE = "workerbus"
#: Looking up an Enum member on its class runs Python code (~65 ns); publish() runs often.
_CURRENT = TargetKind.CURRENT
_first = operator.itemgetter(0)
#: Deliveries decoded at a time before other tasks get a turn (see _read_loop).
_DECODE_CHUNK = 256
#: A connection that the broker ends sooner than this after the hello counts as refused.
_SHORT_SESSION = 0.5
#: Seconds between two "cannot reach the broker" warnings of one client.
_RECONNECT_LOG_INTERVAL = 30.0


def _why_unreachable(exc: BaseException) -> str:
    """One line, never empty, for a failed connect or connection start."""
    if isinstance(exc, UpgradeRejected) and exc.status_code == 503:
        # Our broker's body says "broker full: max_connections=N reached, ..." itself.
        text = exc.body.decode("utf-8", "replace").strip()
        if not text.startswith("broker full"):
            text = "broker full" + (f" ({text})" if text else "")
        return f"{text} (HTTP 503)"
    if isinstance(exc, TimeoutError):
        return "no answer within the connect timeout"
    if isinstance(exc, (anyio.EndOfStream, anyio.BrokenResourceError)):
        # A full broker (stream transport), or one that does not trust this uid, closes
        # without a word; so does a broker that was just killed.
        return "the broker closed the connection during its start (full, or this uid not trusted? its log says)"
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    worker_id: int
    connected: bool
    #: publishes accepted into the buffer (not counting ``current``)
    published: int
    #: publishes written to the broker connection
    sent: int
    #: events handed to handlers (remote and ``current``)
    delivered: int
    #: events lost on this side: publish buffer full, inbox full, iterator buffer full
    dropped: int
    #: events the broker reported it had to drop for this worker
    dropped_by_broker: int
    undecodable: int
    handler_errors: int
    connects: int
    reconnects: int
    buffered: int
    inbox: int


class Client:
    """A worker's connection to the bus. Use as an async context manager.

    Args:
        address: ``unix:/path/to/bus.sock``.
        transport: ``"http"`` (default), ``"stream"``, or a :class:`Transport`.
        profile: ``"native"`` (default) or ``"kong"``.
        worker_id: the id announced in the hello; ``-1`` for an auxiliary process.
        pid: announced in the hello; defaults to this process's pid.
        max_payload_len: largest encoded publish message; larger ones are refused before
            anything is sent. Defaults to the profile's (65535 native, 65536 kong).
        max_buffer_len: publishes held while disconnected (and in flight).
        max_queue_len: received events waiting for handlers.
    """

    def __init__(
        self,
        address: str,
        *,
        transport: str | Transport = "http",
        profile: str | Profile = "native",
        worker_id: int = -1,
        pid: int | None = None,
        max_payload_len: int | None = None,
        max_buffer_len: int = DEFAULT_MAX_QUEUE_LEN,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_min: float = DEFAULT_RECONNECT_MIN,
        reconnect_max: float = DEFAULT_RECONNECT_MAX,
    ) -> None:
        self.address = address
        self._path = parse_address(address)
        self.transport = get_transport(transport)
        self.profile = get_profile(profile)
        if not isinstance(worker_id, int) or isinstance(worker_id, bool):
            raise TypeError("worker_id must be an int")
        self.worker_id = worker_id
        self.pid = os.getpid() if pid is None else pid
        limit = self.profile.max_frame_len
        if max_payload_len is None:
            max_payload_len = min(self.profile.default_max_payload_len, limit)
        if not 1 <= max_payload_len <= limit:
            raise ValueError(f"max_payload_len must be within 1..{limit}")
        if max_buffer_len < 1:
            raise ValueError("max_buffer_len must be at least 1")
        if not 0 < reconnect_min <= reconnect_max:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        self.max_payload_len = max_payload_len
        self.max_buffer_len = max_buffer_len
        self.connect_timeout = connect_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._dispatcher = Dispatcher(max_queue_len)
        self._hello = self._frame(encode_hello(self.profile, worker_id, self.pid))
        self._buffer: deque[bytes] = deque()
        self._writer_wakeup: anyio.Event | None = None
        self._in_flight = 0
        # Created in __aenter__ (an anyio.Event needs a running event loop):
        self._progress: anyio.Event  # set (and replaced) whenever the buffer shrinks
        self._ready: anyio.Event  # set while connected
        self._connected = False
        self._exit_stack: AsyncExitStack | None = None
        self._published = 0
        self._sent = 0
        self._dropped = 0
        self._dropped_by_broker = 0
        self._undecodable = 0
        self._connects = 0
        self._reconnect_log = LogLimiter(logger, burst=1, interval=_RECONNECT_LOG_INTERVAL)

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._exit_stack is not None:
            raise RuntimeError("this client is already running")
        self._progress = anyio.Event()
        self._ready = anyio.Event()
        stack = AsyncExitStack()
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.push_async_callback(self._stop, tg)
        tg.start_soon(self._dispatcher.run)
        tg.start_soon(self._connection_loop)
        self._exit_stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._exit_stack = self._exit_stack, None
        assert stack is not None
        # Close our task group as if the body had succeeded, so an exception from the
        # body propagates as itself instead of wrapped in an ExceptionGroup.
        await stack.aclose()
        return None

    async def _stop(self, tg: anyio.abc.TaskGroup) -> None:
        if self._connected and self._buffer:
            with anyio.move_on_after(_CLOSE_FLUSH_TIMEOUT):
                await self.flush()
        if self._buffer:
            logger.warning("closing with %d publishes never sent", len(self._buffer))
        tg.cancel_scope.cancel()

    @property
    def is_ready(self) -> bool:
        """True while connected to a broker with the hello sent."""
        return self._connected

    async def wait_ready(self) -> None:
        """Wait until connected to a broker with the hello sent."""
        while not self._connected:
            await self._ready.wait()

    # --- publishing ----------------------------------------------------------------------

    def _frame(self, payload: bytes) -> bytes:
        return frame_header(len(payload), self.profile.header_len) + payload

    def _encode(self, source: str, event: str, data: object, target: Target) -> bytes:
        return build_publish_frame(
            self.profile, self.worker_id, source, event, data, target, self.max_payload_len
        )

    def publish_nowait(
        self, source: str, event: str, data: object = None, target: str | int | Target = "all"
    ) -> None:
        """Publish without waiting.

        ``target``: ``"all"``, ``"current"`` (this process only), ``"others"``, a worker id
        (int or ``"worker:N"``) or ``"unique:KEY"``.

        Raises:
            PayloadTooLarge: the encoded message exceeds ``max_payload_len``.
            LocalProtocolError: ``data`` cannot be encoded.
            anyio.WouldBlock: connected, but the buffer is full (use :meth:`publish`).
            PublishBufferFull: disconnected and the buffer is full; the event is dropped.
        """
        parsed = parse_target(target)
        if parsed.kind is _CURRENT:
            self._dispatcher.push(Event(source, event, data, None))
            return
        frame = self._encode(source, event, data, parsed)
        if len(self._buffer) >= self.max_buffer_len:
            if self._connected:
                raise anyio.WouldBlock
            self._dropped += 1
            raise PublishBufferFull(f"publish buffer full ({self.max_buffer_len}) while disconnected")
        self._append(frame)

    async def publish(
        self, source: str, event: str, data: object = None, target: str | int | Target = "all"
    ) -> None:
        """Publish an event; waits only while connected and the buffer is full.

        Same targets and errors as :meth:`publish_nowait`, except that a full buffer while
        connected waits for room instead of raising ``WouldBlock``.
        """
        parsed = parse_target(target)
        if parsed.kind is _CURRENT:
            self._dispatcher.push(Event(source, event, data, None))
            return
        frame = self._encode(source, event, data, parsed)
        while len(self._buffer) >= self.max_buffer_len:
            if not self._connected:
                self._dropped += 1
                raise PublishBufferFull(
                    f"publish buffer full ({self.max_buffer_len}) while disconnected"
                )
            await self._progress.wait()
        # _append, inlined: this is the publisher's per-event path.
        self._buffer.append(frame)
        self._published += 1
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()
            self._writer_wakeup = None

    def _append(self, frame: bytes) -> None:
        self._buffer.append(frame)
        self._published += 1
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()
            self._writer_wakeup = None

    async def flush(self) -> None:
        """Wait until every publish made so far has been written to a broker connection.

        While disconnected this waits for a reconnect; bound it with ``anyio.fail_after``.
        """
        while self._buffer or self._in_flight:
            await self._progress.wait()

    def _made_progress(self) -> None:
        self._progress.set()
        self._progress = anyio.Event()

    # --- subscribing ---------------------------------------------------------------------

    def subscribe(self, source: str, event: str, handler: Handler) -> str:
        """Call ``handler(data, event, source, wid)`` for matching events; returns an id.

        Levels: ``("*", "*")`` (everything), ``(source, "*")``, ``(source, event)``.
        """
        return self._dispatcher.subscribe(source, event, handler)

    def unsubscribe(self, subscription_id: str) -> bool:
        """Remove a subscription; False if the id is unknown."""
        return self._dispatcher.unsubscribe(subscription_id)

    def events(
        self, source: str = "*", event: str = "*", *, max_buffer: int = 1024
    ) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[Event]]:
        """``async with client.events("cache") as events: async for ev in events: ...``

        Events that find the iterator's buffer full are dropped and counted.
        """
        return self._dispatcher.events(source, event, max_buffer=max_buffer)

    # --- the connection ------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.reconnect_max, self.reconnect_min * (2 ** min(failures, 16)))
        return random.uniform(self.reconnect_min, max(self.reconnect_min, ceiling))

    async def _connection_loop(self) -> None:
        failures = 0
        short_sessions = 0
        while True:
            try:
                with anyio.fail_after(self.connect_timeout):
                    stream, initial = await self.transport.connect(self._path)
            except (
                OSError,
                HandshakeError,
                TimeoutError,
                # a broker that dies mid-handshake (e.g. killed during a failover)
                anyio.BrokenResourceError,
                anyio.EndOfStream,
            ) as exc:
                failures += 1
                # At most one line per interval while the broker stays away (it retries
                # every half second); the count of the others comes with the next line.
                self._reconnect_log.log(
                    logging.WARNING,
                    "worker %d cannot reach the broker at %s: %s (attempt %d)",
                    self.worker_id,
                    self.address,
                    _why_unreachable(exc),
                    failures,
                )
                await anyio.sleep(self._backoff(failures))
                continue
            if failures > 1:
                logger.info("worker %d reached the broker after %d failed attempts", self.worker_id, failures)
            failures = 0
            started = anyio.current_time()
            await self._session(stream, initial)
            if anyio.current_time() - started < _SHORT_SESSION:
                # Closed right after the hello, again and again: another process announces
                # the same worker id (each new connection replaces the other), or the broker
                # refuses our id (a real lua-resty-events broker closes unknown ids). Back
                # off like a failed connect, so two such clients do not evict each other in
                # a tight loop, and say so.
                short_sessions += 1
                if short_sessions >= 3:
                    self._reconnect_log.log(
                        logging.WARNING,
                        "worker %d: the broker closed %d connections in a row right after "
                        "the hello; is another process using worker id %d, or does the "
                        "broker refuse it?",
                        self.worker_id,
                        short_sessions,
                        self.worker_id,
                    )
            else:
                short_sessions = 0
            await anyio.sleep(self._backoff(short_sessions))

    async def _session(self, stream: ByteStream, initial: bytes) -> None:
        frames = FrameStream(
            stream, header_len=self.profile.header_len, initial=initial
        )
        async with stream:
            try:
                await frames.send(self._hello)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                logger.info("worker %d: hello failed: %r", self.worker_id, exc)
                return
            self._connects += 1
            self._connected = True
            self._ready.set()
            logger.info("worker %d connected to %s", self.worker_id, self.address)
            try:
                self._session_started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._write_loop, frames, tg.cancel_scope)
                    await self._read_loop(frames)
                    tg.cancel_scope.cancel()
            finally:
                self._connected = False
                self._ready = anyio.Event()
                self._made_progress()  # wake publishers waiting for room: they must re-check
                logger.info("worker %d lost its broker connection", self.worker_id)
                self._session_ended()

    # Extension points for shared.embed (no-ops here). They run in the connection task and
    # must not block: ``_session_started`` right after the hello went out,
    # ``_session_ended`` as soon as the connection is gone.
    def _session_started(self) -> None:
        pass

    def _session_ended(self) -> None:
        pass

    def _decode_batch(self, payloads: list[bytes]) -> tuple[list[Fields], list[RemoteProtocolError]]:
        """Decode one read's deliveries: the valid events in order, one error per bad one.

        A subclass may check deliveries itself and insert events of its own in order
        (shared.embed does, to report events that died with a broker).
        """
        return decode_event_batch(self.profile, payloads)

    async def _read_loop(self, frames: FrameStream) -> None:
        # No Event object per delivery: each read's events go to the dispatcher as
        # (source, event, data, wid) tuples, in one call.
        decode_batch = self._decode_batch
        push_many = self._dispatcher.push_many
        try:
            while True:
                payloads = await frames.receive()
                for start in range(0, len(payloads), _DECODE_CHUNK):
                    if start:
                        # One read can hold thousands of events: let the handlers and the
                        # rest of the process run between chunks. Shielded, so a cancelled
                        # connection still hands over every event it had read.
                        with anyio.CancelScope(shield=True):
                            await anyio.lowlevel.checkpoint()
                    batch, errors = decode_batch(payloads[start : start + _DECODE_CHUNK])
                    for exc in errors:
                        # Another publisher's bad event: skip it, keep the connection.
                        self._undecodable += 1
                        logger.error("worker %d: undecodable event skipped: %s", self.worker_id, exc)
                    if _LIFECYCLE_SOURCE in map(_first, batch):  # (rare: scanned in C first)
                        for source, event, data, _ in batch:
                            if source == _LIFECYCLE_SOURCE and event == "dropped":
                                self._note_broker_drops(data)
                    push_many(batch)
        except anyio.EndOfStream:
            pass
        except RemoteProtocolError as exc:
            logger.error("worker %d: broker broke the protocol: %s", self.worker_id, exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            logger.info("worker %d: read failed: %r", self.worker_id, exc)

    def _note_broker_drops(self, data: Any) -> None:
        count = data.get("count") if isinstance(data, dict) else None
        if isinstance(count, (int, float)):
            self._dropped_by_broker += int(count)
            logger.warning("worker %d: the broker dropped %d events for us", self.worker_id, count)

    async def _write_loop(self, frames: FrameStream, scope: anyio.CancelScope) -> None:
        buffer = self._buffer
        while True:
            if not buffer:
                self._writer_wakeup = wakeup = anyio.Event()
                await wakeup.wait()
                continue
            batch = list(buffer)
            buffer.clear()
            self._in_flight = len(batch)
            try:
                await frames.send(b"".join(batch))
            except BaseException as exc:
                buffer.extendleft(reversed(batch))
                if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
                    logger.info("worker %d: write failed: %r", self.worker_id, exc)
                    scope.cancel()
                    return
                raise
            finally:
                self._in_flight = 0
            self._sent += len(batch)
            self._made_progress()

    # --- introspection -------------------------------------------------------------------

    def statistics(self) -> ClientStatistics:
        d = self._dispatcher
        return ClientStatistics(
            worker_id=self.worker_id,
            connected=self._connected,
            published=self._published,
            sent=self._sent,
            delivered=d.delivered,
            dropped=self._dropped + d.dropped,
            dropped_by_broker=self._dropped_by_broker,
            undecodable=self._undecodable,
            handler_errors=d.handler_errors,
            connects=self._connects,
            reconnects=max(0, self._connects - 1),
            buffered=len(self._buffer),
            inbox=d.depth,
        )


@asynccontextmanager
async def connect(address: str, **options: Any) -> AsyncIterator[Client]:
    """``async with connect("unix:/run/bus.sock", worker_id=0) as bus: ...``"""
    async with Client(address, **options) as client:
        yield client
