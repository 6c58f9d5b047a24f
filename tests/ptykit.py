"""Running a command on a pseudo-terminal, as a person at a terminal would (bounded waits)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Sequence

from tests.faultkit import REPO

#: CSI/OSC escape sequences and lone escapes, for reading what a screen says.
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-B]|\x1b[=>78]")


def strip_escapes(text: str) -> str:
    return _ESCAPES.sub("", text)


def _controlling_tty() -> None:
    # In the child: a new session whose controlling terminal is the pty (stdin), so that
    # Ctrl-C typed on it becomes SIGINT for the child, as in a real terminal.
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyProc:
    """``cmd`` with stdin, stdout and stderr on a pty of ``cols`` x ``rows``."""

    def __init__(self, cmd: Sequence[str], *, cols: int = 120, rows: int = 40,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        full_env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            list(cmd), stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=full_env,
            preexec_fn=_controlling_tty,
        )  # fmt: skip
        os.close(slave)
        self.master = master
        self.raw = bytearray()

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed its side
            return False
        if not chunk:
            return False
        self.raw += chunk
        return True

    def read_until(self, predicate: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen so far:\n{strip_escapes(self.text)[-3000:]}")
            if not self._read(0.1) and not predicate(self.text):
                raise AssertionError(f"exited (rc={self.proc.poll()}) before {what}:\n{strip_escapes(self.text)[-3000:]}")
        return self.text

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the exit, reading everything it still writes."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s:\n{strip_escapes(self.text)[-3000:]}")
            self._read(0.05)
        while select.select([self.master], [], [], 0.05)[0]:  # what it wrote before exiting
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.raw += chunk
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        with contextlib.suppress(OSError):
            os.close(self.master)

    def __enter__(self) -> PtyProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
