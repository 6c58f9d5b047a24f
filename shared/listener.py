"""The broker's listening socket and the upkeep of its socket file.

Opening: a stale socket file (a dead broker's) is replaced, a live broker's path is refused,
anything that is not a socket is never touched, and the socket appears at its path already
with its final mode. Upkeep: a socket file deleted under a running broker is put back, and
on the way out only the broker's own file is removed.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, SocketListener

from .errors import AddressInUse
from .logutil import LogLimiter

__all__ = ["ACCEPT_RETRY", "SocketFile", "accept_forever", "open_unix_listener"]

logger = logging.getLogger(__name__)


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        # A full backlog still means somebody is listening.
        return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    finally:
        probe.close()
    return True


def _resolve_group(group: str | int) -> int:
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r}") from None


def _clear_stale(path: str) -> None:
    """Make room at ``path`` if what is there is a dead broker's socket; refuse otherwise."""
    try:
        st = os.lstat(path)  # lstat: a symlink is judged as itself, never followed
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a socket"
        raise OSError(errno.EEXIST, f"{path} exists and is {kind}; not replacing it")
    if _is_live(path):
        raise AddressInUse(f"a broker is already listening on unix:{path}")
    logger.info("replacing stale socket file %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def open_unix_listener(
    path: str, *, mode: int = 0o600, group: str | int | None = None, backlog: int = 1024
) -> SocketListener:
    """Listen on ``path``, created with ``mode`` (and ``group``, a name or gid, if given).

    A stale socket file (nobody listening) is replaced; a live broker's path is refused; a
    path that is not a socket (a regular file, a symlink) is never touched. The socket is
    bound under a temporary name, given its mode and group, and then hard-linked into
    place: ``link`` fails if the path exists, so two brokers starting at once cannot
    overwrite each other, and the socket is never reachable with looser permissions.

    Raises:
        AddressInUse: a live broker listens on ``path``.
        OSError: the path is not a socket, or binding failed.
        ValueError: unknown group.
    """
    gid = None if group is None else _resolve_group(group)
    try:
        sock = _bind_in_place(path, mode, gid, backlog)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            # (a bind error names no file: say which socket, e.g. a missing directory)
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise
    return await SocketListener.from_socket(sock)


#: Seconds between accepts while the process is out of file descriptors (or kernel memory):
#: the waiting peers stay in the listen backlog and are accepted once a descriptor is free.
ACCEPT_RETRY = 0.1

# accept() errors that say "not now": the listener is fine, the process or the system is out
# of a resource. Any other error (a closed listener) ends the accept loop.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The peer gave up between its connect and our accept: nothing to serve, nothing to report.
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


async def accept_forever(
    listener: SocketListener,
    handler: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]],
    task_group: anyio.abc.TaskGroup,
    out_of_resources: Callable[[OSError], object],
) -> None:
    """Accept connections on ``listener`` and start ``handler`` for each in ``task_group``,
    until cancelled.

    Not ``listener.serve``, for two reasons:

    - anyio's asyncio ``accept`` waits on a future that the loop's reader callback resolves;
      a broker cancelled in the loop turn in which a connection arrived makes asyncio log
      an ``InvalidStateError`` (shared/sockets.py has the same race on reads).
      ``anyio.wait_readable`` tolerates it, on both backends.
    - anyio raises ``BrokenResourceError`` for every failed ``accept``, so a broker out of
      file descriptors (``EMFILE``) would stop serving for good. Here that is reported
      through ``out_of_resources`` and retried every :data:`ACCEPT_RETRY` seconds; the
      connections already open carry on.
    """
    sock = listener.extra(SocketAttribute.raw_socket)
    while True:
        await anyio.wait_readable(sock)
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another process sharing the socket took it, or a spurious wake-up
        except OSError as exc:
            if exc.errno in _PEER_GONE:
                continue
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            out_of_resources(exc)
            await anyio.sleep(ACCEPT_RETRY)
            continue
        try:
            conn.setblocking(False)
            stream = await anyio.abc.UNIXSocketStream.from_socket(conn)
        except BaseException:
            conn.close()
            raise
        task_group.start_soon(handler, stream)


def _bind_in_place(path: str, mode: int, gid: int | None, backlog: int) -> socket.socket:
    _clear_stale(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".wb-{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.chmod(tmp, mode)
        for _ in range(3):
            if _link(tmp, path):
                break
            _clear_stale(path)  # raced with another broker: judge what is there now
        else:
            raise AddressInUse(f"unix:{path} keeps being re-created by someone else")
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return sock


def _link(tmp: str, path: str) -> bool:
    """Put ``tmp`` at ``path`` unless something is there; False if something is."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # A file system without hard links: rename (which replaces) is the fallback.
        os.rename(tmp, path)
    return True


class SocketFile:
    """A broker's socket path and the inodes it put there (the only ones it may remove).

    The broker calls :meth:`check` once a housekeeping tick and serves any listener it
    returns next to its first one; :meth:`remove_own` on the way out.
    """

    __slots__ = ("foreign", "group", "inodes", "mode", "path")

    def __init__(self, path: str, mode: int, group: str | int | None) -> None:
        self.path = path
        self.mode = mode
        self.group = group
        self.inodes = {os.stat(path).st_ino}
        #: The inode of a file someone else put at the path, once logged.
        self.foreign: int | None = None

    async def check(self, connections: int, limiter: LogLimiter) -> SocketListener | None:
        """Re-create the socket file if it was deleted; the new listener, if one was made.

        A tmp cleaner or a careless ``rm`` can delete the file: open connections do not
        notice, but every worker that reconnects would find no broker. A file someone else
        put at the path is left alone (logged once): it is theirs.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if st.st_ino not in self.inodes and st.st_ino != self.foreign:
                self.foreign = st.st_ino
                logger.error(
                    "socket path %s was replaced by another file; this broker keeps its %d "
                    "connections but new workers cannot reach it",
                    self.path,
                    connections,
                )
            return None
        logger.warning(
            "socket file %s was deleted under the running broker; re-creating it "
            "(open connections are not affected)",
            self.path,
        )
        try:
            listener = await open_unix_listener(self.path, mode=self.mode, group=self.group)
            self.inodes.add(os.stat(self.path).st_ino)
        except (AddressInUse, OSError) as exc:
            limiter.log(logging.ERROR, "cannot re-create socket file %s: %s", self.path, exc)
            return None
        return listener

    def remove_own(self) -> None:
        try:
            if os.lstat(self.path).st_ino in self.inodes:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
