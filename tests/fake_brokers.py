"""Tiny brokers for testing the conformance kit: one correct, several deliberately broken.

Run as a script (``python tests/fake_brokers.py PATH --transport http --flaw reencode``) so a
"dies on bad input" broker really dies. Threads and blocking sockets, one global lock held
while routing and sending: that trivially gives one global delivery order, and these
brokers only ever serve the kit's small bursts. Native profile only.

Flaws (each should make at least one named kit case fail):

- ``reencode``: decodes and re-encodes every inner event before delivering it.
- ``drop-after-head``: discards whatever arrived with the HTTP request head.
- ``no-dedup``: ignores unique keys (delivers every unique publish).
- ``die-on-bad-input``: the whole process exits on the first bad payload.
- ``no-welcome``: ignores the capabilities of a hello (an old broker: no welcome).
- ``early-pong``: answers a ping at once, and routes the publishes read with it later.
- ``late-to-worker-1``: every 50th delivery to worker id 1 arrives one place late (after
  the next one); every other id is served in order.
- ``scope-for-anyone``: takes a publish's ``"scope": "cluster"`` from any client (as a
  one-node cluster), though none was granted the ``cluster`` capability.

Without a flaw it implements the negotiated native extensions (welcome, ping/pong).
"""

from __future__ import annotations

import argparse
import os
import random
import select
import socket
import threading
import time

import h11
import msgpack

UPGRADE = b"kong-worker-events/1"
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
             b"Upgrade: Kong-Worker-Events/1\r\n\r\n")
FLAWS = ("none", "reencode", "drop-after-head", "no-dedup", "die-on-bad-input", "no-welcome",
         "early-pong", "late-to-worker-1", "scope-for-anyone", "unframed-but-framed")
#: Said in the welcome. The fake's queues are unbounded and it writes inline, so it says
#: "too large to overflow" (native.pong-overflow skips) rather than deadlock that case.
MAX_QUEUE_LEN = 1_000_000
#: late-to-worker-1: which delivery to worker 1 is held back and sent after the next one.
LATE_EVERY = 50


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer has closed (or shut down writing on) ``sock``, unread bytes or not."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(0))


class Bad(Exception):
    """Input that closes the connection."""


def http_error(status: int, reason: str) -> bytes:
    extra = b"Upgrade: Kong-Worker-Events/1\r\n" if status == 426 else b""
    return (f"HTTP/1.1 {status} {reason}\r\n".encode() + extra
            + b"Connection: close\r\nContent-Length: 4\r\n\r\nbad\n")


class Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def fill(self, deadline: float | None) -> None:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Bad("deadline")
            self.sock.settimeout(remaining)
        else:
            self.sock.settimeout(None)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Bad("eof")
        self.buf += chunk

    def ready(self) -> bool:
        """Whether a whole frame is already buffered."""
        return len(self.buf) >= 2 and len(self.buf) >= 2 + int.from_bytes(self.buf[:2], "big")

    def frame(self, deadline: float | None) -> bytes:
        while len(self.buf) < 2:
            self.fill(deadline)
        size = int.from_bytes(self.buf[:2], "big")
        while len(self.buf) < 2 + size:
            self.fill(deadline)
        payload, self.buf = self.buf[2 : 2 + size], self.buf[2 + size :]
        return payload


class FakeBroker:
    def __init__(self, path: str, transport: str, flaw: str, deadline: float,
                 unique_timeout: float) -> None:
        self.path, self.transport, self.flaw = path, transport, flaw
        self.deadline, self.unique_timeout = deadline, unique_timeout
        self.lock = threading.Lock()
        self.peers: dict[int, socket.socket] = {}
        self.queues: dict[int, list[bytes]] = {}  # ids seen but not connected now
        self.uniques: dict[str, float] = {}
        self.to_worker_1 = 0  # deliveries to worker 1 (late-to-worker-1)
        self.held: bytes | None = None

    def serve_forever(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(128)
        print("ready", flush=True)
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=self.handle, args=(sock,), daemon=True).start()

    def bad(self, why: str) -> Bad:
        if self.flaw == "die-on-bad-input":
            os._exit(3)
        return Bad(why)

    def start(self, conn: Conn) -> tuple[int, set[str]]:
        deadline = time.monotonic() + self.deadline
        if self.transport == "http":
            while b"\r\n\r\n" not in conn.buf:
                conn.fill(deadline)
            head, _, rest = conn.buf.partition(b"\r\n\r\n")
            conn.buf = b"" if self.flaw == "drop-after-head" else rest
            parser = h11.Connection(h11.SERVER)
            try:
                parser.receive_data(head + b"\r\n\r\n")
                req = parser.next_event()
            except h11.RemoteProtocolError:
                req = None
            if not isinstance(req, h11.Request):
                conn.sock.sendall(http_error(400, "Bad Request"))
                raise Bad("malformed")
            if req.method != b"GET":
                conn.sock.sendall(http_error(405, "Method Not Allowed"))
                raise Bad("method")
            if UPGRADE not in [v.lower().strip() for k, v in req.headers if k == b"upgrade"]:
                conn.sock.sendall(http_error(426, "Upgrade Required"))
                raise Bad("token")
            conn.sock.sendall(SWITCHING)
        hello = self.decode(conn.frame(deadline))
        if not isinstance(hello, dict) or not {"id", "pid"} <= set(hello) <= {"id", "pid", "caps"} \
                or not all(type(hello[k]) is int for k in ("id", "pid")):
            raise self.bad("hello")
        wid: int = hello["id"]
        caps = hello.get("caps", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise self.bad("hello")
        granted = set() if self.flaw == "no-welcome" else {"welcome", "barrier"} & set(caps)
        if self.flaw == "unframed-but-framed" and {"welcome", "unframed"} <= set(caps):
            granted.add("unframed")  # the flaw: granted, yet deliveries stay framed
        if "welcome" in granted:
            welcome = {"welcome": 1, "broker": "fake", "profile": "native", "id": wid,
                       "caps": sorted(granted), "max_payload_len": 65535,
                       "max_queue_len": MAX_QUEUE_LEN, "unique_timeout": self.unique_timeout}
            packed = msgpack.packb(welcome, use_bin_type=True)
            conn.sock.sendall(len(packed).to_bytes(2, "big") + packed)
        return wid, granted

    def decode(self, payload: bytes) -> object:
        try:
            return msgpack.unpackb(payload, raw=False)
        except ValueError:
            raise self.bad("undecodable") from None

    def handle(self, sock: socket.socket) -> None:
        conn, wid = Conn(sock), None
        try:
            wid, granted = self.start(conn)
            with self.lock:
                old = self.peers.get(wid)
                if old is not None:
                    old.shutdown(socket.SHUT_RDWR)
                self.peers[wid] = sock
                for data in self.queues.pop(wid, []):
                    self.deliver(wid, data)
            held: list[dict[str, object]] = []  # early-pong: routed after the pong
            while True:
                msg = self.decode(conn.frame(None))
                if "barrier" in granted and isinstance(msg, dict) and set(msg) == {"ping"}:
                    pong = msgpack.packb({"pong": msg["ping"]}, use_bin_type=True)
                    with self.lock:  # (sends to this socket are made under the lock)
                        sock.sendall(len(pong).to_bytes(2, "big") + pong)
                    if held:
                        time.sleep(1.0)  # the flaw: routed well after the pong
                        with self.lock:
                            for m in held:
                                self.route(wid, m["spec"], m["data"])  # type: ignore[arg-type]
                        held.clear()
                    continue
                if not isinstance(msg, dict) or set(msg) != {"spec", "data"} \
                        or not isinstance(msg["spec"], dict) or type(msg["data"]) is not bytes:
                    raise self.bad("publish")
                if self.flaw == "early-pong" and conn.ready():
                    held.append(msg)  # more frames of this read follow: maybe a ping
                    continue
                with self.lock:
                    for m in held:
                        self.route(wid, m["spec"], m["data"])  # type: ignore[arg-type]
                    held.clear()
                    self.route(wid, msg["spec"], msg["data"])
        except (Bad, OSError):
            pass
        finally:
            with self.lock:
                if wid is not None and self.peers.get(wid) is sock:
                    del self.peers[wid]
                    self.queues[wid] = []
            sock.close()

    def send(self, wid: int, data: bytes) -> None:
        if self.flaw == "reencode":
            data = msgpack.packb(msgpack.unpackb(data, raw=False), use_bin_type=True)
        if self.flaw == "late-to-worker-1" and wid == 1:
            self.to_worker_1 += 1
            if self.to_worker_1 % LATE_EVERY == 0:
                self.held = data
                return
            self.deliver(wid, data)
            if self.held is not None:
                data, self.held = self.held, None
                self.deliver(wid, data)
            return
        self.deliver(wid, data)

    def deliver(self, wid: int, data: bytes) -> None:
        sock = self.peers.get(wid)
        if sock is None:
            self.queues.setdefault(wid, []).append(data)
            return
        try:
            sock.sendall(len(data).to_bytes(2, "big") + data)
        except OSError:
            self.queues.setdefault(wid, []).append(data)

    def route(self, publisher: int, spec: dict[str, object], data: bytes) -> None:
        everyone = set(self.peers) | set(self.queues)
        if self.flaw == "scope-for-anyone" and spec.get("scope") == "cluster":
            spec = {k: v for k, v in spec.items() if k != "scope"}
        if "unique" in spec:
            now = time.monotonic()
            if self.flaw != "no-dedup" and self.uniques.get(str(spec["unique"]), 0) > now:
                return
            self.uniques[str(spec["unique"])] = now + self.unique_timeout
            # A thread per connection: a peer the kit has closed stays in ``peers`` until
            # its thread runs, even after later frames were routed (the kit's settle
            # assumes one loop that reads in order). Ask the kernel instead.
            live = [w for w, s in self.peers.items() if not hung_up(s)]
            targets = {random.choice(live or list(everyone))}
        elif "worker" in spec and type(spec["worker"]) is int:
            targets = {spec["worker"]}
        elif spec.get("others") is True:
            targets = everyone - {publisher}
        elif not spec:
            targets = everyone
        else:
            raise self.bad("spec")
        for wid in sorted(targets):
            self.send(wid, data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--transport", choices=("http", "stream"), default="http")
    parser.add_argument("--flaw", choices=FLAWS, default="none")
    parser.add_argument("--deadline", type=float, default=1.0)
    parser.add_argument("--unique-timeout", type=float, default=0.3)
    args = parser.parse_args()
    FakeBroker(args.path, args.transport, args.flaw, args.deadline,
               args.unique_timeout).serve_forever()


if __name__ == "__main__":
    main()
