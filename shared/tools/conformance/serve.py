"""``workerbus conformance serve``: a strict broker that judges the clients talking to it.

It relays like a broker (hub.py) and checks every byte each client sends (validate.py).
Each violation is printed as it happens, with the client's id and pid from its hello and the
offending bytes; a summary (and optionally a JSON report) is written on SIGINT/SIGTERM.
Exit status 0 means no client broke the contract.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import stat
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TextIO

import anyio
from anyio.abc import ByteStream, SocketListener

from shared.tools.conformance.hub import Hub, Mailbox
from shared.tools.conformance.profiles import DecodeError, Profile, hexabbr
from shared.tools.conformance.runner import write_json
from shared.tools.conformance.validate import (
    Fatal,
    Rejection,
    check_hello,
    check_inner,
    check_publish,
    judge_request,
    request_deviation,
)

__all__ = ["ServeConfig", "run_serve", "serve"]

SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
             b"Upgrade: Kong-Worker-Events/1\r\n\r\n")
#: A request head longer than this is refused (400) instead of buffered further.
MAX_REQUEST_HEAD = 16 * 1024
#: Socket file mode: only the owning user may connect (PROTOCOL.md §1).
SOCKET_MODE = 0o600
#: The negotiated native extensions serve implements (docs/protocol.md §8).
KNOWN_CAPS = frozenset({"welcome", "barrier"})
_TRANSPORT_ERRORS = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                     OSError)


@dataclass(frozen=True)
class ServeConfig:
    address: str
    path: str
    transport: str
    profile: Profile
    handshake_deadline: float = 5.0
    unique_timeout: float = 5.0
    workers: int | None = None
    max_payload: int | None = None
    queue_grace: float = 30.0
    max_queue: int = 10240


@dataclass
class Violation:
    conn: int
    id: int | None
    pid: int | None
    kind: str
    message: str
    bytes_hex: str


@dataclass
class Peer:
    num: int
    wid: int | None = None
    pid: int | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    #: Violations seen before the hello, held back so their report can name id and pid.
    pending: list[tuple[str, str, bytes]] = field(default_factory=list)
    #: The negotiated extensions granted by the welcome (none for a plain hello).
    caps: frozenset[str] = frozenset()
    #: The writer and the pong path share the socket.
    send_lock: anyio.Lock = field(default_factory=anyio.Lock)


class _Buffered:
    """A byte stream plus what has been read from it but not consumed yet."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        try:
            self.buf += await self.stream.receive()
        except anyio.EndOfStream:
            if self.buf:
                # Closing in the middle of a head or frame is the client's fault.
                raise Fatal("truncated", f"connection closed with {len(self.buf)} bytes of an "
                            "incomplete head or frame unread") from None
            raise

    async def head(self) -> bytes:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if len(self.buf) > MAX_REQUEST_HEAD:
                raise Rejection(400, "Bad Request", "request head too long")
            await self._fill()
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        return head

    async def frame(self, profile: Profile, limit: int) -> bytes:
        hl = profile.header_len
        while len(self.buf) < hl:
            await self._fill()
        size = int.from_bytes(self.buf[:hl], "big")
        # Checked before buffering the payload, as a broker must (PROTOCOL.md §3).
        if size > limit:
            raise Fatal("frame-length", f"frame announces {size} bytes, over the limit {limit}")
        while len(self.buf) < hl + size:
            await self._fill()
        payload = bytes(self.buf[hl : hl + size])
        del self.buf[: hl + size]
        return payload


def _http_error(status: int, reason: str, message: str) -> bytes:
    body = (message + "\n").encode()
    extra = b"Upgrade: Kong-Worker-Events/1\r\n" if status == 426 else b""
    return (f"HTTP/1.1 {status} {reason}\r\n".encode() + extra
            + b"Content-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


class StrictBroker:
    def __init__(self, cfg: ServeConfig, out: TextIO) -> None:
        self.cfg = cfg
        self.out = out
        self.limit = min(cfg.max_payload or cfg.profile.max_payload, cfg.profile.max_payload)
        self.hub = Hub(unique_timeout=cfg.unique_timeout, workers=cfg.workers,
                       grace=cfg.queue_grace, max_queue=cfg.max_queue)
        self.violations: list[Violation] = []
        self.connections = 0

    def flush(self, peer: Peer) -> None:
        pending, peer.pending = peer.pending, []
        for kind, message, data in pending:
            self.violation(peer, kind, message, data)

    def violation(self, peer: Peer, kind: str, message: str, data: bytes) -> None:
        v = Violation(peer.num, peer.wid, peer.pid, kind, message, data.hex())
        self.violations.append(v)
        who = f"id={'?' if v.id is None else v.id} pid={'?' if v.pid is None else v.pid}"
        print(f"VIOLATION conn#{v.conn} {who} [{kind}] {message}: {hexabbr(data)}",
              file=self.out, flush=True)

    async def handle(self, stream: ByteStream) -> None:
        self.connections += 1
        peer = Peer(self.connections)
        box: Mailbox | None = None
        with peer.scope:
            try:
                async with stream:
                    box = await self._session(peer, _Buffered(stream))
            except _TRANSPORT_ERRORS:
                pass  # the client went away; not a violation by itself
            finally:
                self.flush(peer)
                if box is not None:
                    self.hub.detach(box, peer)
                peer.done.set()

    async def _start(self, peer: Peer, conn: _Buffered) -> bytes | None:
        """HTTP upgrade (http) and the hello frame; None when the connection must close."""
        if self.cfg.transport == "http":
            head = b""
            try:
                head = await conn.head()
                judge_request(head)
            except Rejection as exc:
                self.violation(peer, "upgrade-rejected", f"answered {exc.status}: {exc}",
                               head or bytes(conn.buf))
                await conn.stream.send(_http_error(exc.status, exc.reason, str(exc)))
                return None
            deviation = request_deviation(head)
            if deviation:
                peer.pending.append(("upgrade-request", deviation, head))
            await conn.stream.send(SWITCHING)
        return await conn.frame(self.cfg.profile, self.limit)

    async def _session(self, peer: Peer, conn: _Buffered) -> Mailbox | None:
        deadline = self.cfg.handshake_deadline
        hello: bytes | None = None
        try:
            with anyio.move_on_after(deadline):
                hello = await self._start(peer, conn)
                if hello is None:
                    return None
            if hello is None:
                self.violation(peer, "deadline", f"no complete handshake and hello within "
                               f"{deadline:g}s", bytes(conn.buf))
                return None
            peer.wid, peer.pid, caps = check_hello(self.cfg.profile.decode(hello),
                                                   self.cfg.profile.native)
            self.flush(peer)
            peer.caps = caps & KNOWN_CAPS
            if "welcome" in peer.caps:
                await conn.stream.send(self._welcome(peer))
        except DecodeError as exc:
            self.violation(peer, "hello", f"undecodable hello: {exc}", hello or b"")
            return None
        except Fatal as exc:
            self.violation(peer, exc.kind, str(exc), hello or bytes(conn.buf))
            return None
        box, previous = self.hub.attach(peer.wid, peer)
        if isinstance(previous, Peer):
            # Same id connected again: the new connection takes over (PROTOCOL.md §5).
            previous.scope.cancel()
            await previous.done.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._writer, box, conn.stream, peer.send_lock)
            try:
                await self._reader(peer, conn)
            finally:
                tg.cancel_scope.cancel()
        return box

    def _welcome(self, peer: Peer) -> bytes:
        profile = self.cfg.profile
        return profile.frame(profile.encode({
            "welcome": 1, "broker": "workerbus conformance serve", "profile": profile.name,
            "id": peer.wid, "caps": sorted(peer.caps), "max_payload_len": self.limit,
            "max_queue_len": self.cfg.max_queue, "unique_timeout": self.cfg.unique_timeout,
        }))

    async def _reader(self, peer: Peer, conn: _Buffered) -> None:
        profile = self.cfg.profile
        assert peer.wid is not None  # set by the hello before the reader starts
        barrier = "barrier" in peer.caps
        while True:
            payload = b""
            try:
                payload = await conn.frame(profile, self.limit)
                msg = profile.decode(payload)
                if barrier and isinstance(msg, dict) and set(msg) == {"ping"} \
                        and type(msg["ping"]) is int:
                    # Everything before it is routed (this loop is sequential): answer now,
                    # outside the queue, under the lock the writer sends with.
                    async with peer.send_lock:
                        await conn.stream.send(profile.frame(profile.encode({"pong": msg["ping"]})))
                    continue
                spec, data = check_publish(msg, profile)
            except DecodeError as exc:
                self.violation(peer, "undecodable", str(exc), payload)
                return
            except Fatal as exc:
                self.violation(peer, exc.kind, str(exc), payload or bytes(conn.buf))
                return
            except _TRANSPORT_ERRORS:
                return  # handled here so that no ExceptionGroup leaves the task group
            for problem in check_inner(data, profile, peer.wid):
                self.violation(peer, "inner-event", problem, data)
            self.hub.route(peer.wid, spec, data)

    async def _writer(self, box: Mailbox, stream: ByteStream, lock: anyio.Lock) -> None:
        while True:
            data = await box.get()
            try:
                async with lock:
                    await stream.send(self.cfg.profile.frame(data))
            except _TRANSPORT_ERRORS:
                box.push_front(data)
                return
            except anyio.get_cancelled_exc_class():
                box.push_front(data)
                raise

    def kinds(self) -> Counter[str]:
        return Counter(v.kind for v in self.violations)

    def summary(self) -> dict[str, object]:
        return {
            "address": self.cfg.address,
            "transport": self.cfg.transport,
            "profile": self.cfg.profile.name,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "connections": self.connections,
            "violations": [asdict(v) for v in self.violations],
            "totals": {"violations": len(self.violations), "by_kind": dict(self.kinds())},
        }


def _refuse_live_socket(path: str) -> str | None:
    """Why we must not take ``path`` (a live listener, not a socket), or None if free/stale."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(mode):
        return f"{path} exists and is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return None  # stale file: nobody listens; the listener replaces it
    finally:
        probe.close()
    return f"another broker is already listening on {path}"


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            break
    # (leaving the receiver puts the default handlers back: a second Ctrl-C would raise
    # KeyboardInterrupt in the middle of the report; the stop is short, let it end)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    scope.cancel()


async def _accept_loop(listener: SocketListener, broker: StrictBroker,
                       tg: anyio.abc.TaskGroup) -> None:
    async with listener:
        while True:
            tg.start_soon(broker.handle, await listener.accept())


async def serve(cfg: ServeConfig, out: TextIO, json_path: str | None = None) -> int:
    problem = _refuse_live_socket(cfg.path)
    if problem:
        print(f"conformance serve: {problem}", file=out, flush=True)
        return 2
    broker = StrictBroker(cfg, out)
    try:
        listener = await anyio.create_unix_listener(cfg.path, mode=SOCKET_MODE)
    except OSError as exc:
        print(f"conformance serve: cannot listen on {cfg.path}: {exc.strerror or exc}", file=out, flush=True)
        return 2
    inode = os.stat(cfg.path).st_ino
    try:
        print(f"conformance serve: ready on {cfg.address} (transport={cfg.transport}, "
              f"profile={cfg.profile.name})", file=out, flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            tg.start_soon(_accept_loop, listener, broker, tg)
    finally:
        try:
            if os.stat(cfg.path).st_ino == inode:
                os.unlink(cfg.path)
        except FileNotFoundError:
            pass
    print(f"conformance serve: {broker.connections} connections, "
          f"{len(broker.violations)} violations", file=out, flush=True)
    for kind, n in sorted(broker.kinds().items()):
        print(f"  {kind}: {n}", file=out, flush=True)
    if json_path:
        write_json(broker.summary(), json_path)
    return 1 if broker.violations else 0


def run_serve(cfg: ServeConfig, out: TextIO, json_path: str | None = None) -> int:
    return anyio.run(serve, cfg, out, json_path, backend="asyncio")
