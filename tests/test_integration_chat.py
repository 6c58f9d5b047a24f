"""examples/chat_server.py: processes sharing a TCP port, lines crossing between them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

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
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    # Each process logs "accepting on" (stderr, shared by the children) once it has
    # joined the bus and listens on the port: the test starts when all have, instead of
    # sleeping. A thread drains the pipe, so the logs can never fill it and block them.
    accepting: list[str] = []
    all_accepting = threading.Event()

    def drain(stream: IO[str]) -> None:
        for line in stream:
            if " accepting on " in line:
                accepting.append(line)
                if len(accepting) >= PROCESSES:
                    all_accepting.set()

    assert proc.stderr is not None
    reader = threading.Thread(target=drain, args=(proc.stderr,), daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("listening on 127.0.0.1:"), first
        assert all_accepting.wait(30), f"only {len(accepting)} of {PROCESSES} processes started"
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
        reader.join(10)  # EOF once every process is gone
        proc.stderr.close()
        subprocess.run(["rm", "-rf", tmp], check=False)


def test_a_line_reaches_the_clients_of_every_process() -> None:
    with chat_server() as port:
        conns: list[Conn] = []
        pids: dict[str, Conn] = {}
        # Every process listens (chat_server waited for it): the kernel spreads new
        # connections over them by a hash of the client's port, so enough connections
        # reach each one. Bounded by a count; nothing to wait for between attempts.
        for _ in range(400):
            if len(pids) == PROCESSES:
                break
            conn = Conn(port)
            hello = conn.line()
            assert hello.startswith("hello from worker ")
            conns.append(conn)
            pids.setdefault(hello.rsplit(" ", 1)[1], conn)
        assert len(pids) == PROCESSES, f"connections reached {len(pids)} of {PROCESSES} processes"
        # No wait for the bus either: every process joined before it listened, and the
        # broker keeps a queue for each of the expected ids (workers=N), so a line reaches
        # a process whose client is still connecting as soon as it is connected.
        sender = next(iter(pids.values()))
        sender.sock.sendall(b"hi everyone\n")
        for conn in conns:
            line = conn.line()
            assert line.endswith("] hi everyone"), line
        for conn in conns:
            conn.sock.close()
