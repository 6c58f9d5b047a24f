"""Who hosts the broker, and which worker id each process has: ``flock(2)`` on small files.

The kernel drops a ``flock`` when the last descriptor of the locked open file goes away,
which happens when the process exits, however it exits (``kill -9`` included). That makes a
lock file an election that cleans up after the dead without any heartbeat:

- ``<socket>.lock``: held by the one process that hosts the broker. While it holds it, it
  also keeps a small JSON record in it (pid, worker id, generation), so the next host
  knows whom it replaces and counts generations up.
- ``<socket>.id.<n>``: held by the process that is worker ``n``. A worker takes the lowest
  ``n`` whose file nobody holds, so a respawned worker gets the id of the one that died.

Lock files are never deleted: unlinking a lock file while another process is about to
lock it would let two processes hold "the same" lock on two different files.

A forked child must not inherit these locks (it would keep the election won after its
parent died), so every descriptor opened here is closed in the child right after
``fork``; ``O_CLOEXEC`` covers ``exec``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import weakref
from collections.abc import Mapping

from .errors import BusError

__all__ = [
    "DEFAULT_MAX_WORKER_ID",
    "FileLock",
    "WorkerIdUnavailable",
    "claim_worker_id",
    "held_worker_ids",
    "id_path",
    "lock_path",
    "workers_from_env",
]

#: Worker ids are claimed below this bound when the number of workers is not known. It
#: also bounds how many lock files one bus may create.
DEFAULT_MAX_WORKER_ID = 1024
#: Bytes of the host record read back from the lock file.
_MAX_RECORD = 4096
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

_held: weakref.WeakSet[FileLock] = weakref.WeakSet()


class WorkerIdUnavailable(BusError):
    """Every worker id below the bound is held by a live process (more workers than said)."""


def lock_path(socket_path: str) -> str:
    """The election lock file of the bus at ``socket_path``."""
    return socket_path + ".lock"


def id_path(socket_path: str, worker_id: int) -> str:
    """The lock file of worker id ``worker_id``."""
    return f"{socket_path}.id.{worker_id}"


class FileLock:
    """An exclusive ``flock`` held through one open descriptor. Build with :meth:`acquire`."""

    __slots__ = ("__weakref__", "fd", "path")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd: int | None = fd
        _held.add(self)

    @classmethod
    def acquire(cls, path: str) -> FileLock | None:
        """Take the lock without waiting; None if another open file holds it.

        Raises:
            OSError: the file cannot be opened (permissions, a symlink planted at ``path``).
        """
        fd = os.open(path, _OPEN_FLAGS, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Give the lock up (closing the descriptor is what releases it). Idempotent."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
        _held.discard(self)

    def read_record(self) -> dict[str, object]:
        """The JSON object stored in the file, or ``{}`` if there is none or it is garbage."""
        assert self.fd is not None
        raw = os.pread(self.fd, _MAX_RECORD, 0)
        try:
            value = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        except (UnicodeDecodeError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def write_record(self, record: Mapping[str, object]) -> None:
        assert self.fd is not None
        data = json.dumps(dict(record), separators=(",", ":")).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


def _close_in_child() -> None:
    # The child shares the parent's open files; closing our copies here leaves the
    # parent's locks alone and keeps the child from holding them after the parent dies.
    for lock in list(_held):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def claim_worker_id(socket_path: str, limit: int) -> tuple[int, FileLock] | None:
    """Lock the lowest free worker id below ``limit``; None if every one is held."""
    for worker_id in range(limit):
        lock = FileLock.acquire(id_path(socket_path, worker_id))
        if lock is not None:
            return worker_id, lock
    return None


def held_worker_ids(socket_path: str, limit: int) -> list[int]:
    """The ids below ``limit`` that a live process holds now.

    Probes with a shared lock, which fails while a worker holds its exclusive one. A worker
    claiming an id during the microseconds of a probe sees it as taken and takes the next
    free id instead; ids stay unique either way.
    """
    held: list[int] = []
    directory = os.path.dirname(socket_path) or "."
    prefix = os.path.basename(socket_path) + ".id."
    try:
        names = os.listdir(directory)
    except OSError:
        return held
    for name in names:
        suffix = name[len(prefix) :] if name.startswith(prefix) else ""
        if not suffix.isdigit() or int(suffix) >= limit:
            continue
        try:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            held.append(int(suffix))
        finally:
            os.close(fd)
    return sorted(held)


def workers_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The worker count a server advertises: ``WEB_CONCURRENCY`` (uvicorn and gunicorn read
    it as their default ``--workers``). None when unset or not a positive integer."""
    env = os.environ if environ is None else environ
    value = env.get("WEB_CONCURRENCY", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return None
