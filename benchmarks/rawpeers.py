"""Raw-socket peers and a broker subprocess, for the attack measurements (ghosts, half frames).

No workerbus client here on purpose: an attacker does not use one, and the measurement must
not depend on how the client behaves. Blocking sockets and threads, so the measuring process
stays simple; the broker is a real ``workerbus broker`` process, measured from /proc.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from httpbus.handshake import REQUEST
from shared.frame import encode_frame
from shared.messages import ALL, encode_event, encode_hello, encode_publish
from shared.profile import NATIVE
from shared.tools.statsserver import fetch_stats

__all__ = [
    "Broker",
    "Reader",
    "broadcast_list",
    "connect",
    "cpu_seconds",
    "hello",
    "rss_mib",
    "start_broker",
]


def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    """Resident memory (or its peak, ``VmHWM``) of ``pid`` in MiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field_name} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` so far, from /proc (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Broker:
    proc: subprocess.Popen[bytes]
    path: str
    stats_path: str
    transport: str
    log: str = field(default="")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, object]:
        return json.loads(fetch_stats(f"unix:{self.stats_path}", as_json=True))  # type: ignore[no-any-return]


@contextmanager
def start_broker(*extra: str, transport: str = "http") -> Iterator[Broker]:
    """A ``workerbus broker`` subprocess with a stats socket; its log goes to a temp file."""
    tmp = tempfile.mkdtemp(prefix="wb-bench-")
    path, stats_path = os.path.join(tmp, "bus.sock"), os.path.join(tmp, "stats.sock")
    log = os.path.join(tmp, "broker.log")
    cmd = [
        sys.executable, "-m", "shared.tools.cli", "broker", "--listen", f"unix:{path}",
        "--stats-listen", f"unix:{stats_path}", "--transport", transport, *extra,
    ]
    with open(log, "wb") as logfile:
        proc = subprocess.Popen(cmd, stderr=logfile)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(stats_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start: {open(log).read()}")
            time.sleep(0.05)
        yield Broker(proc, path, stats_path, transport, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for name in ("bus.sock", "stats.sock"):
            if os.path.exists(os.path.join(tmp, name)):
                os.unlink(os.path.join(tmp, name))
        print(f"(broker log: {log})", file=sys.stderr)


def connect(path: str, transport: str, timeout: float = 10.0) -> socket.socket:
    """A connected socket past the connection start (the HTTP upgrade on ``http``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    if transport == "http":
        sock.sendall(REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"broker closed during the upgrade: {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101 "):
            raise ConnectionError(f"upgrade refused: {head!r}")
    return sock


def hello(worker_id: int, pid: int | None = None) -> bytes:
    return encode_frame(encode_hello(NATIVE, worker_id, os.getpid() if pid is None else pid))


def broadcast_list(count: int, source: str = "bench") -> list[bytes]:
    """``count`` native publish frames to ``all``."""
    return [encode_frame(encode_publish(NATIVE, ALL, encode_event(NATIVE, source, "tick", i, 1))) for i in range(count)]


class Reader(threading.Thread):
    """Reads deliveries off a socket and counts them: events, and events the broker said
    were dropped (``workerbus/dropped`` notices)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.events = 0
        self.dropped = 0
        self.done = threading.Event()

    def run(self) -> None:
        from shared.messages import decode_event_fields

        buf = b""
        try:
            while True:
                data = self.sock.recv(256 * 1024)
                if not data:
                    return
                buf += data
                pos = 0
                while len(buf) - pos >= 2:
                    end = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
                    if end > len(buf):
                        break
                    payload = buf[pos + 2 : end]
                    if b"workerbus" in payload:
                        source, event, value, _ = decode_event_fields(NATIVE, payload)
                        if source == "workerbus" and event == "dropped":
                            self.dropped += value["count"]
                        else:
                            self.events += 1
                    else:
                        self.events += 1
                    pos = end
                buf = buf[pos:]
        except OSError:
            return
        finally:
            self.done.set()

    def seen(self) -> int:
        return self.events + self.dropped
