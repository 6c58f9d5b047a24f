"""What a transport is, addresses, and the broker's listening socket.

A transport only knows how a connection *starts*: ``streambus`` sends frames at once,
``httpbus`` first does an HTTP/1.1 upgrade. After that both hand a plain byte stream (plus
any bytes read past the handshake) to the shared core.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import stat
from typing import Protocol

from anyio.abc import ByteStream, SocketListener

from .errors import AddressInUse

__all__ = ["Transport", "get_transport", "open_unix_listener", "parse_address"]

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


def get_transport(name: str | Transport) -> Transport:
    """``"http"`` → :data:`httpbus.TRANSPORT`, ``"stream"`` → :data:`streambus.TRANSPORT`."""
    if not isinstance(name, str):
        return name
    if name == "http":
        from httpbus.transport import TRANSPORT as http

        return http
    if name == "stream":
        from streambus.transport import TRANSPORT as stream

        return stream
    raise ValueError(f"unknown transport {name!r}: expected 'http' or 'stream'")


def parse_address(address: str) -> str:
    """``unix:/abs/path.sock`` → ``/abs/path.sock``.

    Raises:
        ValueError: not a ``unix:`` address (lua-resty-events has the same rule).
    """
    if not address.startswith("unix:") or len(address) == len("unix:"):
        raise ValueError(f'address must start with "unix:" and name a path, got {address!r}')
    return address[len("unix:") :]


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


async def open_unix_listener(path: str, *, mode: int = 0o600, backlog: int = 1024) -> SocketListener:
    """Listen on ``path``, created with ``mode``.

    A stale socket file (nobody listening) is replaced; a live broker's path is refused; a
    path that is not a socket (a regular file, a symlink) is never touched. The socket is
    bound under a temporary name, given its mode and then renamed into place, so it is
    never reachable with looser permissions.

    Raises:
        AddressInUse: a live broker listens on ``path``.
        OSError: the path is not a socket, or binding failed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        if _is_live(path):
            raise AddressInUse(f"a broker is already listening on unix:{path}")
        logger.info("replacing stale socket file %s", path)
        os.unlink(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".wb-{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    return await SocketListener.from_socket(sock)
