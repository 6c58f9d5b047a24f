"""examples/chat_server.py: processes sharing a TCP port, lines crossing between them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.slow

PROCESSES = 3


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""

    def line(self, deadline: float = 10.0) -> str:
        end = time.monotonic() + deadline
        while b"\n" not in self.buf:
            self.sock.settimeout(max(0.05, end - time.monotonic()))
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\n")
        return raw.decode()


@contextmanager
def chat_server() -> Iterator[int]:
    tmp = tempfile.mkdtemp(prefix="wb-chat-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.chat_server", "--port", "0", "--processes",
         str(PROCESSES), "--bus", f"unix:{os.path.join(tmp, 'bus.sock')}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on 127.0.0.1:"), first
        yield int(first.rsplit(":", 1)[1])
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run(["rm", "-rf", tmp], check=False)


def test_a_line_reaches_the_clients_of_every_process() -> None:
    with chat_server() as port:
        conns: list[Conn] = []
        pids: dict[str, Conn] = {}
        end = time.monotonic() + 30
        # Connect until the kernel has handed connections to every process (bounded).
        # Connections made before the other processes have bound their socket all land on
        # the first one, so keep trying (paced) until each process has answered.
        for _ in range(400):
            if len(pids) == PROCESSES or time.monotonic() > end:
                break
            try:
                conn = Conn(port)
                hello = conn.line()
            except (ConnectionRefusedError, EOFError, TimeoutError):
                time.sleep(0.1)  # a process still starting
                continue
            assert hello.startswith("hello from worker ")
            conns.append(conn)
            pids.setdefault(hello.rsplit(" ", 1)[1], conn)
            time.sleep(0.05)
        assert len(pids) >= 2, "every connection landed on one process"
        time.sleep(0.5)  # let every process finish joining the bus
        sender = next(iter(pids.values()))
        sender.sock.sendall(b"hi everyone\n")
        for conn in conns:
            line = conn.line()
            assert line.endswith("] hi everyone"), line
        for conn in conns:
            conn.sock.close()
