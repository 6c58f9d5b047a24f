"""Attacks at the edges, against a real ``workerbus broker`` process on raw sockets.

- Ghost ids (issue 10, finding 4): ids that say hello and leave are capped in number
  (``--max-departed-queues``, oldest retired first) and muted after ``--broadcast-grace``:
  what they miss is counted, not copied, and reported if they come back.
- Half-sent frames (finding 5): a peer that stops inside a frame is dropped at
  ``--frame-timeout``, counted and logged (rate-limited).
- Refuse loudly (finding 6): a full http broker answers ``503`` with a text body and the
  client says "broker full"; HTTP/1.0, a body or ``Expect`` are refused at once with a
  status and one line of text; an HTTP request on the stream socket is answered ``400``
  at once, and the log says to use ``--transport http``.

Counts are read from the broker's ``/stats``; no test asserts a duration or a memory size
(benchmarks/ghosts.py and benchmarks/halfframes.py measure those).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
from collections.abc import Iterator

import httpx
import pytest

from httpbus.handshake import REQUEST
from shared.client import Client
from shared.frame import encode_frame
from shared.messages import ALL, decode_event_fields, encode_event, encode_hello, encode_publish
from shared.profile import NATIVE
from tests.faultkit import DEADLINE, BrokerProc, assert_identity, reap, wait_for
from tests.helpers import wait_until

#: Socket timeout of every raw read: an answer that comes "at once" comes well within it,
#: while the brokers here have a handshake deadline far beyond it.
READ_TIMEOUT = 10.0


def raw(path: str, transport: str = "stream") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(READ_TIMEOUT)
    sock.connect(path)
    if transport == "http":
        sock.sendall(REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"closed during the upgrade: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101 "), head
    return sock


def hello(worker_id: int) -> bytes:
    return encode_frame(encode_hello(NATIVE, worker_id, os.getpid()))


def answer(sock: socket.socket) -> bytes:
    """Everything the broker sends until it closes (a reset after the answer is a close)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def closed_by_broker(sock: socket.socket) -> bool:
    try:
        sock.setblocking(False)
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(READ_TIMEOUT)


class Deliveries:
    """Reads a raw worker's deliveries: events by name and the broker's dropped notices."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.events: list[tuple[str, str, object]] = []

    def read_until(self, done: object) -> None:
        assert callable(done)
        while not done():
            chunk = self.sock.recv(65536)
            assert chunk, "the broker closed the connection"
            self.buf += chunk
            while len(self.buf) >= 2:
                end = 2 + int.from_bytes(self.buf[:2], "big")
                if len(self.buf) < end:
                    break
                source, event, data, _ = decode_event_fields(NATIVE, self.buf[2:end])
                self.events.append((source, event, data))
                self.buf = self.buf[end:]


def broadcasts(count: int) -> bytes:
    return b"".join(
        encode_frame(encode_publish(NATIVE, ALL, encode_event(NATIVE, "test", "tick", i, 1))) for i in range(count)
    )


@pytest.fixture
def path(sock_dir: str) -> Iterator[str]:
    yield os.path.join(sock_dir, "bus.sock")


# --- finding 4: ghost ids --------------------------------------------------------------------


def test_ghost_ids_are_capped_and_muted_and_a_returning_one_is_told_what_it_missed(path: str) -> None:
    with reap() as procs:
        broker = BrokerProc(
            path, "--transport", "stream", "--max-departed-queues", "8", "--broadcast-grace", "0.2",
            "--queue-grace", "300", backend="trio",
        )
        procs.append(broker)
        for i in range(40):  # each says hello with a new id and leaves
            ghost = raw(path)
            ghost.sendall(hello(1000 + i))
            ghost.close()
        wait_for(lambda: broker.stats()["accepted"] == 40 and broker.stats()["connections"] == 0, "the ghosts")
        # Only the 8 that left last are kept; the first 32 were retired, oldest first.
        wait_for(lambda: broker.stats()["router"]["queues_muted"] == 8, "the ghosts to be muted")
        router = broker.stats()["router"]
        assert (router["queues_departed"], router["queues_evicted"]) == (8, 32)
        assert sorted(q["worker_id"] for q in router["queues"]) == list(range(1032, 1040))

        worker = raw(path)
        worker.sendall(hello(0))
        worker.sendall(broadcasts(500))
        got = Deliveries(worker)
        got.read_until(lambda: len(got.events) == 500)
        stats = broker.stats()
        assert stats["router"]["deliveries"] == 500  # one queue took them: the ghosts none
        ghost_queues = [q for q in stats["router"]["queues"] if q["worker_id"] >= 1000]
        assert len(ghost_queues) == 8
        for q in ghost_queues:  # counted as missed, not copied
            assert (q["routed"], q["dropped"], q["depth"]) == (500, 500, 0), q
        assert_identity(stats)

        back = raw(path)
        back.sendall(hello(1039))
        wait_for(lambda: broker.stats()["connections"] == 2, "the ghost to come back")
        worker.sendall(broadcasts(1))  # the notice goes out with the next delivery
        seen = Deliveries(back)
        seen.read_until(lambda: len(seen.events) == 2)
        assert seen.events[0] == ("workerbus", "dropped", {"count": 500, "total": 500})
        assert seen.events[1][:2] == ("test", "tick")
        log = broker.log()
        assert "queue of worker 1000 retired early: more than max_departed_queues=8 departed ids" in log
        assert_identity(broker.stats())
        for s in (worker, back):
            s.close()


# --- finding 5: half-sent frames -----------------------------------------------------------


@pytest.mark.parametrize(("transport", "backend"), [("stream", "asyncio"), ("http", "trio")])
def test_peers_stuck_inside_a_frame_are_dropped_at_the_frame_deadline(path: str, transport: str, backend: str) -> None:
    with reap() as procs:
        broker = BrokerProc(path, "--transport", transport, "--frame-timeout", "0.5", backend=backend)
        procs.append(broker)
        worker = raw(path, transport)
        worker.sendall(hello(0))
        stuck = []
        for i in range(12):
            peer = raw(path, transport)
            peer.sendall(hello(100 + i))
            peer.sendall((65535).to_bytes(2, "big") + bytes(65000))  # 535 bytes short
            stuck.append(peer)
        wait_for(lambda: all(closed_by_broker(p) for p in stuck), "the broker to drop the stuck peers")
        stats = broker.stats()
        assert (stats["frame_timeouts"], stats["protocol_errors"]) == (12, 0)
        assert not closed_by_broker(worker)  # a worker between frames is not touched
        worker.sendall(broadcasts(3))
        got = Deliveries(worker)
        got.read_until(lambda: len(got.events) == 3)
        log = broker.log()
        line = "a frame was not completed within frame_timeout=0.5s (65002 of 65537 bytes arrived)"
        assert 1 <= log.count(line) <= 5  # rate-limited: 5 per 10 s
        for s in (worker, *stuck):
            s.close()


# --- finding 6: refuse loudly --------------------------------------------------------------


def test_a_full_http_broker_answers_503_with_a_reason(path: str) -> None:
    with reap() as procs:
        broker = BrokerProc(path, "--max-connections", "1")
        procs.append(broker)
        held = raw(path, "http")
        held.sendall(hello(0))
        wait_for(lambda: broker.stats()["connections"] == 1, "the first worker")
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.settimeout(READ_TIMEOUT)
        late.connect(path)
        late.sendall(REQUEST)
        reply = answer(late)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), reply
        assert b"\r\nContent-Type: text/plain; charset=utf-8" in head
        assert body == b"broker full: max_connections=1 reached, try again later\n"
        # An HTTP client sees the same.
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=READ_TIMEOUT) as client:
            response = client.get("http://broker/")
        assert response.status_code == 503 and response.text.startswith("broker full")
        stats = broker.stats()
        assert stats["refused_over_limit"] == 2 and stats["connections"] == 1
        assert "refusing a peer (pid " in broker.log()
        assert "broker full (max_connections=1 reached)" in broker.log()
        for s in (held, late):
            s.close()


@pytest.mark.anyio
async def test_the_client_says_broker_full(path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "shared.client")
    with reap() as procs:
        broker = BrokerProc(path, "--max-connections", "1")
        procs.append(broker)
        held = raw(path, "http")
        held.sendall(hello(0))
        wait_for(lambda: broker.stats()["connections"] == 1, "the first worker")
        async with Client(f"unix:{path}", transport="http", worker_id=1) as bus:
            await wait_until(lambda: "cannot reach the broker" in caplog.text, DEADLINE)
            assert not bus.is_ready
        line = next(r.getMessage() for r in caplog.records if "cannot reach the broker" in r.getMessage())
        assert "broker full: max_connections=1 reached, try again later (HTTP 503)" in line, line
        held.close()


@pytest.mark.parametrize(
    ("request_head", "status", "text"),
    [
        (b"GET / HTTP/1.0\r\nUpgrade: Kong-Worker-Events/1\r\n\r\n", 505,
         b"HTTP/1.0 is not supported: the upgrade needs HTTP/1.1\n"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nContent-Length: 10\r\n\r\n", 400,
         b"an upgrade request must not have a body\n"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
         b"an upgrade request must not have a body\n"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: Kong-Worker-Events/1\r\nContent-Length: 10\r\n"
         b"Expect: 100-continue\r\n\r\n", 417, b"Expect is not supported: an upgrade request has no body\n"),
        (b"GARBAGE\r\n\r\n", 400, b"malformed HTTP request: illegal request line\n"),
    ],
    ids=["http1.0", "content-length", "chunked", "expect", "garbage"],
)
def test_http_requests_that_cannot_upgrade_are_refused_at_once(
    path: str, request_head: bytes, status: int, text: bytes
) -> None:
    with reap() as procs:
        # A handshake deadline far beyond the read timeout: an answer proves "at once".
        broker = BrokerProc(path, "--handshake-timeout", "60")
        procs.append(broker)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(READ_TIMEOUT)
        sock.connect(path)
        sock.sendall(request_head)  # and never the body it announces
        head, _, body = answer(sock).partition(b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 %d " % status), head
        assert body == text
        assert broker.stats()["refused"] == 1
        assert f"upgrade refused with {status}: " in broker.log()


def test_an_http_request_on_the_stream_socket_is_answered_at_once(path: str) -> None:
    with reap() as procs:
        broker = BrokerProc(path, "--transport", "stream", "--handshake-timeout", "60")
        procs.append(broker)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(READ_TIMEOUT)
        sock.connect(path)
        sock.sendall(REQUEST)
        head, _, body = answer(sock).partition(b"\r\n\r\n")
        sock.close()
        assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), head
        assert body == b"an HTTP request on the stream socket: use --transport http\n"
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=READ_TIMEOUT) as client:
            response = client.post("http://broker/publish", content=b"x" * 100)
        assert response.status_code == 400 and "use --transport http" in response.text
        assert broker.stats()["refused"] == 2 and broker.stats()["handshake_timeouts"] == 0
        assert "before its hello: an HTTP request on the stream socket: use --transport http" in broker.log()
        # A worker still gets through, its hello arriving a byte at a time.
        worker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        worker.settimeout(READ_TIMEOUT)
        worker.connect(path)
        for byte in hello(0):
            worker.sendall(bytes([byte]))
        wait_for(lambda: broker.stats()["connections"] == 1, "the worker")
        worker.close()


@pytest.mark.anyio
async def test_a_full_stream_broker_closes_and_logs_why(path: str) -> None:
    # Nothing can be said on the stream transport before a hello (docs/protocol.md §2):
    # the broker closes and logs the reason.
    with reap() as procs:
        broker = BrokerProc(path, "--transport", "stream", "--max-connections", "1")
        procs.append(broker)
        held = raw(path)
        held.sendall(hello(0))
        wait_for(lambda: broker.stats()["connections"] == 1, "the first worker")
        async with Client(f"unix:{path}", transport="stream", worker_id=1):
            await wait_until(lambda: broker.stats()["refused_over_limit"] >= 1, DEADLINE)
        assert "broker full (max_connections=1 reached)" in broker.log()
        held.close()


# --- out of file descriptors -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_broker_out_of_file_descriptors_keeps_serving_and_accepts_the_waiting_later(
    path: str, backend: str
) -> None:
    # At its open-file limit the broker's accept fails (EMFILE). The peers wait in the
    # listen backlog; the broker says why, keeps serving what it has, and accepts them
    # once descriptors are free again (anyio's own accept loop raised and stopped serving).
    with reap() as procs:
        broker = BrokerProc(path, "--transport", "stream", backend=backend)
        procs.append(broker)
        used = len(os.listdir(f"/proc/{broker.pid}/fd"))
        resource.prlimit(broker.pid, resource.RLIMIT_NOFILE, (used + 12, used + 12))
        peers = []
        for i in range(24):
            peer = raw(path)
            peer.sendall(hello(i))
            peers.append(peer)
        wait_for(lambda: "cannot accept a connection: Too many open files" in broker.log(), "EMFILE")
        # The first peers were accepted (the backlog is first in, first out) and still work.
        peers[0].sendall(broadcasts(2))
        got = Deliveries(peers[1])
        got.read_until(lambda: len(got.events) == 2)
        for peer in peers[:16]:
            peer.close()
        waiting = peers[16:]
        wait_for(lambda: broker.stats()["connections"] == len(waiting), "the waiting peers")
        assert broker.stats()["accept_failures"] >= 1
        waiting[0].sendall(broadcasts(3))
        for peer in waiting[1:]:
            seen = Deliveries(peer)
            seen.read_until(lambda: len(seen.events) == 3)  # noqa: B023 (read at once)
        for peer in waiting:
            peer.close()
