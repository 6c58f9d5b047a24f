"""Running the real ``workerbus`` command and worker scripts as subprocesses, bounded."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

PY = sys.executable


def workerbus(*args: str) -> list[str]:
    return [PY, "-m", "shared.tools.cli", *args]


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {path} after {timeout}s")


def _unix_listening(path: str) -> bool:
    """Whether a socket bound to ``path`` is listening, read from /proc/net/unix (Linux)."""
    with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
        next(table)  # the header
        for line in table:
            fields = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = accepting
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_for_listening(path: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0) -> None:
    """Like :func:`wait_for_socket`, without connecting: for servers where a probe
    connection is not harmless (nginx's stream subsystem runs its Lua handler on connect,
    and a connection closed before it sends anything is logged as an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        if _unix_listening(path):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {path} after {timeout}s")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    """Signal ``proc`` and wait for it; kill it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def running(cmd: Sequence[str], **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd``; on the way out terminate it (and kill it if it lingers)."""
    proc = subprocess.Popen(list(cmd), **kw)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        stop(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextmanager
def broker(path: str, *extra: str, transport: str = "http") -> Iterator[subprocess.Popen[bytes]]:
    cmd = workerbus("broker", "--listen", f"unix:{path}", "--transport", transport, *extra)
    with running(cmd, stderr=subprocess.PIPE) as proc:
        wait_for_socket(path, proc)
        yield proc


def env() -> dict[str, str]:
    return dict(os.environ)


class JsonLinesChild:
    """A worker script as a child process: one JSON command per line on its stdin
    (:meth:`send`), one JSON object per line on its stdout, read by a thread into
    ``lines`` so that tests can wait for them with a deadline."""

    def __init__(self, argv: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL (if still running) and close the pipes."""
        stop(self.proc, signal.SIGKILL)
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                s.close()
