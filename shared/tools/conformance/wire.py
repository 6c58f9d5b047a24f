"""Blocking raw-socket helpers for the kit: every wait takes an absolute deadline.

Plain ``socket`` with per-call timeouts, not anyio: the kit drives one case at a time and the
simplest code that can never hang is the easiest to trust when it reports a failure.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field

import msgpack

from shared.tools.conformance.profiles import Profile, hexabbr

__all__ = [
    "UPGRADE_REQUEST",
    "UPGRADE_TOKEN",
    "Conn",
    "HttpHead",
    "PeerClosed",
    "SendFailed",
    "WaitTimeout",
    "parse_head",
    "wait_readable",
]

#: The exact 87-byte upgrade request of PROTOCOL.md §2.1.
UPGRADE_REQUEST = (
    b"GET / HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: Kong-Worker-Events/1\r\n"
    b"\r\n"
)
UPGRADE_TOKEN = "Kong-Worker-Events/1"
#: An HTTP head larger than this is not an answer from a broker; stop reading.
MAX_HEAD = 64 * 1024
_RECV_CHUNK = 256 * 1024
#: A broker that does not take our bytes for this long is not reading them at all.
SEND_TIMEOUT = 5.0


class PeerClosed(Exception):
    """The broker closed (or reset) the connection while we waited for something."""

    def __init__(self, what: str, received: bytes) -> None:
        super().__init__(f"connection closed while waiting for {what}; got {hexabbr(received)}")
        self.received = received


class SendFailed(Exception):
    """Writing to the broker failed (typically: it closed or died)."""


class WaitTimeout(Exception):
    """The deadline passed while we waited for something."""

    def __init__(self, what: str, received: bytes) -> None:
        super().__init__(f"timed out waiting for {what}; got {hexabbr(received)}")
        self.received = received


@dataclass
class HttpHead:
    """A parsed HTTP response head (status line and headers, no body)."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def values(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), stripped."""
        return [v.strip() for k, v in self.headers if k.lower() == name.lower()]

    def has_token(self, name: str, token: str) -> bool:
        """Whether the comma-separated header ``name`` carries ``token`` (case-insensitive)."""
        return any(
            t.strip().lower() == token.lower() for v in self.values(name) for t in v.split(",")
        )


def parse_head(raw: bytes) -> HttpHead:
    """Parse a response head; raises ValueError with the reason when it is not HTTP."""
    lines = raw.split(b"\r\n")
    parts = lines[0].decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0]!r}")
    head = HttpHead(parts[0], int(parts[1]), parts[2] if len(parts) > 2 else "")
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"bad header line: {line!r}")
        head.headers.append((name.strip(), value.strip()))
    return head


def wait_readable(conns: list[Conn], deadline: float) -> None:
    """Block until one of ``conns`` has bytes (or EOF) to read, or the deadline passes."""
    remaining = deadline - time.monotonic()
    if remaining > 0:
        select.select([c.sock for c in conns if not c.eof], [], [], remaining)


class Conn:
    """One client connection to the broker under test, with a receive buffer."""

    def __init__(self, sock: socket.socket, profile: Profile) -> None:
        self.sock = sock
        self.profile = profile
        #: Who this connection is, for failure reasons ("worker 1041").
        self.label = "connection"
        self.buf = bytearray()
        self.eof = False

    @classmethod
    def connect(cls, path: str, profile: Profile, deadline: float) -> Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, profile)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def leave(self, deadline: float) -> bool:
        """Leave the way a worker that is done does: half-close, then read (and discard)
        until the broker closes too, then close. Once the broker's close is seen, the broker
        has seen this worker go: its queue no longer has a connection, so what is published
        from then on waits in it. Returns False if the broker had not closed by the
        deadline (the socket is closed anyway)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return False
        try:
            return self.closed_by_peer(deadline)
        finally:
            self.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise SendFailed(f"{self.label}: sending {hexabbr(data)} failed: {exc}") from exc

    def _fill(self, deadline: float, what: str) -> None:
        """Receive at least one more byte into the buffer, or raise."""
        if self.eof:
            raise PeerClosed(what, bytes(self.buf))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(what, bytes(self.buf))
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(_RECV_CHUNK)
        except TimeoutError:
            raise WaitTimeout(what, bytes(self.buf)) from None
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            raise PeerClosed(what, bytes(self.buf))
        self.buf += chunk

    def pump(self) -> None:
        """Move whatever the peer has sent so far into our buffer, without waiting.

        A case that publishes a lot calls this between bursts, so that a broker which
        writes with backpressure never stalls on a socket buffer the kit is not reading.
        """
        self.sock.setblocking(False)
        try:
            while not self.eof:
                chunk = self.sock.recv(_RECV_CHUNK)
                if not chunk:
                    self.eof = True
                self.buf += chunk
        except (BlockingIOError, InterruptedError):
            pass
        except (ConnectionResetError, BrokenPipeError):
            self.eof = True
        finally:
            self.sock.setblocking(True)

    def take_frames(self) -> list[bytes]:
        """The complete frames already buffered (see :meth:`pump`), without waiting."""
        frames = []
        hl = self.profile.header_len
        while len(self.buf) >= hl:
            end = hl + int.from_bytes(self.buf[:hl], "big")
            if len(self.buf) < end:
                break
            frames.append(bytes(self.buf[hl:end]))
            del self.buf[:end]
        return frames

    def recv_exact(self, n: int, deadline: float, what: str) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline, what)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_head(self, deadline: float) -> bytes:
        """Bytes up to and including the blank line; what follows stays buffered."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                return self.recv_exact(end + 4, deadline, "the HTTP head")
            if len(self.buf) > MAX_HEAD:
                raise ValueError(f"no end of HTTP head in {hexabbr(bytes(self.buf))}")
            self._fill(deadline, "the HTTP response head")

    def read_until_close(self, deadline: float, what: str) -> bytes:
        """Everything until the peer closes; WaitTimeout if it is still open at the deadline."""
        try:
            while True:
                self._fill(deadline, what)
        except PeerClosed:
            data = bytes(self.buf)
            self.buf.clear()
            return data

    def read_frame(self, deadline: float, what: str = "a frame") -> bytes:
        header = self.recv_exact(self.profile.header_len, deadline, what)
        return self.recv_exact(int.from_bytes(header, "big"), deadline, what)

    def read_object(self, deadline: float, what: str = "a delivery") -> bytes:
        """The bytes of the next bare MessagePack object (``unframed`` deliveries,
        docs/protocol.md §8): msgpack delimits itself; nothing else is checked here."""
        while True:
            if self.buf:
                unpacker = msgpack.Unpacker()
                unpacker.feed(bytes(self.buf))
                try:
                    unpacker.skip()
                except msgpack.OutOfData:
                    pass
                else:
                    return self.recv_exact(unpacker.tell(), deadline, what)
            self._fill(deadline, what)

    def closed_by_peer(self, deadline: float) -> bool:
        """True once the peer has closed; False if it is still open at the deadline.

        Frames that arrive meanwhile are discarded: the question is only whether it closes.
        """
        try:
            self.read_until_close(deadline, "the broker to close the connection")
        except WaitTimeout:
            return False
        return True
