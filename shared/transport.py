"""What a transport is, and addresses.

A transport only knows how a connection *starts*: ``streambus`` sends frames at once,
``httpbus`` first does an HTTP/1.1 upgrade. After that both hand a plain byte stream (plus
any bytes read past the handshake) to the shared core.
"""

from __future__ import annotations

import logging
from typing import Protocol

from anyio.abc import ByteStream

# The listener lives in shared/listener.py; re-exported for the stats server.
from .listener import open_unix_listener
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
    #
    # Optional, client side: ``async def connect_with(self, path, first: bytes)`` is
    # ``connect`` that also sends ``first`` (a native client's hello) as early as the
    # connection start allows, without waiting for the broker's answer to it.


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
