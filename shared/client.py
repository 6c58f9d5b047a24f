"""The worker side of the bus: connect, publish, subscribe (lua-resty-events' worker.lua).

One :class:`Client` per process. It keeps three independent tasks:

- the connection task: connects (with jittered, bounded backoff), sends the hello, then
  runs a reader (frames → decoded events → dispatcher) and a writer (publish buffer →
  socket, everything buffered since the last write coalesced into one ``send``);
- the dispatcher task (:mod:`shared.dispatch`): runs handlers one event at a time, and
  keeps running while the broker is unreachable (while it is idle, the reader runs the
  synchronous handlers of a read itself: ``Dispatcher.take``);
- nothing else: publishing is a synchronous append plus a wake-up.

Publishes made while disconnected wait in a bounded buffer and go out in order after the
next hello. A batch whose write failed is put back at the front of the buffer, so it is
sent again on the next connection (it may then arrive twice if the failed write had
partly gone through; it is never silently lost).

Native clients negotiate the welcome and the barrier (docs/protocol.md §8): the session
starts only once the broker's welcome arrived, and events written are kept until a pong
confirms the broker routed them; those still unconfirmed when a connection dies are re-sent
on the next one (at-least-once) and counted in ``statistics().unconfirmed``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import ByteStream
from anyio.streams.memory import MemoryObjectReceiveStream

from .dispatch import Dispatcher, Fields, Handler
from .errors import (
    BarrierBroken,
    BusError,
    HandshakeError,
    NoWelcome,
    PublishBufferFull,
    RemoteProtocolError,
    ScopeNotGranted,
    UpgradeRejected,
)
from .frame import encode_frame
from .logutil import LogLimiter
from .messages import (
    CAP_BARRIER,
    CAP_CLUSTER,
    CAP_FILTER,
    CAP_UNFRAMED,
    CAP_WELCOME,
    ControlFrame,
    Event,
    PublishEncoder,
    Target,
    TargetKind,
    Welcome,
    build_publish_frame,
    decode_event_batch,
    decode_event_objects,
    decode_publish,
    decode_welcome,
    encode_hello,
    encode_ping,
    encode_sub,
    parse_target,
    publish_encoder,
)
from .profile import Profile, get_profile
from .router import DEFAULT_MAX_QUEUE_LEN
from .stream import FrameStream, ObjectStream
from .transport import Transport, get_transport, parse_address

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RECONNECT_MAX",
    "DEFAULT_RECONNECT_MIN",
    "Client",
    "ClientHooks",
    "ClientStatistics",
    "default_worker_id",
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
#: Closing politely (half-close, then read until the broker's end of stream): at most
#: this long, and at most this many events read and discarded meanwhile; then we close
#: anyway (the broker may then see a reset, as from a crashed client).
_CLOSE_DRAIN_TIMEOUT = 1.0
_CLOSE_DRAIN_MAX_EVENTS = 100_000
_LIFECYCLE_SOURCE = "workerbus"
#: Looking up an Enum member on its class runs Python code (~65 ns); publish() runs often.
_CURRENT = TargetKind.CURRENT
_first = operator.itemgetter(0)
#: Deliveries decoded at a time before other tasks get a turn (see _read_loop).
_DECODE_CHUNK = 256
#: Publishes buffered at which a publish writes them itself when the writer is idle
#: (Client._write_now): a burst published in one turn of the loop leaves in pieces while
#: it is encoded, not all after its last publish (docs/benchmarks.md, "Seed event delay,
#: session 4": 128 took 2-4 ms off the seed's own-broker delay p50, flood unchanged).
_EARLY_WRITE = 128
#: A connection that the broker ends sooner than this after the hello counts as refused.
_SHORT_SESSION = 0.5
#: Seconds between two "cannot reach the broker" warnings of one client.
_RECONNECT_LOG_INTERVAL = 30.0
#: A welcome is small; a reply announcing more than this is not one.
_MAX_WELCOME_LEN = 4096
#: Default clients of this process so far (see default_worker_id).
_default_ids = itertools.count()


def _why_no_upgrade(exc: BaseException) -> str:
    """What a failed HTTP upgrade says about the peer, for an http-transport client."""
    if isinstance(exc, UpgradeRejected):
        if exc.status_code == 400 and b"stream socket" in exc.body:
            # (what a stream-transport broker answers an HTTP request, docs/protocol.md §2)
            return "it is a stream-transport broker (it answered our HTTP upgrade with 400); use transport 'stream'"
        if exc.status_code == 431:
            return (f"the broker refused our request head as too large ({exc}); its "
                    "--max-header-bytes is set too low")
        return (f"it answered our HTTP upgrade with {exc}: an HTTP server, but not a workerbus "
                "bus socket (a broker's --stats-listen socket, say)")
    how = "no answer" if isinstance(exc, TimeoutError) else f"the upgrade failed ({exc})"
    return (f"{how} to our HTTP upgrade; is it a stream-transport broker (use transport "
            "'stream'), or not a workerbus broker?")


def default_worker_id(pid: int | None = None) -> int:
    """The worker id of a native client created without one: ``-(pid * 100 + k)``, ``k`` the
    count (0..99, then round again) of default clients created in this process so far. Two
    processes, or two default clients of one process, never share it; it stays clear of
    ``0..N-1`` (the ids of numbered workers) and of ``-1``/``-2`` (kong's and older
    tools' auxiliary ids)."""
    k = next(_default_ids) % 100
    return -((os.getpid() if pid is None else pid) * 100 + k)


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
    #: publishes refused on this side (publish buffer full while disconnected); received
    #: events are never dropped here: a full inbox stops reading (backpressure)
    dropped: int
    #: events the broker reported it had to drop for this worker
    dropped_by_broker: int
    undecodable: int
    handler_errors: int
    connects: int
    reconnects: int
    buffered: int
    inbox: int
    #: events written to a connection that ended before the broker confirmed them (native
    #: barrier): re-sent on the next connection, so up to this many may have arrived twice
    unconfirmed: int = 0


class ClientHooks:
    """The public seam for what a layer above adds to a :class:`Client`: ``Client(hooks=...)``.

    Subclass it and override what you need; the defaults are what a plain client does.
    :mod:`shared.embed` composes its pieces (sequence numbers and gap checks, the broker
    watch, the election) through it. Every method runs inside the client's own code paths,
    the decoders and the encoder on the per-event paths: they must be quick, and none may block or await.
    """

    def encode_publish(
        self, client: Client, source: str, event: str, data: object, target: Target
    ) -> bytes:
        """The frame of one publish (``current`` excepted: never encoded).

        Called only once the publish has room in the buffer, and the frame goes into the
        buffer right after with nothing in between: frames are buffered (and sent) in the
        order of these calls, and a publish that gets here is never refused afterwards.
        Raise (e.g. :class:`PayloadTooLarge`) to refuse it. (A client whose hooks keep
        this default calls an equivalent :func:`~shared.messages.publish_encoder` instead.)
        """
        return build_publish_frame(
            client.profile,
            client.worker_id,
            source,
            event,
            data,
            target,
            client.max_payload_len,
            client._filtering,
        )

    def decode_batch(
        self, client: Client, payloads: list[bytes]
    ) -> tuple[list[Fields], list[RemoteProtocolError]]:
        """Decode one read's deliveries: the valid events in order, one error per bad one.

        An override may check deliveries and insert events of its own in order (embed:
        ``lost`` right before the event that revealed the gap). A control frame (a pong)
        must come back as its :class:`~shared.messages.ControlFrame` error.
        """
        return decode_event_batch(client.profile, payloads)

    def decode_objects(
        self, client: Client, objects: list[object]
    ) -> tuple[list[Fields], list[RemoteProtocolError]]:
        """:meth:`decode_batch` for a session granted ``unframed`` (docs/protocol.md §8):
        the deliveries of one read, already unpacked. A client asks for ``unframed`` only
        if its hooks keep the default :meth:`decode_batch` or override this one too (a
        layer that checks deliveries in :meth:`decode_batch` then gets what it expects).
        """
        return decode_event_objects(objects)

    def session_started(self, client: Client) -> None:
        """Connected: the hello went out and (native) the welcome came back. May publish."""

    def wrote(self, client: Client) -> None:
        """A write of buffered publishes went onto the socket whole, right now (embed: the
        host's broker routes them at once). Not called for a plain client's hooks."""

    def session_ended(self, client: Client) -> None:
        """The connection is gone (the client reconnects on its own)."""

    def unreachable_level(self, client: Client, seconds: float) -> int:
        """Log level of "cannot reach the broker" after ``seconds`` of failed attempts:
        something is wrong, unless the layer above knows better (embed: a host that is
        starting or stopping on purpose)."""
        return logging.WARNING


_PLAIN = ClientHooks()


def _decodes_objects(hooks: ClientHooks) -> bool:
    # Hooks that decode payloads their own way (embed: sequence checks) get frames,
    # unless they decode objects their own way too.
    def own(name: str) -> bool:
        return getattr(getattr(hooks, name), "__func__", None) is not getattr(ClientHooks, name)

    return own("decode_objects") or not own("decode_batch")


def _unkeyed(profile: Profile, frame: bytes) -> bytes:
    # A publish frame without its src/ev (a broker that did not grant the filter).
    header = profile.header_len
    msg = profile.codec.loads(frame[header:])
    if isinstance(msg, dict) and "src" in msg:
        msg.pop("src", None)
        msg.pop("ev", None)
        return encode_frame(profile.codec.dumps(msg), header)
    return frame


class Client:
    """A worker's connection to the bus. Use as an async context manager.

    Args:
        address: ``unix:/path/to/bus.sock``.
        transport: a :class:`Transport` (``httpbus.TRANSPORT``, ``streambus.TRANSPORT``),
            or the name of one whose package is imported (``"http"``, ``"stream"``).
            Required: the core has no default transport (docs/architecture.md).
        profile: ``"native"`` (default) or ``"kong"``.
        worker_id: the id announced in the hello. Default: native, one derived from the pid
            (:func:`default_worker_id`), so default clients never replace each other; kong,
            ``-1`` (what lua-resty-events' auxiliary processes use).
        pid: announced in the hello; defaults to this process's pid.
        max_payload_len: largest encoded publish message; larger ones are refused before
            anything is sent. Defaults to the profile's (65535 native, 65536 kong); a native
            client lowers it to the broker's limit from the welcome.
        connect_timeout: seconds for one connect plus handshake (welcome included); a
            native client that gets no welcome within it fails :meth:`wait_ready` with
            :class:`~shared.errors.NoWelcome`.
        max_buffer_len: publishes held while disconnected (and in flight).
        max_queue_len: received events waiting for handlers. When it is full the client
            stops reading from the broker until the handlers catch up (backpressure): the
            backlog waits in the broker's bounded queue, whose overflow policy applies
            and which tells this client what it dropped (``dropped_by_broker``).
        hooks: what a layer above adds (:class:`ClientHooks`); default: a plain client.
        filtered: native: ask the broker to send only the events this client's handlers
            and iterators take (capability ``filter``, docs/protocol.md §8); handlers see
            the same events either way. False: receive everything, as before.
        unframed: native: ask the broker to write deliveries as bare MessagePack objects
            (capability ``unframed``, docs/protocol.md §8), read with one Unpacker per
            connection: less CPU per event; handlers see the same events either way.
            False: length-prefixed frames, as before.

    Attributes:
        welcome: the broker's welcome of the current or last session (its version, limits,
            the id it registered, the capabilities granted); None before the first one, and
            always in the kong profile.
        last_error: why the last connection attempt failed; None once one succeeded.
    """

    def __init__(
        self,
        address: str,
        *,
        transport: str | Transport | None = None,
        profile: str | Profile = "native",
        worker_id: int | None = None,
        pid: int | None = None,
        max_payload_len: int | None = None,
        max_buffer_len: int = DEFAULT_MAX_QUEUE_LEN,
        max_queue_len: int = DEFAULT_MAX_QUEUE_LEN,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_min: float = DEFAULT_RECONNECT_MIN,
        reconnect_max: float = DEFAULT_RECONNECT_MAX,
        hooks: ClientHooks | None = None,
        filtered: bool = True,
        unframed: bool = True,
    ) -> None:
        self.address = address
        self.hooks = _PLAIN if hooks is None else hooks
        # (a plain client pays nothing per write for the hook)
        self._wrote: Callable[[Client], None] | None = (
            None if type(self.hooks).wrote is ClientHooks.wrote else self.hooks.wrote
        )
        # Bound once: these two run per event.
        self._encode_publish = self.hooks.encode_publish
        # The default encoder is build_publish_frame; when the hooks keep it, publishes
        # go through a publish_encoder of this client's settings instead (the same bytes
        # and errors, less work per publish), made anew whenever a setting changes.
        self._plain_encoder = getattr(self._encode_publish, "__func__", None) is ClientHooks.encode_publish
        self._decode_batch = self.hooks.decode_batch
        self._decode_objects = self.hooks.decode_objects
        #: The decoder of the current session's reads (payloads, or objects if unframed).
        self._decode_reads: Callable[[Client, list[Any]], tuple[list[Fields], list[RemoteProtocolError]]]
        self._decode_reads = self._decode_batch
        self._path = parse_address(address)
        self.transport = get_transport(transport)
        self.profile = get_profile(profile)
        #: The native extensions asked for in the hello (none in the kong profile).
        caps: tuple[str, ...] = (CAP_WELCOME, CAP_BARRIER, CAP_CLUSTER)
        if filtered:
            caps += (CAP_FILTER,)
        if unframed and _decodes_objects(self.hooks):
            caps += (CAP_UNFRAMED,)
        self._caps: tuple[str, ...] = caps if self.profile.extended_targets else ()
        #: Whether the broker's welcome granted the cluster scope (None: no welcome yet).
        self._cluster: bool | None = None
        self.pid = os.getpid() if pid is None else pid
        if worker_id is None:
            worker_id = default_worker_id(self.pid) if self._caps else -1
        if not isinstance(worker_id, int) or isinstance(worker_id, bool):
            raise TypeError("worker_id must be an int")
        self.worker_id = worker_id
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
        self._own_max_payload_len = max_payload_len
        #: The broker's welcome of the current (or last) session; None before the first one
        #: and always in the kong profile.
        self.welcome: Welcome | None = None
        self.max_buffer_len = max_buffer_len
        self.connect_timeout = connect_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self._dispatcher = Dispatcher(max_queue_len)
        self._dispatcher.on_change = self._subscriptions_changed
        self._dispatcher.on_unwanted = self._unwanted_event
        # The filter (docs/protocol.md §8): granted by this session's welcome; publishes
        # then carry src/ev. The broker starts each session sending everything
        # (_sub_sent None); the first event no handler takes makes the client send its
        # pattern set (narrowing is lazy, so "connect, then subscribe" races nothing), and
        # from then on every change is sent before the next batch (one pending at most).
        self._filtering = False
        self._new_encoder()
        self._sub_pending = False
        self._sub_sent: frozenset[tuple[str, str]] | None = None
        self._hello = self._frame(encode_hello(self.profile, worker_id, self.pid, self._caps))
        #: The last connection attempt reached a peer that did not welcome us.
        self._handshake_error: HandshakeError | None = None
        #: Why the last connection attempt failed; None once one succeeded. For diagnostics
        #: (e.g. a command that gives up says why).
        self.last_error: BaseException | None = None
        # The barrier (docs/protocol.md §8), all per session except the counters:
        self._barrier = False  # granted by this session's welcome
        self._ping_seq = 0  # the n of the last ping requested (increasing, never reused)
        self._pong_seen = 0  # the n of the last pong received
        self._pings_pending: list[int] = []  # requested, to go out after the next batch
        self._pings_sent: deque[tuple[int, int]] = deque()  # (n, events written before it)
        self._written = 0  # events written this session
        self._unconfirmed: deque[tuple[int, list[bytes]]] = deque()  # (mark after, batch)
        self._unconfirmed_total = 0
        self._session_no = 0
        self._buffer: deque[bytes] = deque()
        self._writer_wakeup: anyio.Event | None = None
        #: The session's frame stream while its writer runs (flush() writes to it: _write_now).
        self._frames_out: FrameStream | ObjectStream | None = None
        #: True while the writer is in the middle of a write.
        self._writing = False
        #: What _write_now could not write whole: (the bytes left, the publishes in them),
        #: for the writer to finish first.
        self._pending_write: tuple[bytes, list[bytes]] | None = None
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
        #: Everything else that can repeat per event or per connection.
        self._log = LogLimiter(logger)
        #: Set by __aexit__: the session half-closes and the reader discards what comes.
        self._closing = False
        #: Events read while closing (or cut off by the close), never handed to handlers.
        self._discarded = 0
        self._session_over: anyio.Event | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._exit_stack is not None:
            raise RuntimeError("this client is already running")
        self._progress = anyio.Event()
        self._ready = anyio.Event()
        self._pong_event = anyio.Event()
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
        if self._connected and (self._buffer or self._unconfirmed):
            with anyio.move_on_after(_CLOSE_FLUSH_TIMEOUT):
                try:
                    await self.flush()
                except BusError as exc:
                    logger.info("worker %d: final flush failed: %s", self.worker_id, exc)
        unconfirmed = sum(len(batch) for _, batch in self._unconfirmed)
        if self._buffer:
            logger.warning("closing with %d publishes never sent", len(self._buffer))
        if unconfirmed:
            logger.warning(
                "closing with %d publishes written but not confirmed by the broker", unconfirmed
            )
        await self._close_politely()
        unhandled = self._dispatcher.depth
        tg.cancel_scope.cancel()
        if unhandled or self._discarded:
            logger.info(
                "worker %d closed with %d received events not handled (%d in the inbox, "
                "%d read while closing)",
                self.worker_id,
                unhandled + self._discarded,
                unhandled,
                self._discarded,
            )

    async def _close_politely(self) -> None:
        """Half-close and read until the broker closes too, so that it sees a normal end
        of stream rather than a reset (unread data in a closed socket makes the kernel
        send one). Bounded by _CLOSE_DRAIN_TIMEOUT and _CLOSE_DRAIN_MAX_EVENTS."""
        self._closing = True
        over = self._session_over
        if not self._connected or over is None:
            return
        self._dispatcher.wake_waiters()  # a reader waiting for room: discard instead
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()  # the writer half-closes
            self._writer_wakeup = None
        # Shielded (and bounded): a client left by cancellation closes politely too.
        with anyio.move_on_after(_CLOSE_DRAIN_TIMEOUT, shield=True):
            await over.wait()

    @property
    def is_ready(self) -> bool:
        """True while connected to a broker: hello sent and, native, welcome received."""
        return self._connected

    async def wait_ready(self) -> None:
        """Wait until connected to a broker: hello sent and, native, welcome received.

        Raises:
            NoWelcome: the last attempt reached a peer that did not welcome us (the
                message names the likely cause: wrong transport, wrong profile, not a
                workerbus broker). The client keeps retrying in the background.
        """
        while not self._connected:
            if self._handshake_error is not None:
                raise self._handshake_error
            await self._ready.wait()

    # --- publishing ----------------------------------------------------------------------

    def _frame(self, payload: bytes) -> bytes:
        return encode_frame(payload, self.profile.header_len)

    def _encode(self, source: str, event: str, data: object, target: Target) -> bytes:
        return self._encode_publish(self, source, event, data, target)

    def _new_encoder(self) -> None:
        # After a change of what a publish's bytes depend on (max_payload_len, _filtering).
        self._encoder: PublishEncoder
        if self._plain_encoder:
            self._encoder = publish_encoder(self.profile, self.worker_id, self.max_payload_len, self._filtering)
        else:
            self._encoder = functools.partial(self._encode_publish, self)

    def publish_nowait(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        """Publish without waiting.

        ``target``: ``"all"``, ``"current"`` (this process only), ``"others"``, a worker id
        (int or ``"worker:N"``) or ``"unique:KEY"``.

        Raises:
            PayloadTooLarge: the encoded message exceeds ``max_payload_len``.
            LocalProtocolError: ``data`` cannot be encoded.
            anyio.WouldBlock: connected, but the buffer is full (use :meth:`publish`).
            PublishBufferFull: disconnected and the buffer is full; the event is dropped.

        ``scope="cluster"`` (targets all, others, unique:KEY) also reaches the workers of
        the other nodes when the broker has a cluster bridge (docs/cluster.md).
        """
        parsed = target if type(target) is Target else parse_target(target)
        if scope != "local":
            parsed = self._scoped(parsed, scope)
        if parsed.kind is _CURRENT:
            self._dispatcher.push(Event(source, event, data, None))
            return
        if len(self._buffer) >= self.max_buffer_len:
            if self._connected:
                raise anyio.WouldBlock
            self._dropped += 1
            raise PublishBufferFull(f"publish buffer full ({self.max_buffer_len}) while disconnected")
        # Encoded once there is room, and buffered at once (ClientHooks.encode_publish).
        self._append(self._encoder(source, event, data, parsed))

    async def publish(
        self,
        source: str,
        event: str,
        data: object = None,
        target: str | int | Target = "all",
        *,
        scope: str = "local",
    ) -> None:
        """Publish an event; waits only while connected and the buffer is full.

        Same targets and errors as :meth:`publish_nowait`, except that a full buffer while
        connected waits for room instead of raising ``WouldBlock``.
        """
        parsed = target if type(target) is Target else parse_target(target)
        if scope != "local":
            parsed = self._scoped(parsed, scope)
        if parsed.kind is _CURRENT:
            # Never waits for room (a handler publishing to itself would wait for itself,
            # docs/hardening.md); yields, so that a loop of these lets the handlers run.
            self._dispatcher.push(Event(source, event, data, None))
            await anyio.lowlevel.checkpoint()
            return
        buffer = self._buffer
        while len(buffer) >= self.max_buffer_len:
            if not self._connected:
                self._dropped += 1
                raise PublishBufferFull(
                    f"publish buffer full ({self.max_buffer_len}) while disconnected"
                )
            await self._progress.wait()
        # Encoded once there is room, and buffered with no await in between, so frames
        # enter the buffer in the order they were encoded (ClientHooks.encode_publish).
        # (_append, inlined: this is the publisher's per-event path.)
        buffer.append(self._encoder(source, event, data, parsed))
        self._published += 1
        if len(buffer) >= _EARLY_WRITE and self._connected:
            # A burst in one turn: its head leaves now, while the rest is encoded, instead
            # of waiting for the whole burst (docs/benchmarks.md "Seed event delay, session 4").
            if self._write_now():
                return
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()
            self._writer_wakeup = None

    def _scoped(self, target: Target, scope: str) -> Target:
        scoped = target.with_scope(scope)
        if scoped.cluster and self._cluster is False:
            raise ScopeNotGranted(
                f"the broker at {self.address} did not grant the 'cluster' capability (a broker "
                "older than the cluster scope): scope='cluster' refused, nothing was sent"
            )
        return scoped

    def _append(self, frame: bytes) -> None:
        self._buffer.append(frame)
        self._published += 1
        if len(self._buffer) >= _EARLY_WRITE and self._connected and self._write_now():
            return  # (as in publish)
        if self._writer_wakeup is not None:
            self._writer_wakeup.set()
            self._writer_wakeup = None

    async def flush(self) -> None:
        """A barrier: return once the broker has read and routed every publish made so far.

        Native profile: a ping goes out after those publishes and this returns when its pong
        comes back. The kong profile has no barrier: there this returns once they are
        written to the socket (docs/protocol.md §8). While disconnected this waits for a
        reconnect; bound it with ``anyio.fail_after``.

        Raises:
            BarrierBroken: the connection ended before the pong; the unconfirmed events
                are re-sent on the next connection (see ``statistics().unconfirmed``).
            NoWelcome: as :meth:`wait_ready`, while waiting for a connection.
        """
        await self.wait_ready()
        if not self._barrier:
            while self._buffer or self._in_flight:
                await self._progress.wait()
            return
        session = self._session_no
        self._ping_seq += 1
        n = self._ping_seq
        self._pings_pending.append(n)
        if not self._write_now() and self._writer_wakeup is not None:
            self._writer_wakeup.set()
            self._writer_wakeup = None
        while self._pong_seen < n:
            if self._session_no != session:
                raise BarrierBroken(
                    f"worker {self.worker_id}: the broker connection ended before it confirmed "
                    f"the barrier; {self._unconfirmed_total} events so far were written but "
                    "not confirmed (they are re-sent: at-least-once)"
                )
            await self._pong_event.wait()

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

        When the iterator's buffer is full, the handler loop waits for its consumer, and
        then the client stops reading from the broker (backpressure, nothing dropped
        here): consume it, or leave the ``async with``.
        """
        return self._dispatcher.events(source, event, max_buffer=max_buffer)

    # --- the connection ------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        ceiling = min(self.reconnect_max, self.reconnect_min * (2 ** min(failures, 16)))
        return random.uniform(self.reconnect_min, max(self.reconnect_min, ceiling))

    async def _connection_loop(self) -> None:
        failures = 0
        short_sessions = 0
        down_since = 0.0
        # A native client that asks for a welcome talks to a workerbus broker, which
        # takes the hello right behind the connection start: sent with it where the
        # transport can (http: one round trip less per connect).
        early = getattr(self.transport, "connect_with", None) if self._caps else None
        while True:
            try:
                with anyio.fail_after(self.connect_timeout):
                    if early is not None:
                        stream, initial = await early(self._path, self._hello)
                    else:
                        stream, initial = await self.transport.connect(self._path)
            except (
                OSError,
                HandshakeError,
                TimeoutError,
                # a broker that dies mid-handshake (e.g. killed during a failover)
                anyio.BrokenResourceError,
                anyio.EndOfStream,
            ) as exc:
                self.last_error = exc
                if self._caps and isinstance(exc, (HandshakeError, TimeoutError)):
                    self._upgrade_failed(exc)
                failures += 1
                if failures == 1:
                    down_since = anyio.current_time()
                # At most one line per interval while the broker stays away (it retries
                # every half second); the count of the others comes with the next line.
                # Quiet (INFO) lines are limited apart, so they never hold back a warning.
                level = self.hooks.unreachable_level(self, anyio.current_time() - down_since)
                self._reconnect_log.log(
                    level,
                    "worker %d cannot reach the broker at %s: %s (attempt %d)",
                    self.worker_id,
                    self.address,
                    _why_unreachable(exc),
                    failures,
                    key=f"unreachable/{level}",
                )
                await anyio.sleep(self._backoff(failures))
                continue
            if failures > 1:
                logger.info("worker %d reached the broker after %d failed attempts", self.worker_id, failures)
            failures = 0
            started = anyio.current_time()
            error = await self._session(stream, initial, hello_sent=early is not None)
            if error is not None:
                failures += 1
                self._reconnect_log.log(
                    logging.WARNING, "worker %d: %s (attempt %d)", self.worker_id, error, failures
                )
                await anyio.sleep(self._backoff(failures))
                continue
            if self._closing:
                return
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

    def _fail_handshake(self, exc: NoWelcome) -> None:
        # Wake wait_ready() callers: they raise it. Cleared by the next welcome.
        self._handshake_error = self.last_error = exc
        self._ready.set()
        self._ready = anyio.Event()

    def _upgrade_failed(self, exc: BaseException) -> None:
        # The connection start itself failed. For the http transport that may be a
        # stream-transport broker, which never answers an HTTP request; a full broker
        # (503) is not a handshake mismatch, so it only retries.
        if self.transport.name != "http":
            return
        if isinstance(exc, UpgradeRejected) and exc.status_code == 503:
            return
        self._fail_handshake(NoWelcome(f"no welcome from {self.address}: {_why_no_upgrade(exc)}", "transport"))

    async def _receive_welcome(self, stream: ByteStream, initial: bytes) -> tuple[Welcome, bytes]:
        """Read the broker's first frame, which must be the welcome; return it and the bytes
        read past it. Read here, not through a FrameStream, so that what a wrong peer sent
        (HTTP, another profile's frame) can be recognised and named.

        Raises:
            NoWelcome: with the likely cause.
        """
        buf = bytearray(initial)
        hl = self.profile.header_len
        outcome = ""
        try:
            with anyio.fail_after(self.connect_timeout):
                while True:
                    if buf.startswith(b"HTTP/"):
                        break
                    if len(buf) >= hl:
                        size = int.from_bytes(buf[:hl], "big")
                        if size > _MAX_WELCOME_LEN and len(buf) >= 5:
                            break
                        if len(buf) >= hl + size:
                            payload, rest = bytes(buf[hl : hl + size]), bytes(buf[hl + size :])
                            try:
                                return decode_welcome(self.profile, payload), rest
                            except RemoteProtocolError as exc:
                                outcome = f"its first frame is not a welcome ({exc})"
                                break
                    buf += await stream.receive()
        except TimeoutError:
            outcome = f"no reply within {self.connect_timeout:g}s"
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            outcome = "it closed the connection after our hello"
        raise self._no_welcome(bytes(buf), outcome)

    def _no_welcome(self, got: bytes, outcome: str) -> NoWelcome:
        where = f"no welcome from {self.address}"
        if got.startswith(b"HTTP/"):
            line = got.split(b"\r\n", 1)[0].decode("latin-1")[:60]
            return NoWelcome(
                f"{where}: it answered {line!r} to our frames: it is an http-transport "
                "broker (use transport 'http')",
                "transport",
            )
        if got:
            return NoWelcome(
                f"{where}: {outcome or 'its reply is not a native frame'} (got "
                f"{got[:16].hex()}): a kong-profile broker (use profile 'kong'), or not a "
                "workerbus broker",
                "profile",
            )
        return NoWelcome(
            f"{where}: {outcome}: not a workerbus broker, one too old to send a welcome, a "
            "kong-profile broker (use profile 'kong'), or it refused our hello (see its log)",
            "broker",
        )

    def _accept_welcome(self, welcome: Welcome) -> None:
        self.welcome = welcome
        self._handshake_error = None
        self._barrier = CAP_BARRIER in welcome.caps
        self._cluster = CAP_CLUSTER in welcome.caps
        if not self._cluster:
            self._drop_cluster_publishes()
        filtering = CAP_FILTER in welcome.caps
        if self._filtering and not filtering and self._buffer:
            # Encoded with src/ev for a broker that granted the filter; this one did not
            # and would close the connection on them: the same publishes without them.
            plain = [_unkeyed(self.profile, f) for f in self._buffer]
            self._buffer.clear()
            self._buffer.extend(plain)
        self._filtering = filtering
        # A new connection has no filter: the broker sends everything until we narrow it.
        self._sub_pending = False
        self._sub_sent = None
        limit = min(self._own_max_payload_len, welcome.max_payload_len)
        if limit < self.max_payload_len:
            logger.info("worker %d: the broker accepts publishes up to %d bytes", self.worker_id, limit)
        self.max_payload_len = limit
        self._new_encoder()  # (after _filtering and max_payload_len, before anything publishes)
        # Publishes encoded before we knew the broker's limit: the broker would close the
        # connection on each of them (and again after every reconnect). Refuse them here.
        too_big = [f for f in self._buffer if len(f) - self.profile.header_len > limit]
        if too_big:
            for frame in too_big:
                self._buffer.remove(frame)
            self._dropped += len(too_big)
            logger.error(
                "worker %d: dropped %d buffered publishes over the broker's max_payload_len=%d",
                self.worker_id,
                len(too_big),
                limit,
            )

    def _drop_cluster_publishes(self) -> None:
        # Publishes with cluster scope buffered before we knew the broker does not take
        # them: it would close the connection on each (and again after every reconnect).
        header_len = self.profile.header_len

        def cluster(frame: bytes) -> bool:
            try:
                plain = _unkeyed(self.profile, frame)  # (src/ev are no part of the check)
                return decode_publish(self.profile, plain[header_len:])[0].cluster
            except RemoteProtocolError:
                return False

        refused = [f for f in self._buffer if cluster(f)]
        if refused:
            for frame in refused:
                self._buffer.remove(frame)
            self._dropped += len(refused)
            logger.error(
                "worker %d: dropped %d buffered publishes with scope 'cluster': the broker did "
                "not grant the 'cluster' capability",
                self.worker_id,
                len(refused),
            )

    async def _session(self, stream: ByteStream, initial: bytes, *, hello_sent: bool = False) -> NoWelcome | None:
        """Serve one connection; returns the error if the broker did not welcome us."""
        async with stream:
            try:
                if not hello_sent:
                    await stream.send(self._hello)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                logger.info("worker %d: hello failed: %r", self.worker_id, exc)
                return None
            unframed = False
            if self._caps:
                try:
                    welcome, initial = await self._receive_welcome(stream, initial)
                except NoWelcome as exc:
                    self._fail_handshake(exc)
                    return exc
                self._accept_welcome(welcome)
                unframed = CAP_UNFRAMED in welcome.caps
            frames: FrameStream | ObjectStream
            if unframed:
                # Deliveries come as bare objects from here on (the welcome was framed).
                frames = ObjectStream(stream, max_len=self.profile.max_frame_len, initial=initial)
                self._decode_reads = self._decode_objects
            else:
                frames = FrameStream(stream, header_len=self.profile.header_len, initial=initial)
                self._decode_reads = self._decode_batch
            self.last_error = None
            self._connects += 1
            self._session_over = anyio.Event()
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
                self._end_barrier()
                self._made_progress()  # wake publishers waiting for room: they must re-check
                if self._session_over is not None:
                    self._session_over.set()
                logger.info("worker %d lost its broker connection", self.worker_id)
                self._session_ended()
        return None

    def _end_barrier(self) -> None:
        # Pending flush() calls raise BarrierBroken; what was written but not confirmed
        # goes back to the front of the buffer, to be sent again (at-least-once).
        self._session_no += 1
        self._barrier = False
        self._pings_pending.clear()
        self._pings_sent.clear()
        self._written = 0
        if self._unconfirmed:
            frames = [frame for _, batch in self._unconfirmed for frame in batch]
            self._unconfirmed.clear()
            self._unconfirmed_total += len(frames)
            self._buffer.extendleft(reversed(frames))
            logger.warning(
                "worker %d: the connection ended with %d events written but not confirmed "
                "by the broker; re-sending them (they may arrive twice)",
                self.worker_id,
                len(frames),
            )
        self._pong_event.set()
        self._pong_event = anyio.Event()

    def _on_pong(self, n: int) -> None:
        sent = self._pings_sent
        mark = -1
        while sent and sent[0][0] <= n:
            _, mark = sent.popleft()
        if mark < 0:
            logger.error("worker %d: the broker answered a ping we did not send (%d)", self.worker_id, n)
            return
        unconfirmed = self._unconfirmed
        while unconfirmed and unconfirmed[0][0] <= mark:
            unconfirmed.popleft()
        if unconfirmed and not sent and not self._pings_pending:
            # Written while this ping was out: ask again, so they get confirmed too.
            self._ping_seq += 1
            self._pings_pending.append(self._ping_seq)
            if self._writer_wakeup is not None:
                self._writer_wakeup.set()
                self._writer_wakeup = None
        self._pong_seen = n
        self._pong_event.set()
        self._pong_event = anyio.Event()

    # Where the session hooks are called from (in the connection task): kept as methods
    # so that a subclass written before ClientHooks still works (shared/cli.py's publish
    # client overrides _session_ended); new code passes ``hooks=`` instead.
    def _session_started(self) -> None:
        self.hooks.session_started(self)

    def _session_ended(self) -> None:
        self.hooks.session_ended(self)

    def _decoded(self, payloads: list[Any]) -> list[Fields]:
        # (payloads: frames' bytes, or objects in an unframed session)
        batch, errors = self._decode_reads(self, payloads)
        for exc in errors:
            if type(exc) is ControlFrame:
                # (a pong: found on the decoders' error path, so the delivery path pays
                # nothing for it)
                self._control(exc)
                continue
            # Another publisher's bad event: skip it (counted), keep the connection.
            self._undecodable += 1
            self._log.log(
                logging.ERROR, "worker %d: undecodable event skipped: %s", self.worker_id, exc
            )
        if _LIFECYCLE_SOURCE in map(_first, batch):  # (rare: scanned in C first)
            for source, event, data, _ in batch:
                if source == _LIFECYCLE_SOURCE and event == "dropped":
                    self._note_broker_drops(data)
        return batch

    async def _read_loop(self, frames: FrameStream | ObjectStream) -> None:
        # No Event object per delivery: each read's events go to the dispatcher as
        # (source, event, data, wid) tuples, in one call. When the inbox is full the
        # loop waits for the handlers instead of reading on (backpressure): the backlog
        # then waits in the broker's bounded queue, which reports what it has to drop.
        decoded = self._decoded
        # (the handlers run right here when the handler loop is idle: Dispatcher.take)
        take = self._dispatcher.take
        try:
            while True:
                payloads = await frames.receive()
                if self._closing:
                    self._discarded += len(payloads)
                    if self._discarded >= _CLOSE_DRAIN_MAX_EVENTS:
                        return  # a broker that keeps sending: close anyway
                    continue
                start = 0
                try:
                    while start < len(payloads):
                        if start:
                            # One read can hold thousands of events: let the handlers and
                            # the rest of the process run between chunks. Shielded, so a
                            # cancelled connection still hands over every event it read.
                            with anyio.CancelScope(shield=True):
                                await anyio.lowlevel.checkpoint()
                        batch = decoded(payloads[start : start + _DECODE_CHUNK])
                        start += _DECODE_CHUNK
                        taken = take(batch)
                        if taken < len(batch):
                            await self._hand_over(batch, taken)
                except BaseException:
                    # Cut off (cancelled) while waiting for room: what this read still
                    # holds goes to the handlers anyway, unless the client is closing.
                    rest = payloads[start:]
                    if isinstance(frames, ObjectStream):
                        rest += frames.rest()  # (bytes read, not decoded yet)
                    self._keep(decoded(rest))
                    raise
        except anyio.EndOfStream:
            pass
        except RemoteProtocolError as exc:
            if self._closing:
                # e.g. the broker cut a frame short when it saw our end of stream
                logger.info("worker %d: connection ended while closing: %s", self.worker_id, exc)
            else:
                self._log.log(
                    logging.ERROR, "worker %d: broker broke the protocol: %s", self.worker_id, exc
                )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            logger.info("worker %d: read failed: %r", self.worker_id, exc)

    def _control(self, frame: ControlFrame) -> None:
        n = frame.message.get("pong")
        if self._barrier and type(n) is int:
            self._on_pong(n)
        else:
            self._undecodable += 1
            logger.error("worker %d: unexpected control frame skipped: %r", self.worker_id, frame.message)

    async def _hand_over(self, batch: list[Fields], taken: int) -> None:
        """Give the rest of ``batch`` to the dispatcher, waiting for room as needed."""
        dispatcher = self._dispatcher
        try:
            while taken < len(batch) and not self._closing:
                await dispatcher.wait_room()
                taken += dispatcher.push_many(batch[taken:])
        finally:
            self._keep(batch[taken:])

    def _keep(self, events: list[Fields]) -> None:
        """Events read but not handed over: handled over the bound, or when the client is
        closing, discarded and counted (they arrived after the user was done)."""
        if not events:
            return
        if self._closing:
            self._discarded += len(events)
        else:
            self._dispatcher.push_all(events)

    def _note_broker_drops(self, data: Any) -> None:
        count = data.get("count") if isinstance(data, dict) else None
        if isinstance(count, (int, float)):
            self._dropped_by_broker += int(count)
            self._log.log(
                logging.WARNING,
                "worker %d: the broker dropped %d events for us (%d so far)",
                self.worker_id,
                count,
                self._dropped_by_broker,
            )

    def _subscriptions_changed(self) -> None:
        # A handler or iterator came or went: once the broker has a set, it gets the new
        # one before the next batch (coalesced), so this client's publishes made after
        # this call are routed after it.
        if self._sub_sent is not None:
            self._want_sub()

    def _unwanted_event(self) -> None:
        # An event no handler takes while the broker sends everything: narrow it.
        if self._sub_sent is None:
            self._want_sub()

    def _want_sub(self) -> None:
        if self._filtering and self._connected and not self._sub_pending:
            self._sub_pending = True
            if self._writer_wakeup is not None:
                self._writer_wakeup.set()
                self._writer_wakeup = None

    def _sub_frame(self) -> bytes:
        # The current set, once per change (b"" if the broker already has it).
        self._sub_pending = False
        patterns = self._dispatcher.patterns()
        if patterns == self._sub_sent:
            return b""
        self._sub_sent = patterns
        try:
            payload = encode_sub(self.profile, patterns)
        except ValueError as exc:
            # Over the broker's limits: take everything rather than lose events.
            self._log.log(logging.INFO, "worker %d: %s; receiving every event", self.worker_id, exc)
            payload = encode_sub(self.profile, frozenset({("*", "*")}))
        return self._frame(payload)

    def _next_write(self) -> tuple[bytes, list[bytes]] | None:
        """The next write: a changed sub, everything buffered and the pings asked for, as
        one bytes object, and the publishes in it (taken out of the buffer); None when
        there is nothing to write."""
        buffer = self._buffer
        pings = self._pings_pending
        sub = self._sub_frame() if self._sub_pending else b""
        if not buffer and not pings:
            return (sub, []) if sub else None
        batch = list(buffer)
        buffer.clear()
        if self._barrier:
            # Keep the batch until a pong confirms it (re-sent if the connection dies
            # first, _end_barrier). One ping is kept in flight while anything is
            # unconfirmed (see _on_pong), so what is kept stays about one round trip's
            # worth, and a connection that dies after a quiet moment re-sends nothing.
            end = self._written + len(batch)
            if batch:
                self._unconfirmed.append((end, batch))
                if not pings and not self._pings_sent:
                    self._ping_seq += 1
                    pings.append(self._ping_seq)
            if pings:
                frames_out = batch.copy()  # (the batch itself is kept as it was)
                for n in pings:
                    frames_out.append(self._frame(encode_ping(self.profile, n)))
                    self._pings_sent.append((n, end))
                pings.clear()
                data = b"".join(frames_out)
            else:
                data = b"".join(batch)
            self._written = end
        else:
            data = b"".join(batch)
        if sub:
            data = sub + data  # before the batch: it applies to what follows
        return data, batch

    def _write_now(self) -> bool:
        """What flush() does with the barrier's ping: write it, and what is buffered, right
        here (as far as the socket takes it) rather than wake the writer task to do it
        on a later turn of the loop. Only while the writer is not in the middle of a
        write; what the socket does not take, or a failed write, the writer finishes (and
        deals with, as always). Returns False when the writer has to be woken."""
        frames = self._frames_out
        if frames is None or self._writing or self._closing or self._pending_write is not None:
            return False
        out = self._next_write()
        if out is None:
            return True
        data, batch = out
        try:
            written = frames.send_nowait(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            written = 0  # the writer tries again, and ends the session as it always does
        if written == len(data):
            self._sent += len(batch)
            self._made_progress()
            if self._wrote is not None:
                self._wrote(self)
            return True
        self._pending_write = (data[written:] if written else data, batch)
        return False

    async def _write_loop(self, frames: FrameStream | ObjectStream, scope: anyio.CancelScope) -> None:
        barrier = self._barrier
        self._frames_out = frames
        try:
            while True:
                if self._closing:
                    await self._half_close(frames)
                    return
                # The rest of a write that flush() began goes first (_write_now).
                out, self._pending_write = self._pending_write, None
                if out is None:
                    out = self._next_write()
                    if out is None:
                        self._writer_wakeup = wakeup = anyio.Event()
                        await wakeup.wait()
                        continue
                data, batch = out
                self._in_flight = len(batch)
                self._writing = True
                try:
                    # Written at once when the socket takes it all (the usual case): no
                    # schedule point here, the wait for the next batch is one (a turn of the
                    # loop less per batch); what the socket does not take is sent the
                    # waiting way.
                    written = frames.send_nowait(data)
                    if written < len(data):
                        await frames.send(data[written:] if written else data)
                except BaseException as exc:
                    if not barrier:  # (with the barrier, the batch is already kept)
                        self._buffer.extendleft(reversed(batch))
                    if isinstance(exc, (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)):
                        logger.info("worker %d: write failed: %r", self.worker_id, exc)
                        scope.cancel()
                        return
                    raise
                finally:
                    self._in_flight = 0
                    self._writing = False
                self._sent += len(batch)
                self._made_progress()
                if self._wrote is not None:
                    self._wrote(self)
        finally:
            self._frames_out = None
            self._pending_write = None

    async def _half_close(self, frames: FrameStream | ObjectStream) -> None:
        """Closing: say we are done writing, so that the broker sees a clean end of
        stream (no reset), answers with its own, and the reader drains until then."""
        try:
            await frames.stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, NotImplementedError) as exc:
            logger.info("worker %d: could not half-close: %r", self.worker_id, exc)

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
            unconfirmed=self._unconfirmed_total,
        )


@asynccontextmanager
async def connect(address: str, **options: Any) -> AsyncIterator[Client]:
    """``async with connect("unix:/run/bus.sock", worker_id=0) as bus: ...``"""
    async with Client(address, **options) as client:
        yield client
