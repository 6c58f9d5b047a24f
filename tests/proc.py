"""Running the real ``workerbus`` command and worker scripts as subprocesses, bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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
