"""What a transport is, addresses, and the broker's listening socket.

A transport only knows how a connection *starts*: ``streambus`` sends frames at once,
``httpbus`` first does an HTTP/1.1 upgrade. After that both hand a plain byte stream (plus
any bytes read past the handshake) to the shared core.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import secrets
import socket
import stat
from typing import Protocol

from anyio.abc import ByteStream, SocketListener

from .errors import AddressInUse
from .unixpath import socket_path

__all__ = ["Transport", "get_transport", "open_unix_listener", "parse_address", "register_transport"]

logger = logging.getLogger(__name__)


class Transport(Protocol):
    """How one kind of connection starts, on each side."""

    name: str

    async def connect(self, path: str) -> tuple[ByteStream, bytes]:
        """Client side: connect to ``path`` and do the connection start.

        Returns the stream and the bytes read past the handshake.

        Raises:
            OSError: the socket could not be connected.
            HandshakeError: the connection start failed.
        """
        ...

    async def accept(self, stream: ByteStream) -> bytes:
        """Broker side: do the connection start on an accepted stream.

        Returns the bytes read past the handshake (the start of the frame stream).

        Raises:
            HandshakeError: the peer's connection start was refused (already answered).
        """
        ...

    # Optional, broker side (looked up with getattr, so a transport written before it
    # still fits): ``async def refuse(self, stream, status: int, text: str) -> None`` tells
    # a peer it is refused before its connection start (the broker is full, the uid is not
    # trusted), if the transport has a way to say so; the broker then closes. ``status`` is
    # the HTTP status that describes the refusal, ``text`` one line for a person.


# The names a caller may use instead of a transport object. The core imports no transport:
# ``httpbus`` and ``streambus`` add themselves here when they are imported (see
# docs/architecture.md), so ``transport="stream"`` works once ``streambus`` is loaded.
_REGISTRY: dict[str, Transport] = {}
_PACKAGE_OF = {"http": "httpbus", "stream": "streambus"}


def register_transport(transport: Transport) -> None:
    """Make ``transport.name`` usable as a name for ``transport`` (done by the transports)."""
    _REGISTRY[transport.name] = transport


def get_transport(name: str | Transport | None) -> Transport:
    """A registered name (``"http"``, ``"stream"``) or a :class:`Transport` → the transport.

    Raises:
        ValueError: no transport given, or the name is not registered (its package was not
            imported), with the fix in the message.
    """
    if name is None:
        raise ValueError(
            "no transport: pass transport=httpbus.TRANSPORT or streambus.TRANSPORT "
            "(or use httpbus.connect / streambus.connect)"
        )
    if not isinstance(name, str):
        return name
    found = _REGISTRY.get(name)
    if found is not None:
        return found
    package = _PACKAGE_OF.get(name)
    if package is None:
        raise ValueError(f"unknown transport {name!r}: expected 'http' or 'stream'")
    raise ValueError(f"transport {name!r} is not loaded: import {package} first")


def parse_address(address: str) -> str:
    """``unix:/abs/path.sock`` → ``/abs/path.sock``.

    Raises:
        ValueError: not a ``unix:`` address (lua-resty-events has the same rule), a relative
            path, or one longer than AF_UNIX allows.
    """
    return socket_path(address)


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
    return await SocketListener.from_socket(_bind_in_place(path, mode, gid, backlog))


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
