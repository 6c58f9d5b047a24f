"""Ctrl-C and SIGTERM for the commands that start child processes (the demos).

Both raise KeyboardInterrupt in the main thread, so that the command's ``finally`` stops
its children (the default SIGTERM ends the process at once and leaves them running). A
signal that arrives while a child is being started is held until the child is in the
command's list (:func:`deferred`): raised inside ``subprocess.Popen``, it would leave a
started child that nobody stops.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["deferred", "install"]

_deferring = 0
_pending = False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _deferring:
        _pending = True
        return
    raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (main thread only)."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then raise KeyboardInterrupt if one
    came."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            _pending = False
            raise KeyboardInterrupt
